//! The broker harness the scenario suites drive, and what they report.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use flowgate_core::{Record, Sink, Source};

use crate::adapters::MemorySink;
use crate::stats::{Health, RunSummary, Stats};

/// What a broker can do, as the suites need to know.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// A consumer can start from a position (Kafka, Kinesis, RabbitMQ streams): progress is
    /// a checkpoint. Otherwise (a queue) progress is acknowledgements, and redeliveries are
    /// deduplicated by the record's key.
    pub replayable: bool,
    /// The broker can be stopped and started by the rig mid-test.
    pub restartable: bool,
    /// Partitions a new stream gets in the suites (1 for a queue).
    pub partitions: u32,
    /// The broker tells how far behind a consumer is while it reads (kinesis-mock answers
    /// `MillisBehindLatest` = 0 whatever the backlog; AWS does not).
    pub reports_lag: bool,
}

/// A broker as the scenario suites drive it: the adapter's tests implement it with plain
/// clients of the broker (never through flowgate), so the suites check flowgate against the
/// broker's own view.
#[async_trait]
pub trait BrokerHarness: Send + Sync {
    /// The broker's name, as the rig knows it (`cargo xtask brokers restart NAME`).
    fn broker(&self) -> &'static str;

    /// What the broker can do.
    fn capabilities(&self) -> Capabilities;

    /// A new, empty stream (topic, queue, stream) with [`Capabilities::partitions`]
    /// partitions; its name.
    async fn create(&self) -> String;

    /// Appends one record per payload, spread over the stream's partitions, each confirmed by
    /// the broker before this returns.
    async fn produce(&self, stream: &str, payloads: &[String]);

    /// A source reading `stream` for `pipeline` (its consumer group or consumer name).
    fn source(&self, stream: &str, pipeline: &str) -> Box<dyn Source>;

    /// The sink dead letters of `stream` go to, or `None` when the source dead-letters on its
    /// broker (RabbitMQ's dead-letter exchange).
    async fn dead_letter_sink(&self, stream: &str) -> Option<Box<dyn Sink>>;

    /// The payloads dead-lettered for `stream`, read with a plain client.
    async fn dead_letters(&self, stream: &str) -> Vec<String>;

    /// Stops the broker, waits `down_for`, starts it again; how long it was away.
    async fn restart(&self, down_for: Duration) -> Duration;

    /// How many records of `stream` the broker counts as not yet consumed by `pipeline`
    /// (committed offsets behind the log end; messages ready or unacknowledged).
    async fn backlog(&self, stream: &str, pipeline: &str) -> u64;
}

/// What a suite saw, for the checks specific to one broker.
pub struct ScenarioReport {
    /// The stream the suite created.
    pub stream: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// The run's summary (its stats and last checkpoints).
    pub summary: RunSummary,
    /// Every record the sink received, duplicates included, in order of arrival.
    pub written: Vec<Record>,
}

impl ScenarioReport {
    /// Records written more than once.
    pub fn duplicates(&self) -> usize {
        self.written.len() - payload_counts(&self.written).len()
    }
}

/// How often each payload was written.
pub(crate) fn payload_counts(records: &[Record]) -> HashMap<String, u32> {
    let mut seen = HashMap::new();
    for r in records {
        *seen.entry(payload(r)).or_insert(0) += 1;
    }
    seen
}

pub(crate) fn payload(r: &Record) -> String {
    String::from_utf8_lossy(&r.payload).into_owned()
}

/// Payloads `prefix0`, `prefix1`, … numbered from `from`.
pub(crate) fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// A pipeline name no earlier run used.
pub(crate) fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{nanos}")
}

/// Polls until `sink` holds `want` distinct payloads; panics naming `what` after `limit`.
pub(crate) async fn wait_for_distinct(sink: &MemorySink, want: usize, limit: Duration, what: &str) {
    let started = std::time::Instant::now();
    loop {
        let have = payload_counts(&sink.records()).len();
        if have >= want {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: only {have} of {want} distinct records arrived in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the broker's backlog until it is 0; panics after `limit` with the last count.
pub(crate) async fn wait_for_no_backlog<H: BrokerHarness + ?Sized>(
    h: &H,
    stream: &str,
    pipeline: &str,
    limit: Duration,
) {
    let started = std::time::Instant::now();
    loop {
        let left = h.backlog(stream, pipeline).await;
        if left == 0 {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{}: the broker still counts {left} records of {stream} as not consumed by {pipeline}",
            h.broker()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Records a pipeline's successive health states (sampled every 20 ms) until stopped.
pub(crate) struct HealthLog {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Health>>,
}

impl HealthLog {
    pub(crate) fn start(stats: Arc<Stats>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen: Vec<Health> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let h = stats.health();
                if seen.last() != Some(&h) {
                    seen.push(h);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        });
        HealthLog { stop, task }
    }

    /// Stops recording; the states seen, each change once.
    pub(crate) async fn stop(self) -> Vec<Health> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// A pipeline running on a task of its own, with the sink it writes to.
pub(crate) struct Running {
    pub(crate) stats: Arc<Stats>,
    pub(crate) sink: MemorySink,
    trigger: crate::shutdown::ShutdownTrigger,
    run: tokio::task::JoinHandle<Result<RunSummary, flowgate_core::Error>>,
}

impl Running {
    /// Builds `builder` (whose sink writes to `sink`) and runs it.
    pub(crate) fn start(builder: crate::PipelineBuilder, sink: MemorySink) -> Self {
        let pipeline = builder.build().expect("a valid pipeline");
        let stats = pipeline.stats();
        let (trigger, shutdown) = crate::Shutdown::manual();
        let run = tokio::spawn(pipeline.run(shutdown));
        Running {
            stats,
            sink,
            trigger,
            run,
        }
    }

    /// Polls until the sink holds `n` records; panics naming `what` after `limit`.
    pub(crate) async fn wait_written(&self, n: usize, limit: Duration, what: &str) {
        let started = std::time::Instant::now();
        while self.sink.len() < n {
            assert!(
                started.elapsed() < limit,
                "{what}: {} of {n} records written in {limit:?}: {:?}",
                self.sink.len(),
                self.stats.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Shuts the pipeline down; its summary (it must stop cleanly) and every record written.
    pub(crate) async fn stop(self) -> (RunSummary, Vec<Record>) {
        self.trigger.trigger();
        let summary = self
            .run
            .await
            .expect("the pipeline task")
            .expect("the pipeline stops cleanly");
        (summary, self.sink.records())
    }
}

/// Asserts one checkpoint per partition of `partitions`, each at the position of the last
/// record written in its partition.
pub(crate) fn assert_checkpoints_at_last_records(
    broker: &str,
    checkpoints: &[flowgate_core::Checkpoint],
    written: &[Record],
    partitions: u32,
) {
    assert_eq!(
        checkpoints.len() as u32,
        partitions,
        "{broker}: a checkpoint per partition: {checkpoints:?}"
    );
    for cp in checkpoints {
        let last = written
            .iter()
            .filter(|r| r.partition == cp.partition)
            .map(|r| &r.position)
            .max();
        assert_eq!(
            Some(&cp.position),
            last,
            "{broker}: the checkpoint of {} is its last record's position",
            cp.partition
        );
    }
}

/// Asserts that the health states `seen` include `disconnected` and end `healthy`: an
/// outage read as such, then the way back.
pub(crate) fn assert_away_then_back(broker: &str, seen: Vec<Health>) {
    eprintln!("{broker}/restart: health went {seen:?}");
    assert!(
        seen.contains(&Health::Disconnected),
        "{broker}: the outage never read as disconnected: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&Health::Healthy), "{broker}: {seen:?}");
}

/// A pipeline reading `stream` into `sink` through a sink paced at `per_sec` records per
/// second, with `max_in_flight` records in flight per partition.
pub(crate) fn paced_pipeline<H: BrokerHarness + ?Sized>(
    h: &H,
    (stream, pipeline): (&str, &str),
    sink: MemorySink,
    per_sec: f64,
    max_in_flight: usize,
) -> crate::PipelineBuilder {
    crate::Pipeline::builder(pipeline)
        .source(h.source(stream, pipeline))
        .sink(crate::adapters::FaultInjectingSink::new(
            sink,
            crate::adapters::FaultConfig {
                capacity_per_sec: Some(per_sec),
                ..Default::default()
            },
        ))
        .settings(crate::RuntimeSettings {
            max_in_flight_per_partition: max_in_flight,
            ..Default::default()
        })
}
