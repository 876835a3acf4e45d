//! The Kinesis sink: `PutRecords` within the API limits, only failed entries retried.

use async_trait::async_trait;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use flowgate_core::{Error, ErrorKind, Record, Sink, SinkCapabilities, WriteError};

use crate::config::KinesisSinkConfig;
use crate::error::{kind_of_code, map};

/// Records per `PutRecords` call (the API limit).
pub const MAX_BATCH_RECORDS: usize = 500;
/// Bytes per `PutRecords` call, data and partition keys (the API limit).
pub const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// Bytes per record, data and partition key (the API limit).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Writes records to a Kinesis stream with `PutRecords`.
///
/// A record counts as written only when its entry in the response has a sequence number.
/// Entries that failed (throttled, internal errors) are reported back to the runtime one by
/// one, which retries only those and lowers its concurrency on throttling. A record over
/// 1 MiB is poison.
///
/// Ordering: Kinesis orders a shard by arrival. By default a call carries many records of one
/// partition key, and when one of them fails while a later one succeeds, the retry lands after
/// it. With `ordered_keys`, a call carries at most one record per key and the records after a
/// failed one are not sent (the runtime retries them after it), so each key keeps its order.
pub struct KinesisSink {
    cfg: KinesisSinkConfig,
    client: aws_sdk_kinesis::Client,
}

impl KinesisSink {
    /// A sink writing to `cfg.stream`. Checks the settings; the first write finds out
    /// whether the stream is reachable.
    pub async fn connect(cfg: KinesisSinkConfig) -> Result<Self, Error> {
        cfg.validate()?;
        let client = crate::client::build(&cfg.connection).await;
        Ok(KinesisSink { cfg, client })
    }

    /// The partition key of a record: its key if that is valid UTF-8 of 1 to 256 characters,
    /// else the configured one, else its source partition.
    fn partition_key(&self, r: &Record) -> String {
        if let Some(k) = r.key.as_ref().and_then(|k| std::str::from_utf8(k).ok()) {
            if !k.is_empty() && k.chars().count() <= 256 {
                return k.to_string();
            }
        }
        if let Some(k) = &self.cfg.partition_key {
            return k.clone();
        }
        let p = r.partition.as_str();
        if p.is_empty() {
            "flowgate".to_string()
        } else {
            p.chars().take(256).collect()
        }
    }

    /// One `PutRecords` call for `indexes` of `batch`; failed entries are added to `failed`.
    async fn put(
        &self,
        batch: &[Record],
        indexes: &[usize],
        entries: Vec<PutRecordsRequestEntry>,
        failed: &mut Vec<(usize, Error)>,
    ) -> Result<(), Error> {
        let out = self
            .client
            .put_records()
            .stream_name(&self.cfg.stream)
            .set_records(Some(entries))
            .send()
            .await
            .map_err(|e| map(e, "writing records (PutRecords)", &self.cfg.stream))?;
        if out.failed_record_count.unwrap_or(0) == 0 {
            return Ok(());
        }
        for (entry, &i) in out.records.iter().zip(indexes) {
            if let Some(code) = &entry.error_code {
                let kind = kind_of_code(Some(code));
                let kind = if kind == ErrorKind::Throttled {
                    kind
                } else {
                    ErrorKind::Transient
                };
                failed.push((
                    i,
                    Error::new(kind, "kinesis: a record of PutRecords failed")
                        .with_context("stream", &self.cfg.stream)
                        .with_context("partition", &batch[i].partition)
                        .with_context("code", code)
                        .with_context("message", entry.error_message.as_deref().unwrap_or("")),
                ));
            }
        }
        if out.records.len() < indexes.len() {
            for &i in &indexes[out.records.len()..] {
                failed.push((
                    i,
                    Error::transient("kinesis: PutRecords answered for fewer records than sent"),
                ));
            }
        }
        Ok(())
    }
}

/// A record to send: its index in the batch, partition key and size.
#[derive(Debug)]
struct Planned {
    index: usize,
    key: String,
    size: usize,
}

/// Takes the records of the next `PutRecords` call out of `pending`, in batch order, within
/// the call limits; with `ordered_keys`, at most one record per partition key, so that a
/// failed entry is never overtaken by a later record of its key in the same call.
fn next_call(pending: &mut Vec<Planned>, ordered_keys: bool) -> Vec<Planned> {
    let mut call = Vec::new();
    let mut in_call = std::collections::HashSet::new();
    let mut deferred = std::collections::HashSet::new();
    let mut full = false;
    let mut bytes = 0;
    let mut rest = Vec::with_capacity(pending.len());
    for p in pending.drain(..) {
        full = full || call.len() == MAX_BATCH_RECORDS || bytes + p.size > MAX_BATCH_BYTES;
        // Once full, everything waits (nothing overtakes); ordered, a key already in the call,
        // or with an earlier record waiting, waits too.
        if full || (ordered_keys && (in_call.contains(&p.key) || deferred.contains(&p.key))) {
            if ordered_keys {
                deferred.insert(p.key.clone());
            }
            rest.push(p);
            continue;
        }
        if ordered_keys {
            in_call.insert(p.key.clone());
        }
        bytes += p.size;
        call.push(p);
    }
    *pending = rest;
    call
}

#[async_trait]
impl Sink for KinesisSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic()
            .with_batch_limits(Some(MAX_BATCH_RECORDS), Some(MAX_BATCH_BYTES))
            .with_max_record_bytes(Some(MAX_RECORD_BYTES))
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        let mut failed: Vec<(usize, Error)> = Vec::new();
        let mut pending: Vec<Planned> = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            let key = self.partition_key(r);
            let size = r.payload.len() + key.len();
            if size > MAX_RECORD_BYTES {
                failed.push((
                    i,
                    Error::new(ErrorKind::Poison, "kinesis: record larger than 1 MiB")
                        .with_context("bytes", size)
                        .with_context("partition", &r.partition)
                        .with_context("position", &r.position),
                ));
                continue;
            }
            pending.push(Planned {
                index: i,
                key,
                size,
            });
        }
        while !pending.is_empty() {
            let call = next_call(&mut pending, self.cfg.ordered_keys);
            let mut entries = Vec::with_capacity(call.len());
            for p in &call {
                let r = &batch[p.index];
                let mut entry = PutRecordsRequestEntry::builder()
                    .data(Blob::new(r.payload.to_vec()))
                    .partition_key(p.key.clone());
                if let Some(h) = &self.cfg.explicit_hash_key_header {
                    if let Some(v) = r.headers.get(h).and_then(|v| std::str::from_utf8(v).ok()) {
                        entry = entry.explicit_hash_key(v);
                    }
                }
                entries.push(entry.build().map_err(|e| {
                    WriteError::Batch(
                        Error::fatal("kinesis: building a PutRecords entry failed")
                            .with_context("cause", e),
                    )
                })?);
            }
            let indexes: Vec<usize> = call.iter().map(|p| p.index).collect();
            let before = failed.len();
            self.put(batch, &indexes, entries, &mut failed)
                .await
                .map_err(WriteError::Batch)?;
            if self.cfg.ordered_keys && failed.len() > before {
                // Later records of a key whose entry failed are not sent: the runtime retries
                // them after it, in order.
                let keys: std::collections::HashSet<&str> = failed[before..]
                    .iter()
                    .filter_map(|(i, _)| call.iter().find(|p| p.index == *i))
                    .map(|p| p.key.as_str())
                    .collect();
                let (held, rest): (Vec<Planned>, Vec<Planned>) = pending
                    .into_iter()
                    .partition(|p| keys.contains(p.key.as_str()));
                pending = rest;
                for p in held {
                    failed.push((
                        p.index,
                        Error::transient(
                            "kinesis: not sent; an earlier record of its partition key failed",
                        ),
                    ));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            failed.sort_by_key(|(i, _)| *i);
            Err(WriteError::Partial(failed))
        }
    }

    async fn flush(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn check(&self) -> Result<bool, Error> {
        self.client
            .describe_stream_summary()
            .stream_name(&self.cfg.stream)
            .send()
            .await
            .map_err(|e| {
                map(
                    e,
                    "describing the stream (DescribeStreamSummary)",
                    &self.cfg.stream,
                )
            })?;
        Ok(true)
    }

    async fn close(&self) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(keys: &[&str]) -> Vec<Planned> {
        keys.iter()
            .enumerate()
            .map(|(index, k)| Planned {
                index,
                key: k.to_string(),
                size: 10,
            })
            .collect()
    }

    #[test]
    fn unordered_calls_fill_up_to_the_limits() {
        let mut p = planned(&["a"; 1_200]);
        let sizes: Vec<usize> =
            std::iter::from_fn(|| (!p.is_empty()).then(|| next_call(&mut p, false).len()))
                .collect();
        assert_eq!(sizes, vec![500, 500, 200]);
    }

    #[test]
    fn a_record_that_does_not_fit_is_not_overtaken() {
        let mut p = planned(&["a", "b", "c"]);
        p[1].size = MAX_BATCH_BYTES;
        let first: Vec<usize> = next_call(&mut p, false).iter().map(|x| x.index).collect();
        assert_eq!(first, vec![0], "c must not overtake b");
        let second: Vec<usize> = next_call(&mut p, false).iter().map(|x| x.index).collect();
        assert_eq!(second, vec![1]);
    }

    #[test]
    fn ordered_calls_carry_one_record_per_key_in_batch_order() {
        let mut p = planned(&["a", "a", "b", "a", "c", "b"]);
        let mut calls = Vec::new();
        while !p.is_empty() {
            calls.push(
                next_call(&mut p, true)
                    .iter()
                    .map(|x| x.index)
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(calls, vec![vec![0, 2, 4], vec![1, 5], vec![3]]);
    }
}
