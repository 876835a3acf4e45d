//! The pipeline: builder and coordinator.
//!
//! One coordinator task owns all per-partition state (queues, ack trackers, credit); sink
//! batches run as separate tasks and report back over a channel. Checkpoint writes run as a
//! separate task too, at most one at a time, each covering everything acknowledged before it
//! started. The order of durability is: sink confirms → dedup marks → checkpoint store →
//! broker commit.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_core::{
    Assignment, Checkpoint, CheckpointStore, Connection, Credits, DedupStore, Error, ErrorKind,
    LagSample, LagUnit, PartitionId, Position, Record, Revocation, Sink, Source,
    SourceCapabilities, SourceContext, SourceEvent, StartPosition,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::aimd::Concurrency;
use crate::dedup::{KeyExtractor, LookupFloor};
use crate::metrics::{Metrics, PartitionMetrics};
use crate::progress::{ProgressWindow, Sample};
use crate::settings::{Ordering, OverflowPolicy, RuntimeSettings};
use crate::shutdown::Shutdown;
use crate::stats::{Health, PartitionStatus, RunSummary, Stats};
use crate::tracker::AckTracker;
use crate::worker::{self, Batch, BoxFuture, Completion, Shared, TransformFn, WorkerEvent};

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
        let Pipeline {
            name,
            mut source,
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
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let (dedup_store, extractor) = match dedup {
            Some((s, e)) => (Some(s), Some(e)),
            None => (None, None),
        };
        // A source that cannot start from a position (a RabbitMQ queue) has positions that
        // mean nothing to a later process: its broker keeps the progress (acks), so nothing
        // is written to the checkpoint store for it.
        // Every answer of the store tells the pipeline's health whether it can be reached.
        let store = store.map(|inner| -> Arc<dyn CheckpointStore> {
            Arc::new(WatchedStore {
                inner,
                stats: stats.clone(),
            })
        });
        let store = if caps.replayable {
            store
        } else {
            if store.is_some() {
                tracing::info!(pipeline = %name, "the source is not replayable (its broker keeps the progress): the checkpoint store is not used");
            }
            None
        };
        if matches!(extractor, Some(KeyExtractor::SourcePosition)) && !caps.replayable {
            return Err(Error::config(
                "dedup by source position needs a replayable source: this source's positions change when a record is redelivered",
            )
            .with_context("key", "dedup.key")
            .with_hint("deduplicate by a message id instead (RabbitMQ queues: the AMQP message_id is the idempotency key; `key = \"key\"` or `header:NAME` uses it)"));
        }
        let marker = dedup_store.as_ref().map(|store| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(worker::marker_task(
                store.clone(),
                name.clone(),
                settings.dedup_ttl,
                (settings.dedup_mark_interval, stats.clone()),
                settings.retry.clone(),
                rx,
            ));
            tx
        });
        let transactional = sink_caps.transactional && dedup_store.is_some();
        let positional = matches!(extractor, Some(KeyExtractor::SourcePosition))
            && dedup_store
                .as_ref()
                .is_some_and(|s| s.supports_position_ranges())
            && !transactional;
        // With positional marks the key is only materialised for sinks that forward it.
        let extractor = if positional && !sink_caps.forwards_idempotency_key {
            None
        } else {
            extractor
        };
        if sink_caps.transactional && dedup_store.is_none() {
            tracing::warn!(pipeline = %name, "the sink is transactional but no dedup store is configured: writes are at-least-once");
        }
        let shared = Arc::new(Shared {
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
            events: events_tx,
        });
        let credits = Credits::new();
        let max_batch_records = sink_caps
            .max_batch_records
            .map_or(settings.batch.max_records, |m| {
                m.min(settings.batch.max_records)
            })
            .max(1);
        let max_batch_bytes = sink_caps
            .max_batch_bytes
            .map_or(settings.batch.max_bytes, |m| {
                m.min(settings.batch.max_bytes)
            })
            .max(1);
        let mut st = State {
            concurrency: Concurrency::new(&settings.concurrency),
            name: name.clone(),
            settings,
            caps: caps.clone(),
            shared,
            store,
            extractor,
            credits: credits.clone(),
            partitions: HashMap::new(),
            order: Vec::new(),
            rr: 0,
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
            stats: stats.clone(),
            metrics,
            max_batch_records,
            max_batch_bytes,
            health: HealthTracker::new(),
            committed: HashMap::new(),
        };
        stats.set_health(Health::Starting);
        stats.concurrency.store(
            st.concurrency.limit() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );

        // Open the source, retrying transient failures.
        let retry = st.settings.retry.clone();
        let ctx = SourceContext::new(name.clone(), credits)
            .with_max_in_flight_per_partition(st.settings.max_in_flight_per_partition);
        let mut backoff = retry.policy().start();
        loop {
            match source.open(ctx.clone()).await {
                Ok(()) => break,
                Err(e) if e.is_temporary() => match backoff.next_delay() {
                    Some(delay) => {
                        tracing::warn!(pipeline = %name, error = %e, ?delay, attempt = backoff.attempts(), "cannot open the source, retrying");
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(e.with_context("while", "opening the source")),
                },
                Err(e) => return Err(e.with_context("while", "opening the source")),
            }
        }
        stats.set_health(Health::Healthy);
        // Connected until a source or store answer says otherwise.
        st.metrics.source_connected.set(1.0);
        st.metrics.store_connected.set(1.0);
        tracing::info!(pipeline = %name, store = st.store.as_ref().map(|s| s.describe()), "pipeline started");

        let mut shutdown = shutdown;
        let mut shutdown_fired = false;
        let mut commit_task: Option<JoinHandle<CommitOutput>> = None;
        let tick = Duration::from_millis(250);
        let mut next_tick = Instant::now() + tick;

        loop {
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + tick;
                st.on_tick(now);
            }
            st.dispatch(now);
            if commit_task.is_none() {
                commit_task = st.maybe_start_commit(now, &mut source).await;
            }
            if st.finish_revokes(now, &mut commit_task, &mut source).await {
                continue;
            }
            if st.drain_complete(now) {
                break;
            }
            let want_source = !st.source_done && st.drain_deadline.is_none();
            let deadline = st.next_deadline(now, commit_task.is_none()).min(next_tick);
            tokio::select! {
                biased;
                Some(ev) = events_rx.recv() => {
                    st.on_worker_event(ev, &mut source).await;
                    // Amortise: take whatever else is ready.
                    while let Ok(ev) = events_rx.try_recv() {
                        st.on_worker_event(ev, &mut source).await;
                    }
                }
                res = async { commit_task.as_mut().expect("guarded").await }, if commit_task.is_some() => {
                    commit_task = None;
                    st.on_commit_done(res, &mut source).await;
                }
                _ = &mut shutdown, if !shutdown_fired => {
                    shutdown_fired = true;
                    tracing::info!(pipeline = %st.name, "shutdown requested: draining");
                    st.begin_drain(Instant::now());
                }
                ev = source.next(), if want_source => {
                    match ev {
                        Ok(ev) => st.on_source_event(ev, &mut source).await,
                        Err(e) if e.is_temporary() => {
                            tracing::warn!(pipeline = %st.name, error = %e, "source error, retrying");
                            tokio::time::sleep(st.settings.retry.initial_backoff).await;
                        }
                        Err(e) => st.fail(e),
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }

        // Final checkpoint.
        if let Some(task) = commit_task.take() {
            let res = task.await;
            st.on_commit_done(res, &mut source).await;
        }
        let flush = sink.flush().await;
        if let Err(e) = flush {
            st.fail(e);
        }
        if let Err(e) = st
            .commit_now(&mut source, st.partitions.keys().cloned().collect())
            .await
        {
            st.fail(e);
        }
        let close_timeout = Duration::from_secs(30);
        match tokio::time::timeout(close_timeout, source.close()).await {
            Ok(Err(e)) => {
                tracing::warn!(pipeline = %st.name, error = %e, "closing the source failed")
            }
            Err(_) => {
                tracing::warn!(pipeline = %st.name, "closing the source took longer than {close_timeout:?}; abandoned")
            }
            Ok(Ok(())) => {}
        }
        for s in std::iter::once(&sink).chain(dead_letter.as_ref()) {
            if let Ok(Err(e)) = tokio::time::timeout(close_timeout, s.close()).await {
                tracing::warn!(pipeline = %st.name, error = %e, "closing a sink failed");
            }
        }
        stats.set_health(Health::Stopped);
        let drained = st.partitions.values().all(|p| p.tracker.pending() == 0);
        let mut checkpoints: Vec<Checkpoint> = st.committed.values().cloned().collect();
        checkpoints.sort_by(|a, b| a.partition.cmp(&b.partition));
        let summary = RunSummary {
            pipeline: st.name.clone(),
            elapsed: started.elapsed(),
            stats: stats.snapshot(),
            checkpoints,
            drained,
        };
        tracing::info!(pipeline = %st.name, "{summary}");
        match st.fatal.take() {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

type CommitOutput = (Vec<Checkpoint>, Result<(), Error>, Instant);
type CommitResult = Result<CommitOutput, tokio::task::JoinError>;

struct Lane {
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    busy: usize,
    first_at: Option<Instant>,
}

struct Queued {
    seq: u64,
    record: Record,
    size: usize,
    /// Positional dedup looks this record up in the store (see [`LookupFloor`]).
    lookup: bool,
}

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

struct HealthTracker {
    last_acked: u64,
    last_progress_at: Instant,
    lag_at_progress: u64,
    /// Set while the source reports its broker unreachable.
    disconnected: Option<Disconnected>,
    /// The checkpoint store's last answer was a temporary failure.
    store_down: bool,
}

/// A source that cannot reach its broker: since when, and when to warn again.
struct Disconnected {
    endpoint: String,
    cause: String,
    since: Instant,
    next_warning: Instant,
    warning_every: Duration,
}

/// The longest gap between two warnings about the same disconnection.
const MAX_DISCONNECT_WARNING_GAP: Duration = Duration::from_secs(30);

/// How often each partition's progress window takes a sample.
const PROGRESS_SAMPLE_EVERY: Duration = Duration::from_secs(1);

impl HealthTracker {
    fn new() -> Self {
        HealthTracker {
            last_acked: 0,
            last_progress_at: Instant::now(),
            lag_at_progress: 0,
            disconnected: None,
            store_down: false,
        }
    }
}

struct State {
    name: String,
    settings: RuntimeSettings,
    caps: SourceCapabilities,
    shared: Arc<Shared>,
    store: Option<Arc<dyn CheckpointStore>>,
    extractor: Option<KeyExtractor>,
    credits: Credits,
    partitions: HashMap<PartitionId, Part>,
    order: Vec<PartitionId>,
    rr: usize,
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
                .any(|p| p.lanes.iter().any(|l| !l.queue.is_empty()));
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
                    if l.busy == 0 || self.settings.ordering == Ordering::Unordered {
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

    async fn assign(
        &mut self,
        assignments: Vec<Assignment>,
        source: &mut Box<dyn Source>,
    ) -> Result<(), Error> {
        self.stats
            .rebalances
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.rebalances.increment(1);
        let stored: HashMap<PartitionId, Checkpoint> = match &self.store {
            Some(store) => {
                let pipeline = self.name.clone();
                worker::retry_temporary(&self.settings.retry, "checkpoint load", || {
                    store.load(&pipeline)
                })
                .await?
                .into_iter()
                .map(|c| (c.partition.clone(), c))
                .collect()
            }
            None => HashMap::new(),
        };
        let lanes = match self.settings.ordering {
            Ordering::Key => self.settings.key_lanes,
            _ => 1,
        };
        let unit = match self.caps.lag_unit {
            Some(LagUnit::Millis) => "millis",
            _ => "records",
        };
        let mut starts = Vec::with_capacity(assignments.len());
        // Stored checkpoints the broker does not know yet: committed to it right after the
        // start, so the broker's own tools (and lag exporters reading them) show the true lag
        // after any crash.
        let mut align = Vec::new();
        for mut a in assignments {
            let stored_fence = stored.get(&a.partition).and_then(|c| c.fence);
            if a.fence.is_some() && stored_fence > a.fence {
                // Only a reset of the broker's own epoch gets here (a Kafka group deleted and
                // created anew starts its generations again at 1): the broker says this worker
                // owns the partition now, so it takes the stored fence rather than having every
                // checkpoint refused.
                tracing::warn!(pipeline = %self.name, partition = %a.partition, stored = ?stored_fence, assigned = ?a.fence,
                    "the broker's ownership epoch is below the stored checkpoint's fence (was the consumer group deleted?); taking the stored fence");
                a.fence = stored_fence;
            }
            let from_store = stored.get(&a.partition).map(|c| c.position.clone());
            let after = match (&from_store, &a.broker_position) {
                (Some(s), Some(b)) if s != b => {
                    tracing::warn!(pipeline = %self.name, partition = %a.partition, checkpoint = %s, broker = %b,
                        "checkpoint store and broker disagree; the checkpoint store is the source of truth: committing its position to the broker");
                    align.push(Checkpoint::new(a.partition.clone(), s.clone()).with_fence(a.fence));
                    Some(s.clone())
                }
                (Some(s), None) if self.caps.broker_positions => {
                    tracing::info!(pipeline = %self.name, partition = %a.partition, after = %s,
                        "starting after the stored checkpoint; the broker has no committed position: committing it there");
                    align.push(Checkpoint::new(a.partition.clone(), s.clone()).with_fence(a.fence));
                    Some(s.clone())
                }
                (Some(s), _) => {
                    tracing::info!(pipeline = %self.name, partition = %a.partition, after = %s, "starting after the stored checkpoint");
                    Some(s.clone())
                }
                (None, Some(b)) => {
                    tracing::info!(pipeline = %self.name, partition = %a.partition, after = %b, "no stored checkpoint; starting after the broker's committed position");
                    Some(b.clone())
                }
                (None, None) => {
                    tracing::info!(pipeline = %self.name, partition = %a.partition, "no checkpoint anywhere; starting at the source's configured default");
                    None
                }
            };
            let mut progress = ProgressWindow::new(
                self.settings.health.lag_window,
                self.settings.health.stall_window,
            );
            if let (Some(s), Some(b)) = (&from_store, &a.broker_position) {
                if s < b {
                    // Records the broker counts as consumed are read again.
                    progress.rewound(Instant::now());
                }
            }
            let mut tracker = AckTracker::new(0);
            tracker.set_initial(after.clone());
            if let Some(pos) = &after {
                self.committed.insert(
                    a.partition.clone(),
                    Checkpoint::new(a.partition.clone(), pos.clone()).with_fence(a.fence),
                );
            }
            let lookup = self.lookup_floor(&a.partition).await;
            let part = Part {
                incarnation: self.next_incarnation,
                fence: a.fence,
                lanes: (0..lanes)
                    .map(|_| Lane {
                        queue: VecDeque::new(),
                        queued_bytes: 0,
                        busy: 0,
                        first_at: None,
                    })
                    .collect(),
                tracker,
                revoking: false,
                lag: None,
                progress,
                metrics: Some(PartitionMetrics::new(
                    &self.name,
                    a.partition.as_str(),
                    unit,
                )),
                lookup,
                unsettled: 0,
                commit_marks: VecDeque::new(),
                committed_seq: 0,
            };
            self.next_incarnation += 1;
            if self.partitions.insert(a.partition.clone(), part).is_none() {
                self.order.push(a.partition.clone());
            }
            self.update_credit(&a.partition);
            starts.push(StartPosition {
                partition: a.partition,
                after,
            });
        }
        source.start(starts).await?;
        if !align.is_empty() {
            source.commit(&align).await?;
        }
        Ok(())
    }

    /// Where positional dedup starts looking records up for a newly assigned partition: at
    /// the store's last mark for it. Every record is looked up if the store cannot tell.
    async fn lookup_floor(&self, partition: &PartitionId) -> LookupFloor {
        let (Some(store), true) = (&self.shared.dedup, self.shared.positional) else {
            return LookupFloor::All;
        };
        if self.lingering.contains_key(partition) {
            // A batch of an earlier incarnation may still mark records after the read below.
            tracing::debug!(pipeline = %self.name, %partition, "batches of an earlier ownership still running: every record of the partition is looked up");
            return LookupFloor::All;
        }
        let res = worker::retry_temporary(&self.settings.retry, "dedup last mark", || {
            store.last_marked_position(&self.name, partition)
        })
        .await;
        match res {
            Ok(last) => {
                tracing::debug!(pipeline = %self.name, %partition, last_mark = ?last, "positional dedup looks up records at or below the last mark");
                LookupFloor::Through(last)
            }
            Err(e) => {
                if e.kind() != ErrorKind::Unsupported {
                    tracing::warn!(pipeline = %self.name, %partition, error = %e, "cannot read the last dedup mark; every record of the partition is looked up");
                }
                LookupFloor::All
            }
        }
    }

    fn revoke(&mut self, rev: Revocation) {
        self.stats
            .rebalances
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.rebalances.increment(1);
        for p in &rev.partitions {
            self.credits.remove(p);
            if let Some(part) = self.partitions.get_mut(p) {
                part.revoking = true;
                // Queued records were never sent: drop them; the next owner reads them again.
                for lane in &mut part.lanes {
                    self.bytes -= lane.queued_bytes;
                    lane.queued_bytes = 0;
                    lane.queue.clear();
                    lane.first_at = None;
                }
            }
        }
        self.publish_gauges();
        if rev.lost {
            tracing::warn!(pipeline = %self.name, partitions = ?rev.partitions, "partitions lost: in-flight results will be dropped, nothing committed");
            for p in &rev.partitions {
                self.remove_partition(p);
            }
            rev.complete(Vec::new());
        } else {
            let deadline = Instant::now() + self.settings.revoke_timeout;
            self.revokes.push(PendingRevoke {
                revocation: rev,
                deadline,
            });
        }
    }

    /// Completes revocations whose partitions have drained (or whose deadline passed).
    /// Returns true if it did something (the loop re-evaluates).
    async fn finish_revokes(
        &mut self,
        now: Instant,
        commit_task: &mut Option<JoinHandle<CommitOutput>>,
        source: &mut Box<dyn Source>,
    ) -> bool {
        let Some(idx) = self.revokes.iter().position(|r| {
            now >= r.deadline
                || r.revocation.partitions.iter().all(|p| {
                    self.partitions
                        .get(p)
                        .is_none_or(|part| part.unsettled == 0)
                })
        }) else {
            return false;
        };
        let pending = self.revokes.swap_remove(idx);
        if let Some(task) = commit_task.take() {
            let res = task.await;
            self.on_commit_done(res, source).await;
        }
        let partitions = pending.revocation.partitions.clone();
        if let Err(e) = self.write_checkpoints(partitions.clone()).await {
            self.fail(e);
        }
        // The source commits the final positions of revoked partitions itself.
        let finals: Vec<Checkpoint> = partitions
            .iter()
            .filter_map(|p| self.committed.get(p).cloned())
            .collect();
        for p in &partitions {
            self.remove_partition(p);
        }
        tracing::info!(pipeline = %self.name, partitions = ?partitions, "revocation drained");
        pending.revocation.complete(finals);
        true
    }

    fn remove_partition(&mut self, p: &PartitionId) {
        if let Some(part) = self.partitions.remove(p) {
            if part.unsettled > 0 {
                *self.lingering.entry(p.clone()).or_default() += part.unsettled;
            }
            let pending = part.tracker.pending() as u64;
            self.stats.in_flight.fetch_sub(
                pending.min(
                    self.stats
                        .in_flight
                        .load(std::sync::atomic::Ordering::Relaxed),
                ),
                std::sync::atomic::Ordering::Relaxed,
            );
            for lane in &part.lanes {
                self.bytes -= lane.queued_bytes;
            }
            // A revoked partition's gauges read nothing rather than its last value.
            if let Some(m) = &part.metrics {
                m.clear();
            }
        }
        self.order.retain(|x| x != p);
        self.committed.remove(p);
        self.credits.remove(p);
    }

    fn on_lag(&mut self, samples: Vec<LagSample>) {
        for s in samples {
            if let Some(part) = self.partitions.get_mut(&s.partition) {
                part.lag = Some(s.lag);
            }
        }
    }

    /// The source's own lag readings, summed (what it has not delivered yet).
    fn source_lag(&self) -> u64 {
        self.partitions.values().filter_map(|p| p.lag).sum()
    }

    /// Refreshes the per-partition view (`Stats::partitions`, `/status`), the per-partition
    /// gauges and the pipeline's lag: the distance from the committed position to the end.
    /// Adds a progress sample per partition once a second.
    fn publish_partitions(&mut self, now: Instant) {
        let millis = matches!(self.caps.lag_unit, Some(LagUnit::Millis));
        let sample = now.duration_since(self.last_sample_at) >= PROGRESS_SAMPLE_EVERY;
        if sample {
            self.last_sample_at = now;
        }
        let mut total = 0u64;
        let mut total_rate = 0.0;
        let mut view = Vec::with_capacity(self.order.len());
        for id in &self.order {
            let Some(part) = self.partitions.get_mut(id) else {
                continue;
            };
            let source_lag = part.lag;
            let uncommitted = part.uncommitted();
            let lag = if millis {
                source_lag
            } else {
                Some(source_lag.unwrap_or(0) + uncommitted)
            };
            if sample {
                let received = part.tracker.prefix_end() + part.tracker.pending() as u64;
                part.progress.push(Sample {
                    at: now,
                    lag: lag.unwrap_or(0),
                    end: received + if millis { 0 } else { source_lag.unwrap_or(0) },
                    committed: part.committed_seq,
                    waiting: uncommitted,
                });
            }
            let lag_rate = part.progress.rate();
            let status = part.progress.status(now);
            let catch_up_seconds = part.progress.catch_up_seconds();
            let lag_seconds = if millis {
                lag.map(|ms| ms as f64 / 1000.0)
            } else {
                part.progress.lag_seconds(now)
            };
            if let Some(m) = &part.metrics {
                if let Some(l) = lag {
                    m.lag.set(l as f64);
                }
                m.lag_rate.set(lag_rate);
                m.lag_seconds.set(lag_seconds.unwrap_or(0.0));
                m.catch_up.set(catch_up_seconds.unwrap_or(f64::INFINITY));
                m.status.set(f64::from(status.code()));
            }
            total += lag.unwrap_or(0);
            total_rate += lag_rate;
            view.push(PartitionStatus {
                partition: id.to_string(),
                checkpoint: self.committed.get(id).map(|c| c.position.to_string()),
                lag,
                lag_unit: if millis { "millis" } else { "records" },
                lag_seconds,
                source_lag,
                uncommitted,
                in_flight: part.tracker.pending() as u64,
                lag_rate,
                catch_up_seconds,
                status,
            });
        }
        self.stats
            .lag
            .store(total, std::sync::atomic::Ordering::Relaxed);
        self.stats.lag_rate_milli.store(
            (total_rate * 1000.0) as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.stats.set_partitions(view);
    }

    fn ingest(&mut self, records: Vec<Record>) {
        let n = records.len() as u64;
        Stats::add(&self.stats.records_in, n);
        self.metrics.records_in.increment(n);
        let now = Instant::now();
        let limit = self.settings.max_in_flight_per_partition;
        let budget = self.settings.max_buffer_bytes;
        let policy = self.settings.overflow;
        let lanes_mode = self.settings.ordering;
        let positional = self.shared.positional;
        let mut shed = 0u64;
        let mut touched: Vec<PartitionId> = Vec::new();
        let mut failed: Option<Error> = None;
        // Sources deliver runs of one partition: the partition is looked up once per run.
        let mut records = records.into_iter().peekable();
        'runs: while let Some(pid) = records.peek().map(|r| r.partition.clone()) {
            let run = std::iter::from_fn(|| records.next_if(|r| r.partition == pid));
            let Some(part) = self.partitions.get_mut(&pid) else {
                tracing::debug!(pipeline = %self.name, partition = %pid, "records for a partition not owned; dropped (they will be redelivered to its owner)");
                run.for_each(drop);
                continue;
            };
            touched.push(pid.clone());
            if part.revoking {
                run.for_each(drop);
                continue;
            }
            for mut r in run {
                if let Some(ex) = &self.extractor {
                    if r.idempotency_key.is_none() {
                        r.idempotency_key = ex.extract(&r);
                    }
                }
                let size = r.byte_size();
                if policy != OverflowPolicy::Block
                    && (part.tracker.pending() >= limit || self.bytes + size > budget)
                {
                    match policy {
                        OverflowPolicy::ShedNewest => {
                            let seq = part.tracker.push(r.position.clone());
                            part.tracker.ack(seq);
                            shed += 1;
                            continue;
                        }
                        OverflowPolicy::ShedOldest => {
                            // Drop the oldest record still queued (never one already sent).
                            let oldest = part
                                .lanes
                                .iter()
                                .enumerate()
                                .filter_map(|(i, l)| l.queue.front().map(|q| (q.seq, i)))
                                .min();
                            if let Some((_, li)) = oldest {
                                let lane = &mut part.lanes[li];
                                if let Some(q) = lane.queue.pop_front() {
                                    lane.queued_bytes -= q.size;
                                    self.bytes -= q.size;
                                    part.tracker.ack(q.seq);
                                    if lane.queue.is_empty() {
                                        lane.first_at = None;
                                    }
                                }
                            } else {
                                let seq = part.tracker.push(r.position.clone());
                                part.tracker.ack(seq);
                                shed += 1;
                                continue;
                            }
                            shed += 1;
                        }
                        OverflowPolicy::FailFast => {
                            failed = Some(Error::fatal("overflow: a partition is full and the overflow policy is fail_fast")
                                .with_context("partition", &r.partition)
                                .with_context("in_flight", part.tracker.pending())
                                .with_hint("raise `max_in_flight_per_partition` / `max_buffer_bytes`, speed up the sink, or use overflow = \"block\""));
                            break 'runs;
                        }
                        OverflowPolicy::Block => {}
                    }
                }
                let seq = part.tracker.push(r.position.clone());
                let lane_ix = match lanes_mode {
                    Ordering::Key => {
                        let mut h = DefaultHasher::new();
                        r.key.as_deref().unwrap_or(&[]).hash(&mut h);
                        (h.finish() % part.lanes.len() as u64) as usize
                    }
                    _ => 0,
                };
                let lookup = positional && part.lookup.lookup(&r.position);
                let lane = &mut part.lanes[lane_ix];
                if lane.queue.is_empty() {
                    lane.first_at = Some(now);
                }
                lane.queue.push_back(Queued {
                    seq,
                    record: r,
                    size,
                    lookup,
                });
                lane.queued_bytes += size;
                self.bytes += size;
            }
        }
        if let Some(e) = failed {
            self.fail(e);
            return;
        }
        if shed > 0 {
            Stats::add(&self.stats.shed, shed);
            self.metrics.shed.increment(shed);
        }
        for p in &touched {
            if let Some(part) = self.partitions.get_mut(p) {
                let advanced = part.tracker.take_advanced();
                self.uncommitted += advanced;
                Stats::add(&self.stats.records_acked, advanced);
                let pending = part.tracker.pending() as u64;
                Stats::peak(&self.stats.peak_partition_in_flight, pending);
            }
            self.update_credit(p);
        }
        self.publish_gauges();
    }

    fn update_credit(&mut self, p: &PartitionId) {
        let Some(part) = self.partitions.get(p) else {
            return;
        };
        let limit = self.settings.max_in_flight_per_partition;
        let credit = match self.settings.overflow {
            OverflowPolicy::Block => limit.saturating_sub(part.tracker.pending()),
            _ => limit,
        };
        self.credits.set(p, if part.revoking { 0 } else { credit });
    }

    fn publish_gauges(&mut self) {
        let in_flight: usize = self.partitions.values().map(|p| p.tracker.pending()).sum();
        self.stats
            .in_flight
            .store(in_flight as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats
            .buffer_bytes
            .store(self.bytes as u64, std::sync::atomic::Ordering::Relaxed);
        Stats::peak(&self.stats.peak_buffer_bytes, self.bytes as u64);
        self.metrics.in_flight.set(in_flight as f64);
        self.metrics.buffer_bytes.set(self.bytes as f64);
        let open = self.settings.overflow != OverflowPolicy::Block
            || self.bytes < self.settings.max_buffer_bytes;
        self.credits.set_open(open);
    }

    // ---- dispatch --------------------------------------------------------------------

    fn dispatch(&mut self, now: Instant) {
        let n = self.order.len();
        if n == 0 {
            return;
        }
        let limit = self.concurrency.limit();
        let linger = self.linger();
        let force = self.drain_deadline.is_some();
        let unordered = self.settings.ordering == Ordering::Unordered;
        if self.fatal.is_some() {
            return;
        }
        let start = self.rr;
        self.rr = (self.rr + 1) % n;
        for i in 0..n {
            if self.batches_in_flight >= limit {
                break;
            }
            let pid = self.order[(start + i) % n].clone();
            let Some(part) = self.partitions.get_mut(&pid) else {
                continue;
            };
            if part.revoking {
                continue;
            }
            for li in 0..part.lanes.len() {
                loop {
                    let lane = &mut part.lanes[li];
                    if lane.queue.is_empty()
                        || (lane.busy > 0 && !unordered)
                        || self.batches_in_flight >= limit
                    {
                        break;
                    }
                    let full = lane.queue.len() >= self.max_batch_records
                        || lane.queued_bytes >= self.max_batch_bytes;
                    let expired = lane
                        .first_at
                        .is_some_and(|t| now.duration_since(t) >= linger);
                    if !(full || expired || force) {
                        break;
                    }
                    // The batch: records from the front up to the record or byte limit
                    // (at least one), moved out of the queue once.
                    let mut take = 0;
                    let mut bytes = 0;
                    for q in &lane.queue {
                        if take > 0
                            && (take >= self.max_batch_records
                                || bytes + q.size > self.max_batch_bytes)
                        {
                            break;
                        }
                        take += 1;
                        bytes += q.size;
                    }
                    let mut records = Vec::with_capacity(take);
                    let mut seqs = Vec::with_capacity(take);
                    let mut lookups = Vec::new();
                    records.extend(lane.queue.drain(..take).enumerate().map(|(i, q)| {
                        if q.lookup {
                            lookups.push(i);
                        }
                        seqs.push(q.seq);
                        q.record
                    }));
                    lane.queued_bytes -= bytes;
                    lane.first_at = if lane.queue.is_empty() {
                        None
                    } else {
                        Some(now)
                    };
                    lane.busy += 1;
                    part.unsettled += 1;
                    self.batches_in_flight += 1;
                    let batch = Batch {
                        partition: pid.clone(),
                        incarnation: part.incarnation,
                        lane: li,
                        seqs,
                        records,
                        lookups,
                        bytes,
                    };
                    tokio::spawn(worker::run(self.shared.clone(), batch));
                }
            }
        }
        Stats::peak(
            &self.stats.peak_batches_in_flight,
            self.batches_in_flight as u64,
        );
    }

    // ---- completions -----------------------------------------------------------------

    async fn on_worker_event(&mut self, ev: WorkerEvent, source: &mut Box<dyn Source>) {
        match ev {
            WorkerEvent::LaneFree {
                partition,
                incarnation,
                lane,
            } => {
                if let Some(part) = self.partitions.get_mut(&partition) {
                    if part.incarnation == incarnation {
                        if let Some(l) = part.lanes.get_mut(lane) {
                            l.busy = l.busy.saturating_sub(1);
                        }
                    }
                }
            }
            WorkerEvent::Done(c) => self.on_completion(c, source).await,
        }
    }

    async fn on_completion(&mut self, c: Completion, source: &mut Box<dyn Source>) {
        let Completion {
            partition,
            incarnation,
            lane,
            lane_released,
            seqs,
            bytes,
            latency,
            throttled,
            rejects,
            result,
        } = c;
        self.batches_in_flight -= 1;
        self.bytes -= bytes;
        self.concurrency
            .on_batch(latency, throttled, Instant::now());
        let limit = self.concurrency.limit() as u64;
        self.stats
            .concurrency
            .store(limit, std::sync::atomic::Ordering::Relaxed);
        self.metrics.concurrency.set(limit as f64);
        if let Err(e) = result {
            self.fail(e.with_context("partition", &partition));
            self.publish_gauges();
            return;
        }
        for (r, e) in &rejects {
            if let Err(err) = source.reject(r, e).await {
                self.fail(
                    err.with_context("partition", &r.partition)
                        .with_context("position", &r.position),
                );
                self.publish_gauges();
                return;
            }
        }
        let current = self
            .partitions
            .get(&partition)
            .is_some_and(|p| p.incarnation == incarnation);
        if !current {
            tracing::debug!(pipeline = %self.name, partition = %partition, "late completion for a partition no longer owned (or owned anew): dropped");
            if let Some(n) = self.lingering.get_mut(&partition) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.lingering.remove(&partition);
                }
            }
            self.publish_gauges();
            return;
        }
        let Some(part) = self.partitions.get_mut(&partition) else {
            return;
        };
        part.unsettled = part.unsettled.saturating_sub(1);
        if !lane_released {
            if let Some(l) = part.lanes.get_mut(lane) {
                l.busy = l.busy.saturating_sub(1);
            }
        }
        for s in &seqs {
            part.tracker.ack(*s);
        }
        let advanced = part.tracker.take_advanced();
        Stats::add(&self.stats.records_acked, seqs.len() as u64);
        self.uncommitted += advanced;
        if advanced > 0 && self.caps.eager_commit {
            self.force_commit = true;
        }
        self.update_credit(&partition);
        self.publish_gauges();
    }

    // ---- commits ---------------------------------------------------------------------

    fn pending_checkpoints(
        &mut self,
        partitions: impl Iterator<Item = PartitionId>,
    ) -> Vec<Checkpoint> {
        let committed = &self.committed;
        partitions
            .filter_map(|p| {
                let part = self.partitions.get_mut(&p)?;
                let w = part.tracker.watermark()?.clone();
                if committed.get(&p).is_some_and(|c| c.position == w) {
                    return None;
                }
                part.commit_marks
                    .push_back((w.clone(), part.tracker.prefix_end()));
                Some(Checkpoint::new(p, w).with_fence(part.fence))
            })
            .collect()
    }

    /// A checkpoint was written: the records it covers no longer count as lag.
    fn note_committed(&mut self, c: Checkpoint) {
        if let Some(part) = self.partitions.get_mut(&c.partition) {
            while let Some((pos, seq)) = part.commit_marks.front() {
                if *pos > c.position {
                    break;
                }
                part.committed_seq = part.committed_seq.max(*seq);
                part.commit_marks.pop_front();
            }
        }
        self.committed.insert(c.partition.clone(), c);
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.last_checkpoint.set(unix);
    }

    async fn maybe_start_commit(
        &mut self,
        now: Instant,
        source: &mut Box<dyn Source>,
    ) -> Option<JoinHandle<CommitOutput>> {
        let since = now.duration_since(self.last_commit_at);
        let due = self.force_commit
            || (since >= self.settings.commit.min_interval
                && (self.uncommitted >= self.settings.commit.every_records
                    || (self.uncommitted > 0 && since >= self.settings.commit.every)));
        if !due {
            return None;
        }
        self.force_commit = false;
        self.uncommitted = 0;
        self.last_commit_at = now;
        let cps = self.pending_checkpoints(self.order.clone().into_iter());
        if cps.is_empty() {
            return None;
        }
        match &self.store {
            Some(store) => {
                let store = store.clone();
                let pipeline = self.name.clone();
                let retry = self.settings.retry.clone();
                Some(tokio::spawn(async move {
                    let started = Instant::now();
                    let res = worker::retry_temporary(&retry, "checkpoint commit", || {
                        store.commit(&pipeline, &cps)
                    })
                    .await;
                    match res {
                        Err(e) if e.kind() == ErrorKind::Fenced && cps.len() > 1 => {
                            let (written, res) =
                                commit_apart(&*store, &pipeline, &retry, cps).await;
                            (written, res, started)
                        }
                        Err(e) if e.kind() == ErrorKind::Fenced => {
                            warn_refused(&pipeline, &cps, &e);
                            (Vec::new(), Ok(()), started)
                        }
                        res => (cps, res, started),
                    }
                }))
            }
            None => {
                let started = Instant::now();
                self.after_store_commit(cps, Ok(()), started, source).await;
                None
            }
        }
    }

    async fn on_commit_done(&mut self, res: CommitResult, source: &mut Box<dyn Source>) {
        match res {
            Ok((cps, res, started)) => self.after_store_commit(cps, res, started, source).await,
            Err(join) => {
                self.fail(Error::fatal("the checkpoint task panicked").with_context("cause", join))
            }
        }
    }

    async fn after_store_commit(
        &mut self,
        cps: Vec<Checkpoint>,
        res: Result<(), Error>,
        started: Instant,
        source: &mut Box<dyn Source>,
    ) {
        if let Err(e) = res {
            self.fail(e.with_context("while", "writing checkpoints"));
            return;
        }
        // Only partitions still owned are committed to the broker.
        let owned: Vec<Checkpoint> = cps
            .into_iter()
            .filter(|c| {
                self.partitions
                    .get(&c.partition)
                    .is_some_and(|p| p.fence == c.fence)
            })
            .collect();
        if owned.is_empty() {
            return;
        }
        if let Err(e) = source.commit(&owned).await {
            if e.is_temporary() {
                tracing::warn!(pipeline = %self.name, error = %e, "broker commit failed; the next commit covers it");
            } else {
                self.fail(e.with_context("while", "committing to the broker"));
                return;
            }
        }
        self.metrics
            .commit_latency
            .record(started.elapsed().as_secs_f64());
        self.metrics.commits.increment(1);
        Stats::add(&self.stats.commits, 1);
        for c in owned {
            self.note_committed(c);
        }
    }

    /// Writes the checkpoints of `partitions` to the store now (revoke); returns what was written.
    async fn write_checkpoints(
        &mut self,
        partitions: Vec<PartitionId>,
    ) -> Result<Vec<Checkpoint>, Error> {
        let cps = self.pending_checkpoints(partitions.into_iter());
        if cps.is_empty() {
            return Ok(cps);
        }
        if let Some(store) = &self.store {
            let pipeline = self.name.clone();
            worker::retry_temporary(&self.settings.retry, "checkpoint commit", || {
                store.commit(&pipeline, &cps)
            })
            .await?;
            Stats::add(&self.stats.commits, 1);
        }
        for c in &cps {
            self.note_committed(c.clone());
        }
        Ok(cps)
    }

    /// Final checkpoint: store, then broker.
    async fn commit_now(
        &mut self,
        source: &mut Box<dyn Source>,
        partitions: Vec<PartitionId>,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let cps = self.pending_checkpoints(partitions.into_iter());
        if cps.is_empty() {
            return Ok(());
        }
        let res = match &self.store {
            Some(store) => {
                let pipeline = self.name.clone();
                worker::retry_temporary(&self.settings.retry, "final checkpoint", || {
                    store.commit(&pipeline, &cps)
                })
                .await
            }
            None => Ok(()),
        };
        self.after_store_commit(cps, res, started, source).await;
        Ok(())
    }

    // ---- health ----------------------------------------------------------------------

    fn on_connection(&mut self, c: Connection, now: Instant) {
        match c {
            Connection::Down { endpoint, cause } => {
                self.metrics.source_connected.set(0.0);
                match &mut self.health.disconnected {
                    Some(d) => {
                        self.stats
                            .set_source_failure(Some((endpoint.clone(), cause.clone())));
                        d.endpoint = endpoint;
                        d.cause = cause;
                    }
                    None => {
                        tracing::warn!(pipeline = %self.name, %endpoint, %cause,
                            timeout = ?self.settings.health.disconnect_timeout,
                            "the source cannot reach its broker; retrying");
                        self.stats
                            .set_source_failure(Some((endpoint.clone(), cause.clone())));
                        self.health.disconnected = Some(Disconnected {
                            endpoint,
                            cause,
                            since: now,
                            next_warning: now + Duration::from_secs(1),
                            warning_every: Duration::from_secs(1),
                        });
                    }
                }
            }
            Connection::Up => {
                self.metrics.source_connected.set(1.0);
                self.stats.set_source_failure(None);
                if let Some(d) = self.health.disconnected.take() {
                    tracing::info!(pipeline = %self.name, endpoint = %d.endpoint,
                        after = ?now.duration_since(d.since), "the source reaches its broker again");
                    // The outage is not a stall of the sink: progress is measured afresh.
                    self.health.last_progress_at = now;
                }
            }
        }
        self.on_tick(now);
    }

    /// Repeats the disconnection warning with a growing gap; fails the pipeline once the
    /// disconnection has lasted `health.disconnect_timeout`.
    fn check_disconnected(&mut self, now: Instant) {
        let timeout = self.settings.health.disconnect_timeout;
        let Some(d) = &mut self.health.disconnected else {
            return;
        };
        let down_for = now.duration_since(d.since);
        if down_for >= timeout {
            let err = Error::fatal(format!(
                "the source could not reach its broker for {down_for:.0?}: {}",
                d.cause
            ))
            .with_context("endpoint", &d.endpoint)
            .with_hint(format!(
                "check that the broker at {} is running and reachable from here (address, port, TLS and credentials); `runtime.health.disconnect_timeout` ({timeout:?}) sets how long flowgate waits",
                d.endpoint
            ));
            if self.fatal.is_none() {
                self.fail(err);
            }
        } else if now >= d.next_warning {
            tracing::warn!(pipeline = %self.name, endpoint = %d.endpoint, cause = %d.cause,
                down_for = ?down_for, gives_up_in = ?(timeout - down_for),
                "the source still cannot reach its broker");
            d.warning_every = (d.warning_every * 2).min(MAX_DISCONNECT_WARNING_GAP);
            d.next_warning = now + d.warning_every;
        }
    }

    fn on_tick(&mut self, now: Instant) {
        self.check_disconnected(now);
        let acked = self
            .stats
            .records_acked
            .load(std::sync::atomic::Ordering::Relaxed);
        let in_flight = self
            .stats
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed);
        let lag = self.source_lag() + in_flight;
        if acked != self.health.last_acked || lag == 0 {
            self.health.last_acked = acked;
            self.health.last_progress_at = now;
            self.health.lag_at_progress = lag;
        }
        let stalled =
            now.duration_since(self.health.last_progress_at) >= self.settings.health.stall_window;
        let growing = lag > self.health.lag_at_progress || in_flight > 0;
        let store_failure = self.stats.store_failure();
        match (&store_failure, self.health.store_down) {
            (Some(cause), false) => {
                tracing::warn!(pipeline = %self.name, store = self.store.as_ref().map(|s| s.describe()), %cause,
                    "the checkpoint store cannot be reached; retrying (records wait for their checkpoint)");
                self.health.store_down = true;
                self.metrics.store_connected.set(0.0);
            }
            (None, true) => {
                tracing::info!(pipeline = %self.name, "the checkpoint store answers again");
                self.health.store_down = false;
                self.metrics.store_connected.set(1.0);
            }
            _ => {}
        }
        let health = if self.health.disconnected.is_some() || store_failure.is_some() {
            Health::Disconnected
        } else if stalled && growing {
            Health::Unhealthy
        } else {
            Health::Healthy
        };
        if health != self.stats.health() && self.stats.health() != Health::Stopped {
            match health {
                Health::Unhealthy => {
                    tracing::warn!(pipeline = %self.name, lag, stalled_for = ?now.duration_since(self.health.last_progress_at), "unhealthy: lag grows and nothing is acknowledged")
                }
                Health::Disconnected => {}
                _ => {
                    tracing::info!(pipeline = %self.name, "healthy again: records are being acknowledged")
                }
            }
            self.stats.set_health(health);
        }
        self.metrics
            .healthy
            .set(if health == Health::Healthy { 1.0 } else { 0.0 });
        self.publish_partitions(now);
        let ready = health == Health::Healthy && self.stats.readiness().is_empty();
        self.metrics.ready.set(if ready { 1.0 } else { 0.0 });
    }
}

/// The checkpoint store as the coordinator uses it: a temporary failure marks the store
/// unreachable in the pipeline's stats (health `disconnected`), a success clears it.
struct WatchedStore {
    inner: Arc<dyn CheckpointStore>,
    stats: Arc<Stats>,
}

impl WatchedStore {
    fn observe<T>(&self, res: Result<T, Error>) -> Result<T, Error> {
        match &res {
            Err(e) if e.is_temporary() => self.stats.set_store_failure(Some(e.to_string())),
            // Any other answer (a refused write included) means the store was reached.
            _ => {
                if self.stats.store_failure().is_some() {
                    self.stats.set_store_failure(None);
                }
            }
        }
        res
    }
}

#[async_trait::async_trait]
impl CheckpointStore for WatchedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        self.observe(self.inner.load(pipeline).await)
    }
    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        self.observe(self.inner.commit(pipeline, checkpoints).await)
    }
    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        self.observe(self.inner.reset(pipeline, partitions).await)
    }
}

/// A position helper for sources that resume "after" a position.
pub fn resume_after(start: &StartPosition) -> Option<Position> {
    start.after.as_ref().map(Position::successor)
}

/// After a fenced commit: commits each checkpoint on its own, so that a partition another
/// worker took over (a stolen lease, a newer group generation) does not stop the progress of
/// the others. The refused ones are dropped with a warning: the source revokes those
/// partitions as lost, and their records are redelivered to the new owner.
async fn commit_apart(
    store: &dyn CheckpointStore,
    pipeline: &str,
    retry: &crate::settings::RetrySettings,
    cps: Vec<Checkpoint>,
) -> (Vec<Checkpoint>, Result<(), Error>) {
    let mut written = Vec::with_capacity(cps.len());
    for cp in cps {
        let one = std::slice::from_ref(&cp);
        match worker::retry_temporary(retry, "checkpoint commit", || store.commit(pipeline, one))
            .await
        {
            Ok(()) => written.push(cp),
            Err(e) if e.kind() == ErrorKind::Fenced => warn_refused(pipeline, one, &e),
            Err(e) => return (written, Err(e)),
        }
    }
    (written, Ok(()))
}

fn warn_refused(pipeline: &str, cps: &[Checkpoint], e: &Error) {
    for cp in cps {
        tracing::warn!(pipeline = %pipeline, partition = %cp.partition, error = %e,
            "checkpoint refused: another owner holds this partition; its progress here is dropped");
    }
}
