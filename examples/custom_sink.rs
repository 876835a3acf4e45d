//! Implementing the `Sink` trait for your own type: `TallySink` keeps, in memory, which
//! records it was given and how the runtime batched them. A finite generator (4 partitions of
//! 250 records) feeds it; the pipeline ends by itself when the generator has delivered
//! everything, and the example checks that each of the 1,000 records arrived exactly once, in
//! order within its partition, in batches no larger than the sink declared.
//!
//! No broker needed:
//!
//! ```sh
//! cargo run -p flowgate --example custom_sink
//! ```
//!
//! The traits are async traits: implement them under `#[async_trait]`, re-exported as
//! `flowgate::core::async_trait`, and write plain `async fn`s.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flowgate::core::{
    PartitionId, Position, Record, Sink, SinkCapabilities, WriteError, async_trait,
};
use flowgate::runtime::adapters::{GeneratorConfig, GeneratorSource};
use flowgate::runtime::{Pipeline, RuntimeSettings, Shutdown};

const PARTITIONS: u32 = 4;
const PER_PARTITION: u64 = 250;
const TOTAL: u64 = PARTITIONS as u64 * PER_PARTITION;
/// The largest batch this sink accepts; the runtime never sends a larger one.
const MAX_BATCH: usize = 64;
/// The run stops here at the latest, and the example fails.
const TIMEOUT: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error>;

/// What the sink has seen. Clones share it, so `main` keeps one to look at afterwards.
#[derive(Clone, Default)]
struct TallySink {
    seen: Arc<Mutex<Tally>>,
}

#[derive(Default)]
struct Tally {
    records: u64,
    batches: u64,
    largest_batch: usize,
    /// Every (partition, position) written; a second write of one is a duplicate.
    distinct: HashSet<(PartitionId, Position)>,
    duplicates: u64,
    /// The last position per partition, to check the per-partition order.
    last: BTreeMap<PartitionId, Position>,
    out_of_order: u64,
}

impl TallySink {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Sink for TallySink {
    fn capabilities(&self) -> SinkCapabilities {
        // Declared limits are what the runtime keys off: it never sends more per `write`.
        SinkCapabilities::basic().with_batch_limits(Some(MAX_BATCH), None)
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        // A real sink sends the batch here and returns `Ok` only once every record of it is
        // durable; a temporary failure is `WriteError::Batch(Error::transient(..))` (the
        // runtime retries it), a record that can never succeed is reported in
        // `WriteError::Partial` with kind `Poison` (the runtime dead-letters it).
        let mut t = self.tally();
        t.records += batch.len() as u64;
        t.batches += 1;
        t.largest_batch = t.largest_batch.max(batch.len());
        for r in batch {
            if !t.distinct.insert((r.partition.clone(), r.position.clone())) {
                t.duplicates += 1;
            }
            let previous = t.last.insert(r.partition.clone(), r.position.clone());
            if previous.is_some_and(|p| p >= r.position) {
                t.out_of_order += 1;
            }
        }
        Ok(())
    }

    // `flush`, `close`, `check` and `write_transactional` have default bodies; override them
    // the same way when the sink buffers, holds connections, or can write transactionally.
}

async fn run() -> Result<(), BoxError> {
    let sink = TallySink::default();
    let source = GeneratorSource::new(GeneratorConfig {
        partitions: PARTITIONS,
        records_per_partition: Some(PER_PARTITION),
        ..Default::default()
    })?;
    let summary = Pipeline::builder("custom-sink-example")
        .source(source)
        .sink(sink.clone())
        .settings(RuntimeSettings::default())
        .build()?
        // The generator is finite: the pipeline ends when it has delivered everything.
        .run(Shutdown::after(TIMEOUT))
        .await?;

    let t = sink.tally();
    println!(
        "custom_sink: {} records in {} batches (largest {}, limit {MAX_BATCH}) over {} partitions in {:.2}s",
        t.records,
        t.batches,
        t.largest_batch,
        t.last.len(),
        summary.elapsed.as_secs_f64()
    );
    println!(
        "custom_sink: distinct {}, duplicates {}, out of order {}",
        t.distinct.len(),
        t.duplicates,
        t.out_of_order
    );
    if t.records != TOTAL || t.distinct.len() as u64 != TOTAL {
        return Err(format!(
            "expected {TOTAL} distinct records, got {} ({} distinct) within {TIMEOUT:?}",
            t.records,
            t.distinct.len()
        )
        .into());
    }
    if t.duplicates > 0 || t.out_of_order > 0 {
        return Err("records were written twice or out of order".into());
    }
    if t.largest_batch > MAX_BATCH {
        return Err(format!("a batch of {} exceeded the declared limit", t.largest_batch).into());
    }
    println!("custom_sink: OK");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("custom_sink: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
