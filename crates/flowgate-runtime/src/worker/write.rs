//! Writing to a sink, retrying what failed temporarily.

use std::time::{Duration, SystemTime};

use flowgate_core::retry::Backoff;
use flowgate_core::{Error, ErrorKind, IdempotencyKey, Record, Sink, TxContext, WriteError};

use crate::settings::ExhaustedPolicy;
use crate::stats::Stats;

use super::layers::Common;

/// How a write went.
#[derive(Default)]
pub(super) struct Written {
    pub(super) written: usize,
    /// Records the sink refused as poison, or gave up on (`on_exhausted = "dead_letter"`).
    pub(super) dead: Vec<(Record, Error)>,
    /// Idempotency keys of the records written (to mark, unless the sink marked them).
    pub(super) marks: Vec<IdempotencyKey>,
    pub(super) oldest_timestamp: Option<SystemTime>,
    /// A sink answer throttled the write at least once.
    pub(super) throttled: bool,
}

/// How a sink is written to: in a transaction with the dedup marks, or plainly; whether the
/// keys of what was written are collected to be marked afterwards.
#[derive(Clone, Copy)]
pub(super) struct WriteMode {
    pub(super) transactional: bool,
    pub(super) collect_marks: bool,
}

/// Writes `pending` to `sink`: what is confirmed is done, poison is set aside, temporary
/// failures are retried with the pipeline's backoff (from the first failure) until it gives
/// up, then dead-lettered or fatal as `retry.on_exhausted` says.
pub(super) async fn write_with_retry(
    common: &Common,
    sink: &dyn Sink,
    mut pending: Vec<Record>,
    mode: WriteMode,
) -> Result<Written, Error> {
    let mut res = Written {
        oldest_timestamp: pending.first().and_then(|r| r.timestamp),
        ..Written::default()
    };
    let mut failing: Option<Backoff> = None;
    while !pending.is_empty() {
        let failed = attempt(common, sink, &pending, mode.transactional).await;
        if failed.is_empty() {
            // Every record confirmed (the common case): nothing to split.
            res.written += pending.len();
            if mode.collect_marks {
                res.marks
                    .extend(pending.iter().filter_map(|r| r.idempotency_key.clone()));
            }
            break;
        }
        let Some((err, throttled)) = split(&mut pending, failed, mode, &mut res)? else {
            break;
        };
        if throttled {
            res.throttled = true;
            Stats::add(&common.stats.throttles, 1);
            common.metrics.throttles.increment(1);
        }
        let backoff = failing.get_or_insert_with(|| common.retry.policy().start());
        match backoff.delay_after(&err) {
            Some(d) => {
                Stats::add(&common.stats.retries, 1);
                common.metrics.retries.increment(1);
                tracing::debug!(error = %err, delay = ?d, records = pending.len(), "sink write failed, retrying");
                tokio::time::sleep(d).await;
            }
            None => give_up(common, &mut pending, err, backoff, &mut res)?,
        }
    }
    Ok(res)
}

/// One write of `pending`: the indices that failed, each with its error, in order.
async fn attempt(
    common: &Common,
    sink: &dyn Sink,
    pending: &[Record],
    transactional: bool,
) -> Vec<(usize, Error)> {
    let outcome = if transactional {
        let marks: Vec<IdempotencyKey> = pending
            .iter()
            .filter_map(|r| r.idempotency_key.clone())
            .collect();
        let tx = TxContext {
            pipeline: &common.pipeline,
            dedup_marks: &marks,
            dedup_ttl: common.dedup_ttl,
        };
        sink.write_transactional(pending, &tx).await
    } else {
        sink.write(pending).await
    };
    match outcome {
        Ok(()) => Vec::new(),
        Err(WriteError::Batch(e)) => {
            let n = pending.len();
            let mut v: Vec<(usize, Error)> = (0..n.saturating_sub(1))
                .map(|i| (i, e.duplicate()))
                .collect();
            v.push((n - 1, e));
            v
        }
        Err(WriteError::Partial(mut errs)) => {
            errs.sort_by_key(|(i, _)| *i);
            errs.dedup_by_key(|(i, _)| *i);
            errs.retain(|(i, _)| *i < pending.len());
            errs
        }
    }
}

/// Sorts `pending` into confirmed (counted), poison (set aside) and temporary failures (left
/// in `pending`, in order). Returns the last temporary error, if any, and whether one was a
/// throttle; a fatal error stops.
fn split(
    pending: &mut Vec<Record>,
    failed: Vec<(usize, Error)>,
    mode: WriteMode,
    res: &mut Written,
) -> Result<Option<(Error, bool)>, Error> {
    let mut failed = failed.into_iter().peekable();
    let mut retry = Vec::new();
    let mut last_err: Option<Error> = None;
    let mut throttled = false;
    for (i, r) in std::mem::take(pending).into_iter().enumerate() {
        let Some((_, e)) = failed.next_if(|(fi, _)| *fi == i) else {
            res.written += 1;
            if let (true, Some(k)) = (mode.collect_marks, &r.idempotency_key) {
                res.marks.push(k.clone());
            }
            continue;
        };
        match e.kind() {
            ErrorKind::Poison => res.dead.push((r, e)),
            ErrorKind::Transient | ErrorKind::Throttled => {
                throttled |= e.kind() == ErrorKind::Throttled;
                retry.push(r);
                last_err = Some(e);
            }
            _ => {
                return Err(e
                    .with_context("partition", &r.partition)
                    .with_context("position", &r.position));
            }
        }
    }
    *pending = retry;
    Ok(last_err.map(|e| (e, throttled)))
}

/// The retry budget is spent: dead-letter what is left, or stop, as `on_exhausted` says.
fn give_up(
    common: &Common,
    pending: &mut Vec<Record>,
    err: Error,
    backoff: &Backoff,
    res: &mut Written,
) -> Result<(), Error> {
    let gave_up = format!(
        "{} attempts over {:?}",
        backoff.attempts() + 1,
        backoff.elapsed()
    );
    match common.retry.on_exhausted {
        ExhaustedPolicy::DeadLetter => {
            for r in pending.drain(..) {
                res.dead
                    .push((r, err.duplicate().with_context("gave_up_after", &gave_up)));
            }
            Ok(())
        }
        ExhaustedPolicy::Stop => Err(err
            .with_context("gave_up_after", gave_up)
            .with_hint("the sink kept failing; nothing was acknowledged, a restart retries from the checkpoint")),
    }
}

/// The end-to-end latency of a write that started at `started`, from the oldest record's
/// timestamp.
pub(super) fn end_to_end(started: SystemTime, oldest: Option<SystemTime>) -> Option<Duration> {
    oldest.and_then(|ts| started.duration_since(ts).ok())
}
