//! The pipeline: builder and coordinator.
//!
//! One coordinator task owns all per-partition state (queues, ack trackers, credit); sink
//! batches run as separate tasks and report back over a channel. Checkpoint writes run as a
//! separate task too, at most one at a time, each covering everything acknowledged before it
//! started. The order of durability is: sink confirms → dedup marks → checkpoint store →
//! broker commit.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flowgate_core::{
    Checkpoint, CheckpointStore, Credits, DedupStore, Error, PartitionId, Position, Record,
    Revocation, Sink, SinkCapabilities, Source, SourceCapabilities, SourceContext, SourceEvent,
    StartPosition,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::concurrency::Concurrency;
use crate::dedup::{KeyExtractor, LookupFloor};
use crate::metrics::{Metrics, PartitionMetrics};
use crate::progress::ProgressWindow;
use crate::settings::{RuntimeSettings, SinkOrdering};
use crate::shutdown::Shutdown;
use crate::stats::{Health, RunSummary, Stats};
use crate::tracker::AckTracker;
use crate::worker::{self, BoxFuture, TransformFn, WorkerContext, WorkerEvent};

mod admission;
mod commits;
mod dispatch;
mod health;
mod lag;
mod partitions;

use commits::WatchedStore;
use health::HealthTracker;

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
        if matches!(extractor, Some(KeyExtractor::SourcePosition)) && !caps.replayable {
            return Err(Error::config(
                "dedup by source position needs a replayable source: this source's positions change when a record is redelivered",
            )
            .with_context("key", "dedup.key")
            .with_hint("deduplicate by a message id instead (RabbitMQ queues: the AMQP message_id is the idempotency key; `key = \"key\"` or `header:NAME` uses it)"));
        }
        let (marker, marker_task) = match &dedup_store {
            Some(store) => {
                let (tx, task) = spawn_marker(store.clone(), &name, &settings, &stats);
                (Some(tx), Some(task))
            }
            None => (None, None),
        };
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
        let shared = Arc::new(WorkerContext {
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
        let (max_batch_records, max_batch_bytes) = batch_limits(&sink_caps, &settings);
        let st = State {
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
        stats
            .concurrency
            .store(st.concurrency.limit() as u64, Ordering::Relaxed);

        Ok((
            st,
            Running {
                source,
                events: events_rx,
                sink,
                dead_letter,
                credits,
                marker: marker_task,
            },
        ))
    }
}

/// The checkpoint store as the pipeline uses it: every answer tells the pipeline's health
/// whether the store can be reached; none for a source that cannot start from a position (a
/// RabbitMQ queue), whose positions mean nothing to a later process (its broker keeps the
/// progress, as acks).
fn checkpoint_store(
    store: Option<Arc<dyn CheckpointStore>>,
    caps: &SourceCapabilities,
    stats: &Arc<Stats>,
    name: &str,
) -> Option<Arc<dyn CheckpointStore>> {
    let inner = store?;
    if !caps.replayable {
        tracing::info!(pipeline = %name, "the source is not replayable (its broker keeps the progress): the checkpoint store is not used");
        return None;
    }
    Some(Arc::new(WatchedStore {
        inner,
        stats: stats.clone(),
    }))
}

/// The task that commits dedup marks, and the channel that feeds it.
fn spawn_marker(
    store: Arc<dyn DedupStore>,
    name: &str,
    settings: &RuntimeSettings,
    stats: &Arc<Stats>,
) -> (mpsc::UnboundedSender<worker::MarkRequest>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(worker::marker_task(
        store,
        name.to_string(),
        settings.dedup_ttl,
        (settings.dedup_mark_interval, stats.clone()),
        settings.retry.clone(),
        rx,
    ));
    (tx, task)
}

/// Records and bytes per batch: the settings', within the sink's own limits, at least 1.
fn batch_limits(sink: &SinkCapabilities, settings: &RuntimeSettings) -> (usize, usize) {
    let records = sink
        .max_batch_records
        .map_or(settings.batch.max_records, |m| {
            m.min(settings.batch.max_records)
        });
    let bytes = sink.max_batch_bytes.map_or(settings.batch.max_bytes, |m| {
        m.min(settings.batch.max_bytes)
    });
    (records.max(1), bytes.max(1))
}

/// What the coordinator works with besides its state.
struct Running {
    source: Box<dyn Source>,
    events: mpsc::UnboundedReceiver<WorkerEvent>,
    sink: Arc<dyn Sink>,
    dead_letter: Option<Arc<dyn Sink>>,
    credits: Credits,
    /// The dedup marker task, awaited after the state is gone.
    marker: Option<JoinHandle<()>>,
}

impl State {
    /// Opens the source, retrying temporary failures within the retry budget.
    async fn open(&mut self, source: &mut Box<dyn Source>, credits: Credits) -> Result<(), Error> {
        let name = self.name.clone();
        let stats = self.stats.clone();
        let retry = self.settings.retry.clone();
        let ctx = SourceContext::new(name.clone(), credits)
            .with_max_in_flight_per_partition(self.settings.max_in_flight_per_partition);
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
        self.metrics.source_connected.set(1.0);
        self.metrics.store_connected.set(1.0);
        tracing::info!(pipeline = %name, store = self.store.as_ref().map(|s| s.describe()), "pipeline started");

        Ok(())
    }

    /// The loop: worker completions first, then commits, shutdown, the source, timers; until
    /// drained. Returns the checkpoint write still running, if any.
    async fn turn(
        &mut self,
        run: &mut Running,
        shutdown: Shutdown,
    ) -> Option<JoinHandle<CommitOutput>> {
        let source = &mut run.source;
        let events_rx = &mut run.events;
        let mut shutdown = shutdown;
        let mut shutdown_fired = false;
        let mut commit_task: Option<JoinHandle<CommitOutput>> = None;
        let tick = Duration::from_millis(250);
        let mut next_tick = Instant::now() + tick;

        loop {
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + tick;
                self.on_tick(now);
            }
            self.dispatch(now);
            if commit_task.is_none() {
                commit_task = self.maybe_start_commit(now, source).await;
            }
            if self.finish_revokes(now, &mut commit_task, source).await {
                continue;
            }
            if self.drain_complete(now) {
                break;
            }
            let want_source = !self.source_done && self.drain_deadline.is_none();
            let deadline = self
                .next_deadline(now, commit_task.is_none())
                .min(next_tick);
            tokio::select! {
                biased;
                Some(ev) = events_rx.recv() => {
                    self.on_worker_event(ev, source).await;
                    // Amortise: take whatever else is ready.
                    while let Ok(ev) = events_rx.try_recv() {
                        self.on_worker_event(ev, source).await;
                    }
                }
                res = async { commit_task.as_mut().expect("guarded").await }, if commit_task.is_some() => {
                    commit_task = None;
                    self.on_commit_done(res, source).await;
                }
                _ = &mut shutdown, if !shutdown_fired => {
                    shutdown_fired = true;
                    tracing::info!(pipeline = %self.name, "shutdown requested: draining");
                    self.begin_drain(Instant::now());
                }
                ev = source.next(), if want_source => {
                    match ev {
                        Ok(ev) => self.on_source_event(ev, source).await,
                        Err(e) if e.is_temporary() => {
                            tracing::warn!(pipeline = %self.name, error = %e, "source error, retrying");
                            tokio::time::sleep(self.settings.retry.initial_backoff).await;
                        }
                        Err(e) => self.fail(e),
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }

        commit_task
    }

    /// The final checkpoint, then closing the source and the sinks; the run's summary.
    async fn shut_down(
        &mut self,
        run: Running,
        mut commit_task: Option<JoinHandle<CommitOutput>>,
        started: Instant,
    ) -> Result<RunSummary, Error> {
        let Running {
            mut source,
            sink,
            dead_letter,
            ..
        } = run;
        let stats = self.stats.clone();
        if let Some(task) = commit_task.take() {
            let res = task.await;
            self.on_commit_done(res, &mut source).await;
        }
        let flush = sink.flush().await;
        if let Err(e) = flush {
            self.fail(e);
        }
        if let Err(e) = self
            .commit_now(&mut source, self.partitions.keys().cloned().collect())
            .await
        {
            self.fail(e);
        }
        let close_timeout = Duration::from_secs(30);
        match tokio::time::timeout(close_timeout, source.close()).await {
            Ok(Err(e)) => {
                tracing::warn!(pipeline = %self.name, error = %e, "closing the source failed")
            }
            Err(_) => {
                tracing::warn!(pipeline = %self.name, "closing the source took longer than {close_timeout:?}; abandoned")
            }
            Ok(Ok(())) => {}
        }
        for s in std::iter::once(&sink).chain(dead_letter.as_ref()) {
            if let Ok(Err(e)) = tokio::time::timeout(close_timeout, s.close()).await {
                tracing::warn!(pipeline = %self.name, error = %e, "closing a sink failed");
            }
        }
        stats.set_health(Health::Stopped);
        let drained = self.partitions.values().all(|p| p.tracker.pending() == 0);
        // A source that cannot start from a position (a RabbitMQ queue) keeps its progress in
        // its broker (acks): its positions (delivery tags) are not checkpoints.
        let mut checkpoints: Vec<Checkpoint> = if self.caps.replayable {
            self.committed.values().cloned().collect()
        } else {
            Vec::new()
        };
        checkpoints.sort_by(|a, b| a.partition.cmp(&b.partition));
        let summary = RunSummary {
            pipeline: self.name.clone(),
            elapsed: started.elapsed(),
            stats: stats.snapshot(),
            checkpoints,
            drained,
        };
        tracing::info!(pipeline = %self.name, "{summary}");
        match self.fatal.take() {
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

/// How often each partition's progress window takes a sample.
const PROGRESS_SAMPLE_EVERY: Duration = Duration::from_secs(1);

struct State {
    name: String,
    settings: RuntimeSettings,
    caps: SourceCapabilities,
    shared: Arc<WorkerContext>,
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
