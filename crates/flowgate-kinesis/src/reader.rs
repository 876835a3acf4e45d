//! One paced reader per owned Kinesis shard: `GetRecords` only when the shard's buffer is
//! empty and the runtime gave it credit, never sooner than `min_call_interval` and the byte
//! pace allow; an expired iterator is re-acquired after the last record read.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use flowgate_core::retry::{Backoff, BackoffPolicy};
use flowgate_core::{
    Error, ErrorKind, LagSample, LagUnit, PartitionId, Position, Record, SourceEvent,
};

use crate::config::StartAt;
use crate::error::{code, map};
use crate::kpl;

use crate::shards::*;

/// Whether this worker still owns `shard`, and its buffer is empty.
pub(crate) fn buffer_state(ctx: &Ctx, shard: &PartitionId) -> Option<bool> {
    ctx.shared
        .inbox
        .buffered()
        .owned
        .get(shard)
        .map(|o| o.buffer.is_empty())
}

/// One shard's reader; ends at the shard's end, on a fatal error, or when aborted.
pub(crate) async fn read_shard(ctx: Arc<Ctx>, shard: PartitionId, after: Option<Position>) {
    let mut iterator: Option<String> = None;
    let mut last = after;
    let mut next_call = tokio::time::Instant::now();
    // Failing reads wait on this; its budget runs from the first failure since a success.
    let policy = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(5))
        .with_give_up_after(ctx.cfg.give_up_after);
    let mut failing: Option<Backoff> = None;
    loop {
        // An empty buffer and credit, or wait.
        let credit = loop {
            let changed = ctx.credits.changed();
            let drained = ctx.shared.drained.notified();
            let Some(empty) = buffer_state(&ctx, &shard) else {
                return;
            };
            let credit = ctx.credits.available(&shard);
            if empty && credit > 0 {
                break credit;
            }
            tokio::select! {
                _ = changed => {}
                _ = drained => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        };
        tokio::time::sleep_until(next_call).await;
        let result = match &iterator {
            Some(it) => get_records(&ctx, &shard, it, credit).await,
            None => match shard_iterator(&ctx, &shard, last.as_ref()).await {
                Ok(it) => {
                    iterator = Some(it);
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(mut batch) => {
                ctx.report_up(shard.as_str());
                failing = None;
                // An iterator at the last record read returns it (or its aggregate) again.
                if let Some(l) = &last {
                    batch.records.retain(|r| r.position > *l);
                }
                if let Some(r) = batch.records.last() {
                    last = Some(r.position.clone());
                }
                let ended = batch.next_iterator.is_none();
                iterator = batch.next_iterator;
                let mut pace = ctx.cfg.min_call_interval.max(Duration::from_secs_f64(
                    batch.bytes as f64 / ctx.cfg.read_bytes_per_second as f64,
                ));
                if batch.records.is_empty() && !ended {
                    pace = pace.max(ctx.cfg.idle_backoff);
                }
                next_call = tokio::time::Instant::now() + pace;
                if let Some(ms) = batch.millis_behind {
                    ctx.shared
                        .inbox
                        .push_event(SourceEvent::Lag(vec![LagSample {
                            partition: shard.clone(),
                            lag: u64::try_from(ms).unwrap_or(0),
                            unit: LagUnit::Millis,
                        }]));
                }
                {
                    let mut st = ctx.shared.inbox.buffered();
                    let n = batch.records.len() as u64;
                    st.stats.entry(shard.clone()).or_default().records += n;
                    let Some(o) = st.owned.get_mut(&shard) else {
                        return;
                    };
                    o.buffer.extend(batch.records);
                    o.ended = ended;
                }
                ctx.shared.inbox.wake();
                if ended {
                    tracing::info!(shard = %shard, "kinesis: shard ended (resharded); its lease finishes once the rest is committed");
                    return;
                }
            }
            Err(Failure::Expired) => {
                note(&ctx, &shard, EXPIRED_ITERATORS, |s| {
                    s.expired_iterators += 1
                });
                tracing::info!(shard = %shard, "kinesis: shard iterator expired; re-acquiring it after the last record read");
                iterator = None;
            }
            Err(Failure::Error(e)) => {
                if e.kind() == ErrorKind::Throttled {
                    note(&ctx, &shard, READ_THROTTLES, |s| s.throttles += 1);
                }
                if e.kind() == ErrorKind::Transient {
                    ctx.report_down(shard.as_str(), &e);
                }
                let backoff = failing.get_or_insert_with(|| policy.start());
                let wait = if e.is_temporary() {
                    backoff.next_delay()
                } else {
                    None
                };
                let Some(wait) = wait else {
                    ctx.shared.inbox.fail(e.with_context("shard", &shard));
                    return;
                };
                tracing::warn!(shard = %shard, error = %e, retry_in = ?wait, "kinesis: reading a shard failed; retrying");
                next_call = tokio::time::Instant::now() + wait;
            }
        }
    }
}

/// Updates the shard's statistics and counts the event in the metric `name`.
fn note(ctx: &Ctx, shard: &PartitionId, name: &'static str, update: impl FnOnce(&mut ShardStats)) {
    update(
        ctx.shared
            .inbox
            .buffered()
            .stats
            .entry(shard.clone())
            .or_default(),
    );
    metrics::counter!(name, "stream" => ctx.cfg.stream.clone(), "shard" => shard.to_string())
        .increment(1);
}

pub(crate) struct Fetched {
    pub(crate) records: Vec<Record>,
    pub(crate) bytes: usize,
    pub(crate) next_iterator: Option<String>,
    pub(crate) millis_behind: Option<i64>,
}

pub(crate) enum Failure {
    Expired,
    Error(Error),
}

pub(crate) async fn get_records(
    ctx: &Ctx,
    shard: &PartitionId,
    iterator: &str,
    credit: usize,
) -> Result<Fetched, Failure> {
    let limit = credit.min(ctx.cfg.max_records_per_call);
    note(ctx, shard, GET_RECORDS_CALLS, |s| s.call(Instant::now()));
    let out = ctx
        .client
        .get_records()
        .shard_iterator(iterator)
        .limit(i32::try_from(limit).unwrap_or(10_000))
        .send()
        .await;
    let out = match out {
        Ok(out) => out,
        Err(e) if code(&e).as_deref() == Some("ExpiredIteratorException") => {
            return Err(Failure::Expired);
        }
        Err(e) => {
            return Err(Failure::Error(map(
                e,
                "reading a shard (GetRecords)",
                &ctx.cfg.stream,
            )));
        }
    };
    let mut bytes = 0;
    let mut records = Vec::with_capacity(out.records.len());
    for r in out.records {
        let data = r.data.into_inner();
        bytes += data.len() + r.partition_key.len();
        let timestamp = r
            .approximate_arrival_timestamp
            .and_then(|t| SystemTime::try_from(t).ok());
        // KPL aggregates become their user records, each with a position of its own.
        for part in kpl::split(Bytes::from(data), Bytes::from(r.partition_key.into_bytes())) {
            let position =
                kpl::position(&r.sequence_number, part.sub_sequence).ok_or_else(|| {
                    Failure::Error(
                        Error::fatal("kinesis: a sequence number is not a decimal number")
                            .with_context("shard", shard)
                            .with_context("sequence_number", &r.sequence_number),
                    )
                })?;
            let mut rec =
                Record::new(shard.clone(), position, part.data).with_key(part.partition_key);
            rec.timestamp = timestamp;
            records.push(rec);
        }
    }
    Ok(Fetched {
        records,
        bytes,
        next_iterator: out.next_shard_iterator,
        millis_behind: out.millis_behind_latest,
    })
}

/// An iterator after `after` (the last record read), or at the configured start.
pub(crate) async fn shard_iterator(
    ctx: &Ctx,
    shard: &PartitionId,
    after: Option<&Position>,
) -> Result<String, Failure> {
    let mut req = ctx
        .client
        .get_shard_iterator()
        .stream_name(&ctx.cfg.stream)
        .shard_id(shard.as_str());
    req = match (after, ctx.cfg.start) {
        // *At* the record: after a checkpoint inside a KPL aggregate its remaining user records
        // come next; the reader drops what is at or before `after`.
        (Some(p), _) => {
            let (seq, _) = kpl::sequence_of(p).ok_or_else(|| {
                Failure::Error(
                    Error::fatal("kinesis: a stored position is not a Kinesis position")
                        .with_context("shard", shard)
                        .with_context("position", p),
                )
            })?;
            req.shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(seq)
        }
        (None, StartAt::TrimHorizon) => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        (None, StartAt::Latest) => req.shard_iterator_type(ShardIteratorType::Latest),
        (None, StartAt::AtTimestamp) => req
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from_millis(ctx.cfg.at_timestamp_ms.unwrap_or(0))),
    };
    let out = req.send().await.map_err(|e| {
        if let (Some(p), Some("InvalidArgumentException")) = (after, code(&e).as_deref()) {
            // A checkpoint that names no record of the shard: refuse, and say which.
            return Failure::Error(
                Error::config("kinesis: the stored checkpoint names no record of this shard")
                    .with_context("stream", &ctx.cfg.stream)
                    .with_context("shard", shard)
                    .with_context("position", p)
                    .with_context("cause", e)
                    .with_hint("positions are sequence number × 2^20 + KPL sub-sequence (docs/brokers/kinesis.md); a checkpoint holding a raw sequence number, or one of another stream, must be reset: `flowgate checkpoints reset -c FILE --partition SHARD`"),
            );
        }
        Failure::Error(map(
            e,
            "getting a shard iterator (GetShardIterator)",
            &ctx.cfg.stream,
        ))
    })?;
    out.shard_iterator.ok_or_else(|| {
        Failure::Error(
            Error::transient("kinesis: GetShardIterator returned no iterator")
                .with_context("shard", shard),
        )
    })
}
