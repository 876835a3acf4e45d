//! Implementing the `Source` trait for your own type: `SensorFeed` stands for a push-style
//! client (a socket, a callback API) whose background task receives readings from two
//! sensors and hands them to the source's `next()` through a `flowgate::core::SourceInbox`,
//! which keeps `next()` cancel-safe and hands over no more than the runtime's credit per
//! partition. The pipeline writes them to a JSON-lines file; the feed ends after 500
//! readings per sensor, and the example reads the file back and checks that each of the 1,000
//! readings is there exactly once, in order per sensor, and that the runtime committed the
//! last reading of each sensor back to the source.
//!
//! No broker needed:
//!
//! ```sh
//! cargo run -p flowgate --example custom_source
//! ```
//!
//! The traits are async traits: implement them under `#[async_trait]`, re-exported as
//! `flowgate::core::async_trait`, and write plain `async fn`s.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flowgate::core::{
    Assignment, Checkpoint, Credits, Error, PartitionId, Position, Record, Source,
    SourceCapabilities, SourceContext, SourceEvent, SourceInbox, StartPosition, async_trait,
};
use flowgate::runtime::adapters::{JsonLinesConfig, JsonLinesSink};
use flowgate::runtime::{Pipeline, RuntimeSettings, Shutdown};

const SENSORS: [&str; 2] = ["sensor-a", "sensor-b"];
const READINGS_PER_SENSOR: u64 = 500;
const TOTAL: u64 = SENSORS.len() as u64 * READINGS_PER_SENSOR;
/// Records handed to the runtime per `next()`, at most.
const MAX_BATCH: usize = 100;
/// The run stops here at the latest, and the example fails.
const TIMEOUT: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error>;

/// What the background task and `next()` share, under the inbox's lock.
#[derive(Default)]
struct Buffered {
    /// Readings received and not handed to the runtime yet, per sensor.
    queues: BTreeMap<PartitionId, VecDeque<Record>>,
    /// The feed has sent its last reading.
    finished: bool,
    /// `SourceEvent::End` was queued.
    end_queued: bool,
}

impl Buffered {
    /// Queues `End` (once) when the feed is finished and every reading was handed over. The
    /// inbox delivers queued events before buffered records, so `End` may only be queued once
    /// the buffers are empty.
    fn end_due(&mut self) -> bool {
        let due = self.finished && !self.end_queued && self.queues.values().all(VecDeque::is_empty);
        if due {
            self.end_queued = true;
        }
        due
    }
}

/// A source over a push-style feed of sensor readings: one partition per sensor, the
/// position is the reading's sequence number.
struct SensorFeed {
    inbox: Arc<SourceInbox<Buffered>>,
    credits: Option<Credits>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Sensors the runtime has started.
    started: HashSet<PartitionId>,
    /// The last position the runtime committed per sensor (what a real client would ack).
    committed: Arc<Mutex<BTreeMap<PartitionId, Position>>>,
}

impl SensorFeed {
    fn new() -> Self {
        SensorFeed {
            inbox: Arc::new(SourceInbox::new(Buffered::default())),
            credits: None,
            task: None,
            started: HashSet::new(),
            committed: Arc::default(),
        }
    }

    /// The background task of a push-style client: it receives readings and buffers them.
    /// Here it makes them up, interleaving the sensors, a few at a time.
    async fn receive(inbox: Arc<SourceInbox<Buffered>>) {
        for seq in 0..READINGS_PER_SENSOR {
            inbox.with(|b| {
                for (i, sensor) in SENSORS.iter().enumerate() {
                    let p = PartitionId::new(sensor);
                    let reading = format!(
                        r#"{{"sensor":"{sensor}","seq":{seq},"celsius":{}}}"#,
                        18 + (seq + i as u64 * 7) % 9
                    );
                    let record = Record::new(p.clone(), Position::from(seq), reading)
                        .with_key(sensor.to_string());
                    b.queues.entry(p).or_default().push_back(record);
                }
            });
            inbox.wake();
            if seq % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let end = inbox.with(|b| {
            b.finished = true;
            b.end_due()
        });
        if end {
            inbox.push_event(SourceEvent::End);
        }
    }
}

#[async_trait]
impl Source for SensorFeed {
    fn capabilities(&self) -> SourceCapabilities {
        // Ordered per sensor; a push feed cannot start again from a position, and this one
        // reports no lag.
        SourceCapabilities::replayable_ordered()
            .with_replayable(false)
            .with_lag_unit(None)
    }

    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        // Announce the partitions; records follow only after the runtime's `start`.
        self.inbox.push_event(SourceEvent::Assigned(
            SENSORS
                .iter()
                .map(|s| Assignment::new(PartitionId::new(s)))
                .collect(),
        ));
        self.credits = Some(ctx.credits);
        Ok(())
    }

    async fn next(&mut self) -> Result<SourceEvent, Error> {
        let Some(credits) = self.credits.clone() else {
            return Err(Error::fatal("SensorFeed::next called before open"));
        };
        // Queued events first, then readings within each sensor's credit. Cancel-safe:
        // nothing leaves the inbox unless it is returned.
        let event = self
            .inbox
            .next(&credits, Duration::from_millis(200), |b, credits| {
                let mut out = Vec::new();
                for (p, q) in &mut b.queues {
                    let n = credits.available(p).min(q.len()).min(MAX_BATCH - out.len());
                    out.extend(q.drain(..n));
                }
                (!out.is_empty()).then_some(out)
            })
            .await?;
        if self.inbox.with(Buffered::end_due) {
            self.inbox.push_event(SourceEvent::End);
        }
        Ok(event)
    }

    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        // Not replayable: every start is "from wherever the feed is" (`after` is None).
        // The feed starts once the runtime has started every sensor.
        self.started.extend(starts.into_iter().map(|s| s.partition));
        if self.task.is_none() && self.started.len() == SENSORS.len() {
            self.task = Some(tokio::spawn(SensorFeed::receive(self.inbox.clone())));
        }
        Ok(())
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        // Everything at or before these positions is written by the sink: a real client
        // acknowledges it to its server here.
        let mut committed = self
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for c in checkpoints {
            committed.insert(c.partition.clone(), c.position.clone());
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), Error> {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        Ok(())
    }
}

async fn run() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("readings.jsonl");
    let feed = SensorFeed::new();
    let committed = feed.committed.clone();
    let sink = JsonLinesSink::open(JsonLinesConfig {
        path: path.clone(),
        fsync: false,
    })
    .await?;
    let summary = Pipeline::builder("custom-source-example")
        .source(feed)
        .sink(sink)
        .settings(RuntimeSettings {
            // Small credit, so the inbox's credit handling is exercised.
            max_in_flight_per_partition: 200,
            ..Default::default()
        })
        .build()?
        // The feed is finite: the pipeline ends at its `End`.
        .run(Shutdown::after(TIMEOUT))
        .await?;

    let written = JsonLinesSink::read(&path)?;
    let mut distinct = HashSet::new();
    let mut last: BTreeMap<PartitionId, Position> = BTreeMap::new();
    let mut out_of_order = 0;
    for r in &written {
        distinct.insert((r.partition.clone(), r.position.clone()));
        if last
            .insert(r.partition.clone(), r.position.clone())
            .is_some_and(|p| p >= r.position)
        {
            out_of_order += 1;
        }
    }
    let committed = committed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    println!(
        "custom_source: {} readings written to a JSON-lines file in {:.2}s (in {}, out {}, commits {})",
        written.len(),
        summary.elapsed.as_secs_f64(),
        summary.stats.records_in,
        summary.stats.records_out,
        summary.stats.commits
    );
    println!(
        "custom_source: distinct {}, duplicates {}, out of order {out_of_order}, committed {}",
        distinct.len(),
        written.len() - distinct.len(),
        committed
            .iter()
            .map(|(p, pos)| format!("{p}@{pos}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if written.len() as u64 != TOTAL || distinct.len() as u64 != TOTAL {
        return Err(format!(
            "expected {TOTAL} distinct readings, the file holds {} ({} distinct)",
            written.len(),
            distinct.len()
        )
        .into());
    }
    if out_of_order > 0 {
        return Err("readings of a sensor were written out of order".into());
    }
    let last_reading = Position::from(READINGS_PER_SENSOR - 1);
    if committed.len() != SENSORS.len() || committed.values().any(|p| *p != last_reading) {
        return Err(format!(
            "expected the last reading ({last_reading}) of each sensor committed, got {committed:?}"
        )
        .into());
    }
    println!("custom_source: OK");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("custom_source: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
