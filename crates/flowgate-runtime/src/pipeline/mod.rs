//! The pipeline: builder and coordinator.
//!
//! One coordinator task owns all per-partition state (queues, ack trackers, credit); sink
//! batches run as separate tasks and report back over a channel. Checkpoint writes run as a
//! separate task too, at most one at a time, each covering everything acknowledged before it
//! started. The order of durability is: sink confirms → dedup marks → checkpoint store →
//! broker commit.

use std::collections::{HashMap, VecDeque};

use futures_util::stream::FuturesUnordered;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flowgate_core::{
    Checkpoint, CheckpointStore, Credits, DedupStore, Error, PartitionId, Position, Record,
    Revocation, Sink, Source, SourceCapabilities, SourceEvent, StartPosition,
};
use tokio::sync::mpsc;

use crate::concurrency::Concurrency;
use crate::dedup::{KeyExtractor, LookupFloor};
use crate::metrics::{Metrics, PartitionMetrics};
use crate::progress::ProgressWindow;
use crate::settings::{RuntimeSettings, SinkOrdering};
use crate::shutdown::Shutdown;
use crate::stats::{Health, RunSummary, Stats};
use crate::tracker::AckTracker;
use crate::worker::{BoxFuture, Completion, TransformFn, WorkerConfig, Workers};

mod admission;
mod commits;
mod dispatch;
mod health;
mod lag;
mod lane;
mod partitions;
mod run;
mod setup;

use health::HealthTracker;
use lane::Lane;
use run::Running;
use setup::{DedupMode, batch_limits, checkpoint_store, dedup_mode, spawn_marker};

/// Builds a [`Pipeline`]: source → optional transform → sink, with optional dead-letter sink,
/// checkpoint store and dedup store.
pub struct PipelineBuilder {
    name: String,
    source: Option<Box<dyn Source>>,
    sink: Option<Arc<dyn Sink>>,
    dead_letter: Option<Arc<dyn Sink>>,
    store: Option<Arc<dyn CheckpointStore>>,
    dedup: Option<(Arc<dyn DedupStore>, KeyExtractor)>,
    transform: Option<TransformFn>,
    settings: RuntimeSettings,
}

impl PipelineBuilder {
    /// The source.
    pub fn source(mut self, source: impl Source + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The sink.
    pub fn sink(mut self, sink: impl Sink + 'static) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// Where poison records go (with the error attached as headers).
    pub fn dead_letter(mut self, sink: impl Sink + 'static) -> Self {
        self.dead_letter = Some(Arc::new(sink));
        self
    }

    /// The durable checkpoint store. Without one, positions are committed to the broker only.
    pub fn checkpoint_store(mut self, store: Arc<dyn CheckpointStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Deduplicate by idempotency key: check before the sink, mark right after it confirms.
    pub fn dedup(mut self, store: Arc<dyn DedupStore>, extractor: KeyExtractor) -> Self {
        self.dedup = Some((store, extractor));
        self
    }

    /// An async transform applied to every record before the sink.
    pub fn transform<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Record) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Option<Record>, Error>> + Send + 'static,
    {
        self.transform = Some(Arc::new(move |r| -> BoxFuture<_> { Box::pin(f(r)) }));
        self
    }

    /// Runtime settings.
    pub fn settings(mut self, settings: RuntimeSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Checks the pieces and settings.
    pub fn build(self) -> Result<Pipeline, Error> {
        self.settings.validate()?;
        if self.name.is_empty() {
            return Err(
                Error::config("the pipeline needs a non-empty name").with_context("key", "name")
            );
        }
        let source = self.source.ok_or_else(|| {
            Error::config("the pipeline has no source").with_context("key", "source")
        })?;
        let sink = self
            .sink
            .ok_or_else(|| Error::config("the pipeline has no sink").with_context("key", "sink"))?;
        Ok(Pipeline {
            name: self.name,
            source,
            sink,
            dead_letter: self.dead_letter,
            store: self.store,
            dedup: self.dedup,
            transform: self.transform,
            settings: self.settings,
            stats: Arc::new(Stats::default()),
        })
    }
}

/// A runnable pipeline. See [`Pipeline::builder`].
pub struct Pipeline {
    name: String,
    source: Box<dyn Source>,
    sink: Arc<dyn Sink>,
    dead_letter: Option<Arc<dyn Sink>>,
    store: Option<Arc<dyn CheckpointStore>>,
    dedup: Option<(Arc<dyn DedupStore>, KeyExtractor)>,
    transform: Option<TransformFn>,
    settings: RuntimeSettings,
    stats: Arc<Stats>,
}

impl Pipeline {
    /// Starts building a pipeline. The name namespaces its checkpoints and dedup marks.
    pub fn builder(name: impl Into<String>) -> PipelineBuilder {
        PipelineBuilder {
            name: name.into(),
            source: None,
            sink: None,
            dead_letter: None,
            store: None,
            dedup: None,
            transform: None,
            settings: RuntimeSettings::default(),
        }
    }

    /// Live statistics and health; keep the `Arc` to watch the pipeline while it runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs until the source ends, `shutdown` fires, or a fatal error. Always drains
    /// (bounded by `drain_timeout`) and writes the final checkpoint before returning.
    pub async fn run(self, shutdown: Shutdown) -> Result<RunSummary, Error> {
        let started = Instant::now();
        let (mut st, mut run) = self.prepare()?;
        let marker = run.marker.take();
        let result = match st.open(&mut run.source, run.credits.clone()).await {
            Ok(()) => {
                let commit_task = st.turn(&mut run, shutdown).await;
                st.shut_down(run, commit_task, started).await
            }
            Err(e) => Err(e),
        };
        // The state holds the last sender of the dedup marker's channel: once it is gone the
        // marker ends and lets go of the store, so the caller may reopen it at once.
        drop(st);
        if let Some(marker) = marker {
            let _ = tokio::time::timeout(Duration::from_secs(2), marker).await;
        }
        result
    }

    /// The coordinator's state from the builder's parts, checking how they fit together.
    fn prepare(self) -> Result<(State, Running), Error> {
        let Pipeline {
            name,
            source,
            sink,
            dead_letter,
            store,
            dedup,
            transform,
            settings,
            stats,
        } = self;
        let caps = source.capabilities();
        let sink_caps = sink.capabilities();
        let metrics = Metrics::new(&name);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (dedup_store, extractor) = match dedup {
            Some((s, e)) => (Some(s), Some(e)),
            None => (None, None),
        };
        let store = checkpoint_store(store, &caps, &stats, &name);
        let (marker, marker_task) = match &dedup_store {
            Some(store) => {
                let (tx, task) = spawn_marker(store.clone(), &name, &settings, &stats);
                (Some(tx), Some(task))
            }
            None => (None, None),
        };
        let DedupMode {
            transactional,
            positional,
            extractor,
        } = dedup_mode(&name, &caps, &sink_caps, dedup_store.as_ref(), extractor)?;
        let workers = Workers::new(
            WorkerConfig {
                pipeline: name.clone(),
                sink: sink.clone(),
                transactional,
                dead_letter: dead_letter.clone(),
                native_dead_letter: caps.native_dead_letter,
                dedup: dedup_store,
                positional,
                marker,
                transform,
                retry: settings.retry.clone(),
                dedup_ttl: settings.dedup_ttl,
                stats: stats.clone(),
                metrics: metrics.clone(),
            },
            events_tx,
        );
        let limits = batch_limits(&sink_caps, &settings);
        let state = State::new(name, settings, caps, workers, store, extractor, limits);
        let running = Running {
            source,
            events: events_rx,
            sink,
            dead_letter,
            credits: state.credits.clone(),
            marker: marker_task,
        };
        Ok((state, running))
    }
}

type CommitOutput = (Vec<Checkpoint>, Result<(), Error>, Instant);
type CommitResult = Result<CommitOutput, tokio::task::JoinError>;

/// A written batch waiting for its dedup marks. `Sync` because the coordinator's state is
/// borrowed across awaits of the pipeline's future.
type Settling = std::pin::Pin<Box<dyn std::future::Future<Output = Completion> + Send + Sync>>;

struct Part {
    incarnation: u64,
    fence: Option<u64>,
    lanes: Vec<Lane>,
    tracker: AckTracker,
    revoking: bool,
    /// The source's last lag reading.
    lag: Option<u64>,
    /// Samples of the last `health.lag_window`: rate, lag seconds, status.
    progress: ProgressWindow,
    metrics: Option<PartitionMetrics>,
    /// Which records positional dedup looks up.
    lookup: LookupFloor,
    /// Batches sent and not yet settled (their dedup marks durable, their records acked).
    unsettled: usize,
    /// Checkpoints being written: the position and the tracker's prefix end when it was taken.
    commit_marks: VecDeque<(Position, u64)>,
    /// The tracker's prefix end at the last checkpoint written: records received since are
    /// not committed yet and count as lag.
    committed_seq: u64,
}

impl Part {
    /// Records received and not yet covered by a written checkpoint (in flight, or confirmed
    /// and waiting for the next checkpoint).
    fn uncommitted(&self) -> u64 {
        (self.tracker.prefix_end() + self.tracker.pending() as u64)
            .saturating_sub(self.committed_seq)
    }
}

struct PendingRevoke {
    revocation: Revocation,
    deadline: Instant,
}

/// How often each partition's progress window takes a sample.
const PROGRESS_SAMPLE_EVERY: Duration = Duration::from_secs(1);

struct State {
    name: String,
    settings: RuntimeSettings,
    caps: SourceCapabilities,
    workers: Arc<Workers>,
    /// Batches written whose dedup marks are still being made durable.
    settling: FuturesUnordered<Settling>,
    store: Option<Arc<dyn CheckpointStore>>,
    extractor: Option<KeyExtractor>,
    credits: Credits,
    partitions: HashMap<PartitionId, Part>,
    order: Vec<PartitionId>,
    /// The partition dispatch starts from next (round robin over `order`).
    next_partition: usize,
    next_incarnation: u64,
    bytes: usize,
    batches_in_flight: usize,
    concurrency: Concurrency,
    uncommitted: u64,
    force_commit: bool,
    last_commit_at: Instant,
    /// When the partitions' progress windows last took a sample.
    last_sample_at: Instant,
    revokes: Vec<PendingRevoke>,
    /// Batches of removed incarnations (lost partitions, drains past their deadline) still
    /// running: their dedup marks may land after a new incarnation read the last mark.
    lingering: HashMap<PartitionId, usize>,
    drain_deadline: Option<Instant>,
    source_done: bool,
    fatal: Option<Error>,
    stats: Arc<Stats>,
    metrics: Metrics,
    max_batch_records: usize,
    max_batch_bytes: usize,
    health: HealthTracker,
    /// Last checkpoint written per partition.
    committed: HashMap<PartitionId, Checkpoint>,
}

impl State {
    /// A coordinator that owns no partition yet.
    fn new(
        name: String,
        settings: RuntimeSettings,
        caps: SourceCapabilities,
        workers: Workers,
        store: Option<Arc<dyn CheckpointStore>>,
        extractor: Option<KeyExtractor>,
        (max_batch_records, max_batch_bytes): (usize, usize),
    ) -> Self {
        let stats = workers.stats.clone();
        let metrics = workers.metrics.clone();
        let concurrency = Concurrency::new(&settings.concurrency);
        stats.set_health(Health::Starting);
        stats
            .concurrency
            .store(concurrency.limit() as u64, Ordering::Relaxed);
        State {
            concurrency,
            name,
            settings,
            caps,
            workers: Arc::new(workers),
            settling: FuturesUnordered::new(),
            store,
            extractor,
            credits: Credits::new(),
            partitions: HashMap::new(),
            order: Vec::new(),
            next_partition: 0,
            next_incarnation: 1,
            bytes: 0,
            batches_in_flight: 0,
            uncommitted: 0,
            force_commit: false,
            last_commit_at: Instant::now(),
            last_sample_at: Instant::now(),
            revokes: Vec::new(),
            lingering: HashMap::new(),
            drain_deadline: None,
            source_done: false,
            fatal: None,
            stats,
            metrics,
            max_batch_records,
            max_batch_bytes,
            health: HealthTracker::new(),
            committed: HashMap::new(),
        }
    }

    fn fail(&mut self, e: Error) {
        tracing::error!(pipeline = %self.name, error = %e, "fatal error: draining in-flight records and stopping");
        if self.fatal.is_none() {
            self.fatal = Some(e);
        }
        self.begin_drain(Instant::now());
    }

    fn begin_drain(&mut self, now: Instant) {
        if self.drain_deadline.is_none() {
            self.drain_deadline = Some(now + self.settings.drain_timeout);
        }
    }

    fn drain_complete(&self, now: Instant) -> bool {
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        if self.batches_in_flight == 0 {
            let queued = self
                .partitions
                .values()
                .any(|p| p.lanes.iter().any(|l| !l.is_empty()));
            if self.fatal.is_some() || !queued {
                return true;
            }
        }
        if now >= deadline {
            tracing::warn!(pipeline = %self.name, batches = self.batches_in_flight, "drain timeout reached; unfinished records will be redelivered");
            return true;
        }
        false
    }

    /// How long a partial batch waits for more records. Zero for a source whose broker credit
    /// is tied to acknowledgements (RabbitMQ prefetch): no more records come until these are
    /// acknowledged, so waiting only stalls the flow.
    fn linger(&self) -> Duration {
        if self.caps.eager_commit {
            Duration::ZERO
        } else {
            self.settings.batch.linger
        }
    }

    /// When the loop must wake without an event: a lane's linger ending, a checkpoint
    /// falling due (only while no write is in flight: its completion wakes the loop, and a
    /// past deadline meanwhile would spin it), a revocation or drain deadline.
    fn next_deadline(&self, now: Instant, commit_idle: bool) -> Instant {
        let mut d = now + Duration::from_secs(1);
        let linger = self.linger();
        for p in self.partitions.values() {
            for l in &p.lanes {
                if let Some(t) = l.first_at {
                    if l.busy == 0 || self.settings.ordering == SinkOrdering::Unordered {
                        d = d.min(t + linger);
                    }
                }
            }
        }
        if commit_idle {
            if self.uncommitted >= self.settings.commit.every_records {
                d = d.min(self.last_commit_at + self.settings.commit.min_interval);
            } else if self.uncommitted > 0 {
                d = d.min(self.last_commit_at + self.settings.commit.every);
            }
        }
        for r in &self.revokes {
            d = d.min(r.deadline);
        }
        if let Some(dd) = self.drain_deadline {
            d = d.min(dd);
        }
        d.max(now)
    }

    // ---- source events ---------------------------------------------------------------

    async fn on_source_event(&mut self, ev: SourceEvent, source: &mut Box<dyn Source>) {
        match ev {
            SourceEvent::Records(records) => self.ingest(records),
            SourceEvent::Assigned(assignments) => {
                if let Err(e) = self.assign(assignments, source).await {
                    self.fail(e);
                }
            }
            SourceEvent::Revoked(rev) => self.revoke(rev),
            SourceEvent::Lag(samples) => self.on_lag(samples),
            SourceEvent::Connection(c) => self.on_connection(c, Instant::now()),
            SourceEvent::End => {
                tracing::info!(pipeline = %self.name, "source ended: draining");
                self.source_done = true;
                self.begin_drain(Instant::now());
            }
        }
    }

    // ---- dispatch --------------------------------------------------------------------

    // ---- completions -----------------------------------------------------------------

    // ---- commits ---------------------------------------------------------------------

    // ---- health ----------------------------------------------------------------------
}

/// A position helper for sources that resume "after" a position.
pub fn resume_after(start: &StartPosition) -> Option<Position> {
    start.after.as_ref().map(Position::successor)
}
