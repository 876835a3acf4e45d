//! One sink batch: dedup check → transform → write with retries → dead letters → marks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use flowgate_core::retry::Backoff;
use flowgate_core::{
    DedupStore, Error, ErrorKind, IdempotencyKey, PartitionId, Position, PositionRange, Record,
    Sink, TxContext, WriteError,
};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::settings::{ExhaustedPolicy, RetrySettings};
use crate::stats::Stats;

/// A boxed future, as returned by transforms.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An async record transform: `Ok(Some(r))` passes `r` on, `Ok(None)` filters the record out
/// (it is acknowledged), `Err` with kind `Poison` dead-letters it, temporary errors are
/// retried, other errors stop the pipeline.
pub type TransformFn =
    Arc<dyn Fn(Record) -> BoxFuture<Result<Option<Record>, Error>> + Send + Sync>;

/// What every sink worker shares: the sink, the dead-letter sink, dedup, retries, metrics, and
/// the channel back to the coordinator.
pub(crate) struct WorkerContext {
    pub(crate) pipeline: String,
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) transactional: bool,
    pub(crate) dead_letter: Option<Arc<dyn Sink>>,
    pub(crate) native_dead_letter: bool,
    pub(crate) dedup: Option<Arc<dyn DedupStore>>,
    /// Dedup by position ranges (`KeyExtractor::SourcePosition` with a store that keeps them,
    /// and a sink that is not transactional) instead of one key per record.
    pub(crate) positional: bool,
    pub(crate) marker: Option<mpsc::UnboundedSender<MarkRequest>>,
    pub(crate) transform: Option<TransformFn>,
    pub(crate) retry: RetrySettings,
    pub(crate) dedup_ttl: Duration,
    pub(crate) stats: Arc<Stats>,
    pub(crate) metrics: Metrics,
    pub(crate) events: mpsc::UnboundedSender<WorkerEvent>,
}

/// A batch of one lane of one partition.
pub(crate) struct Batch {
    pub(crate) partition: PartitionId,
    pub(crate) incarnation: u64,
    pub(crate) lane: usize,
    pub(crate) seqs: Vec<u64>,
    pub(crate) records: Vec<Record>,
    /// Positional dedup: indices of the records to look up in the store (the others are
    /// above anything marked; see `LookupFloor`).
    pub(crate) lookups: Vec<usize>,
    pub(crate) bytes: usize,
}

/// What a worker tells the coordinator.
pub(crate) enum WorkerEvent {
    /// The sink confirmed the batch; the lane may send its next batch (the batch itself is
    /// acknowledged later, once its dedup marks are durable).
    LaneFree {
        partition: PartitionId,
        incarnation: u64,
        lane: usize,
    },
    /// The batch is settled (or failed fatally).
    Done(Completion),
}

pub(crate) struct Completion {
    pub(crate) partition: PartitionId,
    pub(crate) incarnation: u64,
    pub(crate) lane: usize,
    pub(crate) lane_released: bool,
    pub(crate) seqs: Vec<u64>,
    pub(crate) bytes: usize,
    pub(crate) latency: Duration,
    pub(crate) throttled: bool,
    /// Poison records the source must dead-letter on the broker before the batch is acked.
    pub(crate) rejects: Vec<(Record, Error)>,
    pub(crate) result: Result<(), Error>,
}

/// A group-commit request for dedup marks.
pub(crate) struct MarkRequest {
    keys: Vec<IdempotencyKey>,
    ranges: Vec<PositionRange>,
    done: oneshot::Sender<Result<(), Error>>,
}

/// Coalesces concurrent mark requests into one store call: with a durable store each call
/// costs an fsync, so batches confirmed while one call runs share the next one. Calls start
/// at most once per `interval` — those confirmed meanwhile wait and share it — unless a
/// quarter of the current concurrency limit (`stats`) is waiting already: a waiting batch
/// holds its credit and a slot of the limit, so waiting longer would slow the pipeline down.
pub(crate) async fn marker_task(
    store: Arc<dyn DedupStore>,
    pipeline: String,
    ttl: Duration,
    (interval, stats): (Duration, Arc<Stats>),
    retry: RetrySettings,
    mut rx: mpsc::UnboundedReceiver<MarkRequest>,
) {
    let mut last_call: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut reqs = vec![first];
        if let Some(due) = last_call.map(|at| at + interval) {
            let limit = stats.concurrency.load(Ordering::Relaxed);
            let max_waiting = usize::try_from(limit / 4).unwrap_or(usize::MAX).max(1);
            while reqs.len() < max_waiting {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => reqs.push(r),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(due) => break,
                }
            }
        }
        last_call = Some(tokio::time::Instant::now());
        while let Ok(r) = rx.try_recv() {
            reqs.push(r);
        }
        let keys: Vec<IdempotencyKey> = reqs.iter().flat_map(|r| r.keys.iter().cloned()).collect();
        let ranges: Vec<PositionRange> =
            reqs.iter().flat_map(|r| r.ranges.iter().cloned()).collect();
        let mut res = Ok(());
        if !keys.is_empty() {
            res = retry_temporary(&retry, "dedup mark", || store.mark(&pipeline, &keys, ttl)).await;
        }
        if res.is_ok() && !ranges.is_empty() {
            res = retry_temporary(&retry, "dedup mark", || {
                store.mark_ranges(&pipeline, &ranges, ttl)
            })
            .await;
        }
        for r in reqs {
            let _ = r
                .done
                .send(res.as_ref().map(|_| ()).map_err(Error::duplicate));
        }
    }
}

/// Retries an operation while it fails with a temporary error, with the runtime's backoff.
pub(crate) async fn retry_temporary<T, F, Fut>(
    retry: &RetrySettings,
    what: &'static str,
    mut op: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    // The budget runs from the first failure: a wait before the first attempt (a sink
    // holding its requests for another partition's `Retry-After`) spends none of it.
    let mut failing: Option<Backoff> = None;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_temporary() => match failing
                .get_or_insert_with(|| retry.policy().start())
                .next_delay()
            {
                Some(d) => {
                    tracing::warn!(error = %e, delay = ?d, "{what} failed, retrying");
                    tokio::time::sleep(e.retry_after().map_or(d, |r| r.max(d))).await;
                }
                None => {
                    let spent = failing.as_ref().map(Backoff::elapsed).unwrap_or_default();
                    return Err(e.with_context("gave_up_after", format!("{spent:?}")));
                }
            },
            Err(e) => return Err(e),
        }
    }
}

/// Sends a fatal completion if the worker panics, so the coordinator never waits forever.
struct Guard {
    shared: Arc<WorkerContext>,
    info: Option<(PartitionId, u64, usize, Vec<u64>, usize)>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((partition, incarnation, lane, seqs, bytes)) = self.info.take() {
            let _ = self.shared.events.send(WorkerEvent::Done(Completion {
                partition,
                incarnation,
                lane,
                lane_released: false,
                seqs,
                bytes,
                latency: Duration::ZERO,
                throttled: false,
                rejects: Vec::new(),
                result: Err(Error::fatal(
                    "a sink worker panicked; see the log for the panic message",
                )),
            }));
        }
    }
}

/// Runs one batch to completion and reports it.
pub(crate) async fn run(shared: Arc<WorkerContext>, batch: Batch) {
    let Batch {
        partition,
        incarnation,
        lane,
        seqs,
        records,
        lookups,
        bytes,
    } = batch;
    let mut guard = Guard {
        shared: shared.clone(),
        info: Some((partition.clone(), incarnation, lane, Vec::new(), bytes)),
    };
    let started = Instant::now();
    let mut out = Outcome::default();
    let result = process(
        &shared,
        (&partition, incarnation, lane),
        &seqs,
        records,
        &lookups,
        &mut out,
    )
    .await;
    guard.info = None;
    let _ = shared.events.send(WorkerEvent::Done(Completion {
        partition,
        incarnation,
        lane,
        lane_released: out.lane_released,
        seqs,
        bytes,
        latency: started.elapsed(),
        throttled: out.throttled,
        rejects: out.rejects,
        result,
    }));
}

#[derive(Default)]
struct Outcome {
    throttled: bool,
    lane_released: bool,
    rejects: Vec<(Record, Error)>,
}

/// `(partition, incarnation, lane)`: the lane a batch came from.
type LaneRef<'a> = (&'a PartitionId, u64, usize);

async fn process(
    shared: &Arc<WorkerContext>,
    (partition, incarnation, lane): LaneRef<'_>,
    seqs: &[u64],
    mut records: Vec<Record>,
    lookups: &[usize],
    out: &mut Outcome,
) -> Result<(), Error> {
    // 1. Check before sink: skip records already applied.
    let mut ranges = Vec::new();
    if let (Some(store), true) = (&shared.dedup, shared.positional) {
        // Positional marks: the whole batch settles together, so its runs of consecutive
        // deliveries are marked as ranges (skipped, filtered and dead-lettered records too).
        ranges = runs(partition, seqs, &records);
        let positions: Vec<Position> = lookups
            .iter()
            .filter_map(|i| records.get(*i).map(|r| r.position.clone()))
            .collect();
        if !positions.is_empty() {
            let seen = retry_temporary(&shared.retry, "dedup check", || {
                store.seen_positions(&shared.pipeline, partition, &positions)
            })
            .await?;
            if seen.iter().any(|s| *s) {
                let hits = seen.iter().filter(|s| **s).count() as u64;
                Stats::add(&shared.stats.dedup_hits, hits);
                shared.metrics.dedup_hits.increment(hits);
                let mut skip = vec![false; records.len()];
                for (i, s) in lookups.iter().zip(seen) {
                    if let Some(k) = skip.get_mut(*i) {
                        *k = s;
                    }
                }
                let mut it = skip.into_iter();
                records.retain(|_| !it.next().unwrap_or(false));
            }
        }
    } else if let Some(store) = &shared.dedup {
        let keyed: Vec<(usize, IdempotencyKey)> = records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.idempotency_key.clone().map(|k| (i, k)))
            .collect();
        if !keyed.is_empty() {
            let keys: Vec<IdempotencyKey> = keyed.iter().map(|(_, k)| k.clone()).collect();
            let seen = retry_temporary(&shared.retry, "dedup check", || {
                store.seen(&shared.pipeline, &keys)
            })
            .await?;
            let skip: Vec<usize> = keyed
                .iter()
                .zip(seen)
                .filter(|(_, s)| *s)
                .map(|((i, _), _)| *i)
                .collect();
            if !skip.is_empty() {
                Stats::add(&shared.stats.dedup_hits, skip.len() as u64);
                shared.metrics.dedup_hits.increment(skip.len() as u64);
                let mut i = 0;
                records.retain(|_| {
                    let keep = skip.binary_search(&i).is_err();
                    i += 1;
                    keep
                });
            }
        }
    }

    // 2. Transform.
    let mut dead: Vec<(Record, Error)> = Vec::new();
    if let Some(t) = &shared.transform {
        let mut transformed = Vec::with_capacity(records.len());
        for r in records {
            let original = r.clone();
            let res = retry_temporary(&shared.retry, "transform", || t(r.clone())).await;
            match res {
                Ok(Some(r)) => transformed.push(r),
                Ok(None) => {}
                Err(e) if e.kind() == ErrorKind::Poison => dead.push((original, e)),
                Err(e) => {
                    return Err(e
                        .with_context("partition", partition)
                        .with_context("position", &original.position));
                }
            }
        }
        records = transformed;
    }

    // 3. Write, retrying what failed temporarily.
    let sink_started = SystemTime::now();
    let outcome =
        write_with_retry(shared, &*shared.sink, records, shared.transactional, out).await?;
    dead.extend(outcome.dead);
    let mut marks = outcome.marks;
    Stats::add(&shared.stats.records_out, outcome.written as u64);
    shared.metrics.records_out.increment(outcome.written as u64);
    if let Some(ts) = outcome.oldest_timestamp {
        if let Ok(lat) = sink_started.duration_since(ts) {
            shared.metrics.end_to_end.record(lat.as_secs_f64());
        }
    }

    // 4. Dead letters.
    if !dead.is_empty() {
        let n = dead.len() as u64;
        for (r, e) in &dead {
            tracing::warn!(partition = %r.partition, position = %r.position, error = %e, "dead-lettering a record");
        }
        if let Some(dl) = &shared.dead_letter {
            if !shared.positional {
                marks.extend(dead.iter().filter_map(|(r, _)| r.idempotency_key.clone()));
            }
            let letters: Vec<Record> = dead
                .into_iter()
                .map(|(r, e)| dead_letter_record(r, &e))
                .collect();
            let res = write_with_retry(shared, &**dl, letters, false, out).await?;
            if let Some((_, e)) = res.dead.into_iter().next() {
                return Err(Error::fatal("the dead-letter sink refused a record")
                    .with_context("error", e)
                    .with_hint(
                        "check the dead-letter destination; the record is not acknowledged",
                    ));
            }
        } else if shared.native_dead_letter {
            out.rejects = dead;
        } else {
            let (r, e) = dead.swap_remove(0);
            return Err(Error::fatal("a poison record needs a dead-letter destination")
                .with_context("partition", &r.partition)
                .with_context("position", &r.position)
                .with_context("error", e)
                .with_hint("configure a dead-letter sink (`Pipeline::builder(..).dead_letter(..)` or `dead_letter` in the config)"));
        }
        Stats::add(&shared.stats.dead_lettered, n);
        shared.metrics.dead_letters.increment(n);
    }

    // 5. Mark after confirm (transactional sinks marked in their own transaction).
    if let Some(marker) = &shared.marker {
        if !marks.is_empty() || !ranges.is_empty() {
            let _ = shared.events.send(WorkerEvent::LaneFree {
                partition: partition.clone(),
                incarnation,
                lane,
            });
            out.lane_released = true;
            let (tx, rx) = oneshot::channel();
            marker
                .send(MarkRequest {
                    keys: marks,
                    ranges,
                    done: tx,
                })
                .map_err(|_| Error::fatal("the dedup marker stopped"))?;
            rx.await
                .map_err(|_| Error::fatal("the dedup marker stopped"))??;
        }
    }
    Ok(())
}

/// Runs of consecutive deliveries (consecutive seqs) of a batch, as position ranges.
fn runs(partition: &PartitionId, seqs: &[u64], records: &[Record]) -> Vec<PositionRange> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=records.len() {
        let breaks = i == records.len() || seqs.get(i) != seqs.get(i - 1).map(|s| s + 1).as_ref();
        if breaks {
            if let (Some(first), Some(last)) = (records.get(start), records.get(i - 1)) {
                out.push(PositionRange {
                    partition: partition.clone(),
                    first: first.position.clone(),
                    last: last.position.clone(),
                });
            }
            start = i;
        }
    }
    out
}

struct Written {
    written: usize,
    dead: Vec<(Record, Error)>,
    /// Idempotency keys of the records written (to mark, unless the sink marked them).
    marks: Vec<IdempotencyKey>,
    oldest_timestamp: Option<SystemTime>,
}

async fn write_with_retry(
    shared: &WorkerContext,
    sink: &dyn Sink,
    mut pending: Vec<Record>,
    transactional: bool,
    out: &mut Outcome,
) -> Result<Written, Error> {
    let mut res = Written {
        written: 0,
        dead: Vec::new(),
        marks: Vec::new(),
        oldest_timestamp: pending.first().and_then(|r| r.timestamp),
    };
    let collect_marks = shared.marker.is_some() && !transactional && !shared.positional;
    // The budget runs from the first failure (see `retry_temporary`).
    let mut failing: Option<Backoff> = None;
    while !pending.is_empty() {
        let attempt = if transactional {
            let marks: Vec<IdempotencyKey> = pending
                .iter()
                .filter_map(|r| r.idempotency_key.clone())
                .collect();
            let tx = TxContext {
                pipeline: &shared.pipeline,
                dedup_marks: &marks,
                dedup_ttl: shared.dedup_ttl,
            };
            sink.write_transactional(&pending, &tx).await
        } else {
            sink.write(&pending).await
        };
        let failed: Vec<(usize, Error)> = match attempt {
            Ok(()) => Vec::new(),
            Err(WriteError::Batch(e)) => {
                let n = pending.len();
                let mut v = Vec::with_capacity(n);
                for i in 0..n.saturating_sub(1) {
                    v.push((i, e.duplicate()));
                }
                v.push((n - 1, e));
                v
            }
            Err(WriteError::Partial(mut errs)) => {
                errs.sort_by_key(|(i, _)| *i);
                errs.dedup_by_key(|(i, _)| *i);
                errs.retain(|(i, _)| *i < pending.len());
                errs
            }
        };
        if failed.is_empty() {
            // Every record confirmed (the common case): nothing to split.
            res.written += pending.len();
            if collect_marks {
                res.marks
                    .extend(pending.iter().filter_map(|r| r.idempotency_key.clone()));
            }
            break;
        }
        // Split pending into confirmed, dead and retry, keeping order.
        let mut failed = failed.into_iter().peekable();
        let mut retry = Vec::new();
        let mut last_err: Option<Error> = None;
        let mut throttled = false;
        for (i, r) in std::mem::take(&mut pending).into_iter().enumerate() {
            match failed.next_if(|(fi, _)| *fi == i) {
                None => {
                    res.written += 1;
                    if collect_marks {
                        if let Some(k) = &r.idempotency_key {
                            res.marks.push(k.clone());
                        }
                    }
                }
                Some((_, e)) => match e.kind() {
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
                },
            }
        }
        pending = retry;
        let Some(err) = last_err else { break };
        if throttled {
            out.throttled = true;
            Stats::add(&shared.stats.throttles, 1);
            shared.metrics.throttles.increment(1);
        }
        let backoff = failing.get_or_insert_with(|| shared.retry.policy().start());
        match backoff.next_delay() {
            Some(d) => {
                Stats::add(&shared.stats.retries, 1);
                shared.metrics.retries.increment(1);
                let d = err.retry_after().map_or(d, |r| r.max(d));
                tracing::debug!(error = %err, delay = ?d, records = pending.len(), "sink write failed, retrying");
                tokio::time::sleep(d).await;
            }
            _ => {
                let gave_up = format!(
                    "{} attempts over {:?}",
                    backoff.attempts() + 1,
                    backoff.elapsed()
                );
                match shared.retry.on_exhausted {
                    ExhaustedPolicy::DeadLetter => {
                        for r in pending.drain(..) {
                            res.dead
                                .push((r, err.duplicate().with_context("gave_up_after", &gave_up)));
                        }
                    }
                    ExhaustedPolicy::Stop => {
                        return Err(err
                            .with_context("gave_up_after", gave_up)
                            .with_hint("the sink kept failing; nothing was acknowledged, a restart retries from the checkpoint"));
                    }
                }
            }
        }
    }
    Ok(res)
}

/// The record sent to the dead-letter sink: the original, with the error attached as headers.
pub fn dead_letter_record(mut r: Record, e: &Error) -> Record {
    use flowgate_core::headers as h;
    r.headers.set(h::ERROR, e.to_string());
    r.headers.set(h::ERROR_KIND, e.kind().as_str());
    r.headers.set(h::SOURCE_PARTITION, r.partition.to_string());
    r.headers.set(h::SOURCE_POSITION, r.position.to_string());
    r
}
