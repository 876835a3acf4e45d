//! A batch's trip to the sink.
//!
//! The coordinator hands a worker a [`Batch`]: the records of one lane of one partition and
//! their [`Ticket`]. The worker runs the records through the pipeline's layers, built once
//! (see [`Workers::new`]) and each wrapping the next as a sink wrapper does:
//!
//! ```text
//! marks ─▶ dead letters ─▶ dedup check ─▶ transform ─▶ sink write (with retries)
//! ```
//!
//! and sends the ticket back in one [`Completion`]. A batch whose dedup marks are still being
//! written comes back with the pending write: its lane is free at once, its records are
//! acknowledged once the marks are durable.

mod layers;
mod marker;
mod write;

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_core::{DedupStore, Error, PartitionId, Record, Sink};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::settings::RetrySettings;
use crate::stats::Stats;

pub(crate) use marker::{MarkRequest, marker_task};

/// A boxed future, as returned by transforms.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An async record transform: `Ok(Some(r))` passes `r` on, `Ok(None)` filters the record out
/// (it is acknowledged), `Err` with kind `Poison` dead-letters it, temporary errors are
/// retried, other errors stop the pipeline.
pub type TransformFn =
    Arc<dyn Fn(Record) -> BoxFuture<Result<Option<Record>, Error>> + Send + Sync>;

/// Sequence numbers as ranges of consecutive deliveries (one range for a lane that holds a
/// whole partition, several when lanes split it by key).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SeqRanges(Vec<Range<u64>>);

impl SeqRanges {
    /// Appends `seq`, extending the last range when it follows it.
    pub(crate) fn push(&mut self, seq: u64) {
        match self.0.last_mut() {
            Some(last) if last.end == seq => last.end += 1,
            _ => self.0.push(seq..seq + 1),
        }
    }

    /// The ranges, in delivery order.
    pub(crate) fn ranges(&self) -> &[Range<u64>] {
        &self.0
    }

    /// How many sequence numbers the ranges hold.
    pub(crate) fn count(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }
}

/// What identifies a batch to the coordinator, from dispatch to settlement.
pub(crate) struct Ticket {
    pub(crate) partition: PartitionId,
    pub(crate) incarnation: u64,
    pub(crate) lane: usize,
    pub(crate) seqs: SeqRanges,
    /// Positional dedup: indices of the records to look up in the store (the others are
    /// above anything marked; see `LookupFloor`).
    pub(crate) lookups: Vec<usize>,
    pub(crate) bytes: usize,
    /// When a worker took the batch up: the latency the concurrency control sees runs from
    /// here (the wait for a task to run it is not the sink's).
    pub(crate) started: Instant,
}

/// A batch of one lane of one partition.
pub(crate) struct Batch {
    pub(crate) ticket: Ticket,
    pub(crate) records: Vec<Record>,
}

/// What a worker sends back, once per batch.
pub(crate) struct Completion {
    pub(crate) ticket: Ticket,
    pub(crate) throttled: bool,
    /// Poison records the source must dead-letter on the broker before the batch is acked.
    pub(crate) rejects: Vec<(Record, Error)>,
    pub(crate) result: Result<(), Error>,
    /// The batch's dedup marks, still being written: the records are acknowledged when this
    /// answers `Ok`.
    pub(crate) marks: Option<oneshot::Receiver<Result<(), Error>>>,
}

/// What a pipeline's workers are built from.
pub(crate) struct WorkerConfig {
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
}

/// A pipeline's workers: the layers every batch goes through, and the channel back to the
/// coordinator.
pub(crate) struct Workers {
    chain: Arc<dyn layers::Layer>,
    events: mpsc::UnboundedSender<Completion>,
    /// The dedup store the layers check, if any.
    pub(crate) dedup: Option<Arc<dyn DedupStore>>,
    /// Dedup by position ranges (see [`WorkerConfig::positional`]).
    pub(crate) positional: bool,
    pub(crate) stats: Arc<Stats>,
    pub(crate) metrics: Metrics,
}

impl Workers {
    /// The layers `config` asks for, innermost first.
    pub(crate) fn new(config: WorkerConfig, events: mpsc::UnboundedSender<Completion>) -> Self {
        Workers {
            dedup: config.dedup.clone(),
            positional: config.positional,
            stats: config.stats.clone(),
            metrics: config.metrics.clone(),
            chain: layers::build(config),
            events,
        }
    }

    /// Runs `batch` on a task of its own.
    pub(crate) fn spawn(self: &Arc<Self>, batch: Batch) {
        tokio::spawn(run(self.clone(), batch));
    }
}

/// Sends a fatal completion if the worker panics, so the coordinator never waits forever.
struct PanicGuard {
    events: mpsc::UnboundedSender<Completion>,
    ticket: Option<Ticket>,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let _ = self.events.send(Completion {
                ticket,
                throttled: false,
                rejects: Vec::new(),
                result: Err(Error::fatal(
                    "a sink worker panicked; see the log for the panic message",
                )),
                marks: None,
            });
        }
    }
}

/// Runs one batch through the layers and sends its completion.
async fn run(workers: Arc<Workers>, batch: Batch) {
    let Batch {
        mut ticket,
        records,
    } = batch;
    ticket.started = Instant::now();
    let mut guard = PanicGuard {
        events: workers.events.clone(),
        ticket: Some(ticket),
    };
    let mut work = layers::Work::new(records);
    let result = match guard.ticket.as_ref() {
        Some(ticket) => workers.chain.call(ticket, &mut work).await,
        None => Ok(()),
    };
    let Some(ticket) = guard.ticket.take() else {
        return;
    };
    let _ = workers.events.send(Completion {
        ticket,
        throttled: work.throttled,
        rejects: work.rejects,
        result,
        marks: work.marks_pending,
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_ranges_merge_consecutive_numbers() {
        let mut s = SeqRanges::default();
        for seq in [4, 5, 6, 9, 10, 12] {
            s.push(seq);
        }
        assert_eq!(s.ranges(), &[4..7, 9..11, 12..13]);
        assert_eq!(s.count(), 6);
    }
}
