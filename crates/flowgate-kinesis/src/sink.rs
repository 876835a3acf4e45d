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
/// Ordering: Kinesis orders a shard by arrival. When an entry fails and a later entry with the
/// same partition key in the same call succeeds, the retry lands after it; keep one batch in
/// flight per key (the runtime's per-partition ordering) if that matters.
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

#[async_trait]
impl Sink for KinesisSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic()
            .with_batch_limits(Some(MAX_BATCH_RECORDS), Some(MAX_BATCH_BYTES))
            .with_max_record_bytes(Some(MAX_RECORD_BYTES))
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        let mut failed: Vec<(usize, Error)> = Vec::new();
        let mut entries = Vec::new();
        let mut indexes = Vec::new();
        let mut bytes = 0;
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
            if entries.len() == MAX_BATCH_RECORDS || bytes + size > MAX_BATCH_BYTES {
                let sent = std::mem::take(&mut entries);
                let idx = std::mem::take(&mut indexes);
                self.put(batch, &idx, sent, &mut failed)
                    .await
                    .map_err(WriteError::Batch)?;
                bytes = 0;
            }
            let mut entry = PutRecordsRequestEntry::builder()
                .data(Blob::new(r.payload.to_vec()))
                .partition_key(key);
            if let Some(h) = &self.cfg.explicit_hash_key_header {
                if let Some(v) = r.headers.get(h).and_then(|v| std::str::from_utf8(v).ok()) {
                    entry = entry.explicit_hash_key(v);
                }
            }
            let entry = entry.build().map_err(|e| {
                WriteError::Batch(
                    Error::fatal("kinesis: building a PutRecords entry failed")
                        .with_context("cause", e),
                )
            })?;
            entries.push(entry);
            indexes.push(i);
            bytes += size;
        }
        if !entries.is_empty() {
            self.put(batch, &indexes, entries, &mut failed)
                .await
                .map_err(WriteError::Batch)?;
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

    async fn close(&self) -> Result<(), Error> {
        Ok(())
    }
}
