//! The layers a batch goes through. Each wraps the next, as a sink wrapper wraps its sink: it
//! does its part before or after handing the batch inward. Only the layers a pipeline needs
//! are built (no dedup store: no dedup check and no marks).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use flowgate_core::{
    DedupStore, Error, ErrorKind, IdempotencyKey, Position, PositionRange, Record, Sink,
};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::retry::retry_temporary;
use crate::settings::RetrySettings;
use crate::stats::Stats;

use super::marker::MarkRequest;
use super::write::{self, WriteMode, write_with_retry};
use super::{Ticket, TransformFn, WorkerConfig, dead_letter_record};

/// One layer: its part of a batch's trip, around the layers inside it.
#[async_trait]
pub(super) trait Layer: Send + Sync {
    async fn call(&self, ticket: &Ticket, work: &mut Work) -> Result<(), Error>;
}

/// A batch on its way through the layers, and what became of it.
pub(super) struct Work {
    /// The records still to write (the sink write takes them).
    pub(super) records: Vec<Record>,
    /// Poison records (from the transform or the sink), for the dead-letter layer.
    pub(super) dead: Vec<(Record, Error)>,
    /// Idempotency keys to mark once written.
    pub(super) marks: Vec<IdempotencyKey>,
    /// Position ranges to mark once written (positional dedup).
    pub(super) ranges: Vec<PositionRange>,
    pub(super) throttled: bool,
    /// Poison records for the source to dead-letter on its broker.
    pub(super) rejects: Vec<(Record, Error)>,
    /// The marks' write, when the marks layer handed it to the marker.
    pub(super) marks_pending: Option<oneshot::Receiver<Result<(), Error>>>,
}

impl Work {
    pub(super) fn new(records: Vec<Record>) -> Self {
        Work {
            records,
            dead: Vec::new(),
            marks: Vec::new(),
            ranges: Vec::new(),
            throttled: false,
            rejects: Vec::new(),
            marks_pending: None,
        }
    }
}

/// What every layer may need.
pub(super) struct Common {
    pub(super) pipeline: String,
    pub(super) retry: RetrySettings,
    pub(super) dedup_ttl: Duration,
    pub(super) stats: Arc<Stats>,
    pub(super) metrics: Metrics,
}

/// The layers `config` asks for, outermost returned.
pub(super) fn build(config: WorkerConfig) -> Arc<dyn Layer> {
    let common = Arc::new(Common {
        pipeline: config.pipeline,
        retry: config.retry,
        dedup_ttl: config.dedup_ttl,
        stats: config.stats,
        metrics: config.metrics,
    });
    let mut chain: Arc<dyn Layer> = Arc::new(SinkWrite {
        common: common.clone(),
        sink: config.sink,
        mode: WriteMode {
            transactional: config.transactional,
            collect_marks: config.marker.is_some() && !config.transactional && !config.positional,
        },
    });
    if let Some(transform) = config.transform {
        chain = Arc::new(Transform {
            common: common.clone(),
            transform,
            inner: chain,
        });
    }
    if let Some(store) = config.dedup {
        chain = if config.positional {
            Arc::new(PositionalDedup {
                common: common.clone(),
                store,
                inner: chain,
            })
        } else {
            Arc::new(KeyDedup {
                common: common.clone(),
                store,
                inner: chain,
            })
        };
    }
    chain = Arc::new(DeadLetters {
        common,
        dead_letter: config.dead_letter,
        native: config.native_dead_letter,
        mark_keys: !config.positional,
        inner: chain,
    });
    if let Some(marker) = config.marker {
        chain = Arc::new(Marks {
            marker,
            inner: chain,
        });
    }
    chain
}

/// Innermost: writes the records, retrying temporary failures.
struct SinkWrite {
    common: Arc<Common>,
    sink: Arc<dyn Sink>,
    mode: WriteMode,
}

#[async_trait]
impl Layer for SinkWrite {
    async fn call(&self, _ticket: &Ticket, work: &mut Work) -> Result<(), Error> {
        let started = SystemTime::now();
        let records = std::mem::take(&mut work.records);
        let written = write_with_retry(&self.common, &*self.sink, records, self.mode).await?;
        let n = written.written as u64;
        Stats::add(&self.common.stats.records_out, n);
        self.common.metrics.records_out.increment(n);
        if let Some(latency) = write::end_to_end(started, written.oldest_timestamp) {
            self.common.metrics.end_to_end.record(latency.as_secs_f64());
        }
        work.throttled |= written.throttled;
        work.dead.extend(written.dead);
        work.marks.extend(written.marks);
        Ok(())
    }
}

/// Before the write: each record through the user's transform; poison is set aside for the
/// dead-letter layer, filtered records are dropped (and acknowledged).
struct Transform {
    common: Arc<Common>,
    transform: TransformFn,
    inner: Arc<dyn Layer>,
}

#[async_trait]
impl Layer for Transform {
    async fn call(&self, ticket: &Ticket, work: &mut Work) -> Result<(), Error> {
        let records = std::mem::take(&mut work.records);
        let mut transformed = Vec::with_capacity(records.len());
        for r in records {
            let original = r.clone();
            let t = &self.transform;
            match retry_temporary(&self.common.retry, "transform", || t(r.clone())).await {
                Ok(Some(r)) => transformed.push(r),
                Ok(None) => {}
                Err(e) if e.kind() == ErrorKind::Poison => work.dead.push((original, e)),
                Err(e) => {
                    return Err(e
                        .with_context("partition", &ticket.partition)
                        .with_context("position", &original.position));
                }
            }
        }
        work.records = transformed;
        self.inner.call(ticket, work).await
    }
}

/// Before the write: drops records whose idempotency key the store has seen, or an earlier
/// record of the same batch carries (a message a producer published twice, side by side in
/// the queue).
struct KeyDedup {
    common: Arc<Common>,
    store: Arc<dyn DedupStore>,
    inner: Arc<dyn Layer>,
}

#[async_trait]
impl Layer for KeyDedup {
    async fn call(&self, ticket: &Ticket, work: &mut Work) -> Result<(), Error> {
        let keyed: Vec<(usize, IdempotencyKey)> = work
            .records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.idempotency_key.clone().map(|k| (i, k)))
            .collect();
        if !keyed.is_empty() {
            let keys: Vec<IdempotencyKey> = keyed.iter().map(|(_, k)| k.clone()).collect();
            let c = &self.common;
            let seen = retry_temporary(&c.retry, "dedup check", || {
                self.store.seen(&c.pipeline, &keys)
            })
            .await?;
            let mut in_batch: HashSet<&IdempotencyKey> = HashSet::with_capacity(keyed.len());
            let skip: Vec<usize> = keyed
                .iter()
                .zip(seen)
                .filter(|((_, k), seen)| !in_batch.insert(k) || *seen)
                .map(|((i, _), _)| *i)
                .collect();
            drop_seen(c, &mut work.records, skip.into_iter());
        }
        self.inner.call(ticket, work).await
    }
}

/// Before the write: drops records whose position the store has marked. The whole batch
/// settles together, so its runs of consecutive deliveries are marked as ranges afterwards
/// (skipped, filtered and dead-lettered records too).
struct PositionalDedup {
    common: Arc<Common>,
    store: Arc<dyn DedupStore>,
    inner: Arc<dyn Layer>,
}

#[async_trait]
impl Layer for PositionalDedup {
    async fn call(&self, ticket: &Ticket, work: &mut Work) -> Result<(), Error> {
        work.ranges = runs(ticket, &work.records);
        let positions: Vec<Position> = ticket
            .lookups
            .iter()
            .filter_map(|i| work.records.get(*i).map(|r| r.position.clone()))
            .collect();
        if !positions.is_empty() {
            let c = &self.common;
            let seen = retry_temporary(&c.retry, "dedup check", || {
                self.store
                    .seen_positions(&c.pipeline, &ticket.partition, &positions)
            })
            .await?;
            let skip = ticket
                .lookups
                .iter()
                .zip(seen)
                .filter(|(_, s)| *s)
                .map(|(i, _)| *i);
            drop_seen(c, &mut work.records, skip);
        }
        self.inner.call(ticket, work).await
    }
}

/// Removes the records at `skip` (ascending indices) and counts them as dedup hits.
fn drop_seen(common: &Common, records: &mut Vec<Record>, skip: impl Iterator<Item = usize>) {
    let mut skip = skip.peekable();
    if skip.peek().is_none() {
        return;
    }
    let before = records.len();
    let mut i = 0;
    records.retain(|_| {
        let drop = skip.next_if_eq(&i).is_some();
        i += 1;
        !drop
    });
    let hits = (before - records.len()) as u64;
    Stats::add(&common.stats.dedup_hits, hits);
    common.metrics.dedup_hits.increment(hits);
}

/// The batch's runs of consecutive deliveries, as position ranges: each sequence range of
/// the ticket covers the same number of records, in order.
fn runs(ticket: &Ticket, records: &[Record]) -> Vec<PositionRange> {
    let mut out = Vec::with_capacity(ticket.seqs.ranges().len());
    let mut offset = 0usize;
    for seqs in ticket.seqs.ranges() {
        let len = usize::try_from(seqs.end - seqs.start).unwrap_or(usize::MAX);
        let last = offset.saturating_add(len).saturating_sub(1);
        if let (Some(first), Some(last)) = (records.get(offset), records.get(last)) {
            out.push(PositionRange {
                partition: ticket.partition.clone(),
                first: first.position.clone(),
                last: last.position.clone(),
            });
        }
        offset = offset.saturating_add(len);
    }
    out
}

/// After the write: poison records to the dead-letter sink, to the source's own dead-letter
/// route, or a fatal error when there is neither.
struct DeadLetters {
    common: Arc<Common>,
    dead_letter: Option<Arc<dyn Sink>>,
    /// The source dead-letters on its broker (RabbitMQ's dead-letter exchange).
    native: bool,
    /// Dead-lettered records are marked by key (not positional dedup).
    mark_keys: bool,
    inner: Arc<dyn Layer>,
}

#[async_trait]
impl Layer for DeadLetters {
    async fn call(&self, ticket: &Ticket, work: &mut Work) -> Result<(), Error> {
        self.inner.call(ticket, work).await?;
        if work.dead.is_empty() {
            return Ok(());
        }
        let dead = std::mem::take(&mut work.dead);
        let n = dead.len() as u64;
        for (r, e) in &dead {
            tracing::warn!(partition = %r.partition, position = %r.position, error = %e, "dead-lettering a record");
        }
        if let Some(sink) = &self.dead_letter {
            if self.mark_keys {
                work.marks
                    .extend(dead.iter().filter_map(|(r, _)| r.idempotency_key.clone()));
            }
            self.send(&**sink, dead, work).await?;
        } else if self.native {
            work.rejects = dead;
        } else {
            let Some((r, e)) = dead.into_iter().next() else {
                return Ok(());
            };
            return Err(Error::fatal("a poison record needs a dead-letter destination")
                .with_context("partition", &r.partition)
                .with_context("position", &r.position)
                .with_context("error", e)
                .with_hint("configure a dead-letter sink (`Pipeline::builder(..).dead_letter(..)` or `dead_letter` in the config)"));
        }
        Stats::add(&self.common.stats.dead_lettered, n);
        self.common.metrics.dead_letters.increment(n);
        Ok(())
    }
}

impl DeadLetters {
    /// Writes the dead letters, with retries; one it refuses stops the pipeline.
    async fn send(
        &self,
        sink: &dyn Sink,
        dead: Vec<(Record, Error)>,
        work: &mut Work,
    ) -> Result<(), Error> {
        let letters: Vec<Record> = dead
            .into_iter()
            .map(|(r, e)| dead_letter_record(r, &e))
            .collect();
        let mode = WriteMode {
            transactional: false,
            collect_marks: false,
        };
        let res = write_with_retry(&self.common, sink, letters, mode).await?;
        work.throttled |= res.throttled;
        if let Some((_, e)) = res.dead.into_iter().next() {
            return Err(Error::fatal("the dead-letter sink refused a record")
                .with_context("error", e)
                .with_hint("check the dead-letter destination; the record is not acknowledged"));
        }
        Ok(())
    }
}

/// Outermost: hands the batch's marks to the marker (transactional sinks marked them in their
/// own transaction). The batch is acknowledged once they are durable; the worker does not
/// wait, so the lane can send its next batch meanwhile.
struct Marks {
    marker: mpsc::UnboundedSender<MarkRequest>,
    inner: Arc<dyn Layer>,
}

#[async_trait]
impl Layer for Marks {
    async fn call(&self, ticket: &Ticket, work: &mut Work) -> Result<(), Error> {
        self.inner.call(ticket, work).await?;
        if work.marks.is_empty() && work.ranges.is_empty() {
            return Ok(());
        }
        let (done, pending) = oneshot::channel();
        self.marker
            .send(MarkRequest {
                keys: std::mem::take(&mut work.marks),
                ranges: std::mem::take(&mut work.ranges),
                done,
            })
            .map_err(|_| Error::fatal("the dedup marker stopped"))?;
        work.marks_pending = Some(pending);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::SeqRanges;
    use flowgate_core::PartitionId;
    use std::time::Instant;

    fn ticket(seqs: &[u64]) -> Ticket {
        let mut ranges = SeqRanges::default();
        for s in seqs {
            ranges.push(*s);
        }
        Ticket {
            partition: PartitionId::new("p"),
            incarnation: 1,
            lane: 0,
            seqs: ranges,
            lookups: Vec::new(),
            bytes: 0,
            started: Instant::now(),
        }
    }

    fn record(position: u64) -> Record {
        Record::new(PartitionId::new("p"), Position::from(position), "x")
    }

    #[test]
    fn runs_follow_consecutive_deliveries() {
        let t = ticket(&[0, 1, 2, 5, 6, 9]);
        let records: Vec<Record> = [10u64, 11, 12, 20, 21, 30]
            .into_iter()
            .map(record)
            .collect();
        let got: Vec<(Position, Position)> = runs(&t, &records)
            .into_iter()
            .map(|r| (r.first, r.last))
            .collect();
        let want: Vec<(Position, Position)> = [(10u64, 12u64), (20, 21), (30, 30)]
            .into_iter()
            .map(|(a, b)| (Position::from(a), Position::from(b)))
            .collect();
        assert_eq!(got, want);
    }
}
