//! One paced reader per owned Kinesis shard: `GetRecords` only when the shard's buffer is
//! empty and the runtime gave it credit, never sooner than `min_call_interval` and the byte
//! pace allow; an expired iterator is re-acquired after the last record read.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use flowgate_core::retry::{Backoff, BackoffPolicy};
use flowgate_core::{
    Error, ErrorKind, LagSample, LagUnit, PartitionId, Position, Record, SourceEvent,
};

use crate::client::kpl;
use crate::config::StartAt;
use crate::error::{code, map};

use crate::leases::shards::*;

/// Whether this worker still owns `shard`, and its buffer is empty.
pub(crate) fn buffer_state(ctx: &SourceTasks, shard: &PartitionId) -> Option<bool> {
    ctx.shards
        .inbox
        .buffered()
        .owned
        .get(shard)
        .map(|o| o.buffer.is_empty())
}

/// One shard's reader; ends at the shard's end, on a fatal error, or when aborted.
pub(crate) async fn read_shard(ctx: Arc<SourceTasks>, shard: PartitionId, after: Option<Position>) {
    // Failing reads wait on this; its budget runs from the first failure since a success.
    let policy = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(5))
        .with_give_up_after(ctx.cfg.give_up_after);
    let reader = ShardReader {
        ctx,
        shard,
        iterator: None,
        last: after,
        next_call: tokio::time::Instant::now(),
        policy,
        failing: None,
    };
    reader.run().await;
}

/// A shard's reader and where it stands in the shard.
struct ShardReader {
    ctx: Arc<SourceTasks>,
    shard: PartitionId,
    iterator: Option<String>,
    /// The position of the last record read (or the checkpoint it started after).
    last: Option<Position>,
    /// No `GetRecords` before this (the pace, or the backoff after a failure).
    next_call: tokio::time::Instant,
    policy: BackoffPolicy,
    /// The backoff of the failures since the last success.
    failing: Option<Backoff>,
}

impl ShardReader {
    async fn run(mut self) {
        loop {
            let Some(credit) = self.wait_for_credit().await else {
                return;
            };
            tokio::time::sleep_until(self.next_call).await;
            let result = match &self.iterator {
                Some(it) => get_records(&self.ctx, &self.shard, it, credit).await,
                None => match shard_iterator(&self.ctx, &self.shard, self.last.as_ref()).await {
                    Ok(it) => {
                        self.iterator = Some(it);
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            let step = match result {
                Ok(batch) => self.deliver(batch),
                Err(Failure::Expired) => {
                    self.on_expired();
                    ControlFlow::Continue(())
                }
                Err(Failure::Error(e)) => self.on_error(e),
            };
            if step.is_break() {
                return;
            }
        }
    }

    /// Waits for an empty buffer and credit, and returns the credit; `None` once this worker
    /// no longer owns the shard.
    async fn wait_for_credit(&self) -> Option<usize> {
        let (ctx, shard) = (&self.ctx, &self.shard);
        loop {
            let changed = ctx.credits.changed();
            let drained = ctx.shards.drained.notified();
            let empty = buffer_state(ctx, shard)?;
            let credit = ctx.credits.available(shard);
            if empty && credit > 0 {
                return Some(credit);
            }
            tokio::select! {
                _ = changed => {}
                _ = drained => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Buffers what a `GetRecords` returned and paces the next call; breaks at the shard's
    /// end or once the shard is no longer owned.
    fn deliver(&mut self, mut batch: Fetched) -> ControlFlow<()> {
        let (ctx, shard) = (&self.ctx, &self.shard);
        ctx.report_up(shard.as_str());
        self.failing = None;
        // An iterator at the last record read returns it (or its aggregate) again.
        if let Some(l) = &self.last {
            batch.records.retain(|r| r.position > *l);
        }
        if let Some(r) = batch.records.last() {
            self.last = Some(r.position.clone());
        }
        let ended = batch.next_iterator.is_none();
        self.iterator = batch.next_iterator;
        self.next_call =
            tokio::time::Instant::now() + pace(ctx, batch.bytes, batch.records.is_empty(), ended);
        if let Some(ms) = batch.millis_behind {
            report_lag(ctx, shard, ms);
        }
        if !buffer(ctx, shard, batch.records, ended) {
            return ControlFlow::Break(());
        }
        ctx.shards.inbox.wake();
        if ended {
            tracing::info!(shard = %shard, "kinesis: shard ended (resharded); its lease finishes once the rest is committed");
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn on_expired(&mut self) {
        note(&self.ctx, &self.shard, EXPIRED_ITERATORS, |s| {
            s.expired_iterators += 1
        });
        tracing::info!(shard = %self.shard, "kinesis: shard iterator expired; re-acquiring it after the last record read");
        self.iterator = None;
    }

    /// Schedules a retry of a temporary failure within the backoff's budget; breaks after
    /// failing the source otherwise.
    fn on_error(&mut self, e: Error) -> ControlFlow<()> {
        let (ctx, shard) = (&self.ctx, &self.shard);
        if e.kind() == ErrorKind::Throttled {
            note(ctx, shard, READ_THROTTLES, |s| s.throttles += 1);
        }
        if e.kind() == ErrorKind::Transient {
            ctx.report_down(shard.as_str(), &e);
        }
        let backoff = self.failing.get_or_insert_with(|| self.policy.start());
        let wait = if e.is_temporary() {
            backoff.next_delay()
        } else {
            None
        };
        let Some(wait) = wait else {
            ctx.shards.inbox.fail(e.with_context("shard", shard));
            return ControlFlow::Break(());
        };
        tracing::warn!(shard = %shard, error = %e, retry_in = ?wait, "kinesis: reading a shard failed; retrying");
        self.next_call = tokio::time::Instant::now() + wait;
        ControlFlow::Continue(())
    }
}

/// How long to wait before the next `GetRecords`: the call interval, the byte pace, and the
/// idle backoff after a call that read nothing in a shard that goes on.
fn pace(ctx: &SourceTasks, bytes: usize, read_nothing: bool, ended: bool) -> Duration {
    let pace = ctx.cfg.min_call_interval.max(Duration::from_secs_f64(
        bytes as f64 / ctx.cfg.read_bytes_per_second as f64,
    ));
    if read_nothing && !ended {
        pace.max(ctx.cfg.idle_backoff)
    } else {
        pace
    }
}

fn report_lag(ctx: &SourceTasks, shard: &PartitionId, millis_behind: i64) {
    ctx.shards
        .inbox
        .push_event(SourceEvent::Lag(vec![LagSample {
            partition: shard.clone(),
            lag: u64::try_from(millis_behind).unwrap_or(0),
            unit: LagUnit::Millis,
        }]));
}

/// Appends the records to the shard's buffer and counts them; `false` if this worker no
/// longer owns the shard.
fn buffer(ctx: &SourceTasks, shard: &PartitionId, records: Vec<Record>, ended: bool) -> bool {
    let mut table = ctx.shards.inbox.buffered();
    let n = records.len() as u64;
    table.stats.entry(shard.clone()).or_default().records += n;
    let Some(o) = table.owned.get_mut(shard) else {
        return false;
    };
    o.buffer.extend(records);
    o.ended = ended;
    true
}

/// Updates the shard's statistics and counts the event in the metric `name`.
fn note(
    ctx: &SourceTasks,
    shard: &PartitionId,
    name: &'static str,
    update: impl FnOnce(&mut ShardStats),
) {
    update(
        ctx.shards
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
    ctx: &SourceTasks,
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
    ctx: &SourceTasks,
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
