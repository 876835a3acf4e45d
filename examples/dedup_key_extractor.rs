//! Deduplication with your own key extractor, on the embedded store: order events carry
//! their business id (`order_id`) inside the JSON payload, so a replay is recognised by that
//! id wherever the copy lands. The first run applies 1,000 orders (4 partitions); then the
//! upstream replays the same export, partitioned differently (3 partitions, other positions,
//! so neither a checkpoint nor `KeyExtractor::SourcePosition` would recognise it). The second
//! run skips every replayed order: the sink applied exactly as many orders as there are
//! distinct ids. The marks are durable in the store's file (`dedup_ttl`, default 7 days), so
//! a restarted process skips the replay the same way.
//!
//! No broker needed:
//!
//! ```sh
//! cargo run -p flowgate --example dedup_key_extractor
//! ```

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use flowgate::checkpoint::EmbeddedStore;
use flowgate::core::{IdempotencyKey, PartitionId, Position, Record};
use flowgate::runtime::adapters::{MemorySink, MemorySource};
use flowgate::runtime::{KeyExtractor, Pipeline, RunSummary, RuntimeSettings, Shutdown};

const ORDERS: u64 = 1_000;
/// A run stops here at the latest, and the example fails.
const TIMEOUT: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error>;

/// The export of `ORDERS` orders spread over `partitions` partitions. The broker key is the
/// customer (as a producer partitioning by customer would set it), not the order.
fn export(partitions: u64) -> Vec<Record> {
    (0..ORDERS)
        .map(|n| {
            let p = n % partitions;
            let payload = format!(
                r#"{{"order_id":"ord-{n:06}","customer":"c-{:03}","amount_cents":{}}}"#,
                n % 97,
                100 + n * 7 % 5_000
            );
            Record::new(
                PartitionId::new(format!("orders-{p}")),
                Position::from(n / partitions),
                payload,
            )
            .with_key(format!("c-{:03}", n % 97))
        })
        .collect()
}

/// The idempotency key of an order event: its `order_id`. A record without one gets no key
/// and is processed without dedup (the runtime counts those).
fn order_id(r: &Record) -> Option<IdempotencyKey> {
    let v: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
    let id = v.get("order_id")?.as_str()?;
    Some(IdempotencyKey::new(id.to_string()))
}

/// One run of the pipeline over `records` into `sink`, deduplicated by order id in `store`.
async fn apply(
    store: Arc<EmbeddedStore>,
    records: Vec<Record>,
    sink: MemorySink,
) -> Result<RunSummary, BoxError> {
    let summary = Pipeline::builder("dedup-key-extractor-example")
        .source(MemorySource::new(records))
        .sink(sink)
        .dedup(store, KeyExtractor::Custom(Arc::new(order_id)))
        .settings(RuntimeSettings::default())
        .build()?
        // The memory source is finite: the pipeline ends when it has delivered everything.
        .run(Shutdown::after(TIMEOUT))
        .await?;
    if summary.stats.records_acked != ORDERS {
        return Err(format!(
            "a run settled {} of {ORDERS} records within {TIMEOUT:?}",
            summary.stats.records_acked
        )
        .into());
    }
    Ok(summary)
}

async fn run() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let sink = MemorySink::new();

    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await?);
    let first = apply(store.clone(), export(4), sink.clone()).await?;
    println!(
        "dedup_key_extractor: run 1 (4 partitions): in {}, applied {}, dedup hits {} in {:.2}s",
        first.stats.records_in,
        first.stats.records_out,
        first.stats.dedup_hits,
        first.elapsed.as_secs_f64()
    );

    let replay = apply(store, export(3), sink.clone()).await?;
    println!(
        "dedup_key_extractor: run 2 (the same orders replayed on 3 partitions): in {}, applied {}, dedup hits {} in {:.2}s",
        replay.stats.records_in,
        replay.stats.records_out,
        replay.stats.dedup_hits,
        replay.elapsed.as_secs_f64()
    );

    let applied = sink.records();
    let distinct: HashSet<IdempotencyKey> = applied.iter().filter_map(order_id).collect();
    println!(
        "dedup_key_extractor: applied {} orders in total, {} distinct order ids",
        applied.len(),
        distinct.len()
    );
    if applied.len() as u64 != ORDERS || distinct.len() as u64 != ORDERS {
        return Err(format!(
            "expected {ORDERS} orders applied once each, got {} ({} distinct)",
            applied.len(),
            distinct.len()
        )
        .into());
    }
    if replay.stats.dedup_hits != ORDERS {
        return Err(format!(
            "expected the replay's {ORDERS} orders skipped, {} were",
            replay.stats.dedup_hits
        )
        .into());
    }
    println!("dedup_key_extractor: OK");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedup_key_extractor: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
