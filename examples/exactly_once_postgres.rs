//! Kafka → PostgreSQL, exactly once. The example produces 1,000 records to a new Kafka topic
//! and writes them with a `KafkaSource` → `PostgresTableSink` pipeline into a table of a new
//! PostgreSQL schema. The table sink commits each batch's rows together with their dedup marks
//! in one transaction, with `KeyExtractor::SourcePosition` (topic, partition, offset) as the
//! key. Then it forgets the checkpoints and reads the whole topic again under a new consumer
//! group: every record comes back, none is written twice, and the table still holds each
//! record exactly once.
//!
//! Needs Kafka and PostgreSQL (`cargo xtask brokers up --only kafka,postgres`; the addresses
//! come from `FLOWGATE_TEST_KAFKA_BOOTSTRAP` and `FLOWGATE_TEST_POSTGRES_URL`, by default
//! `127.0.0.1:9092` and `postgres://flowgate@127.0.0.1:15432/flowgate`):
//!
//! ```sh
//! cargo run -p flowgate --example exactly_once_postgres --features kafka,postgres-store
//! ```

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flowgate::checkpoint::{PostgresConfig, PostgresStore, TableMode};
use flowgate::core::{CheckpointStore, PartitionId, Position, Record, Sink};
use flowgate::kafka::{KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig};
use flowgate::runtime::{KeyExtractor, Pipeline, RunSummary, Shutdown, StatsSnapshot};

const RECORDS: u64 = 1_000;
/// How long each step may take before the example fails.
const TIMEOUT: Duration = Duration::from_secs(90);

type BoxError = Box<dyn std::error::Error>;

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// A name no earlier run used: prefix, process id, nanoseconds.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Runs `pipeline` until `done` (given the pipeline's statistics, checked every 50 ms) holds,
/// then shuts it down (drain, final commit). Fails if the pipeline stops on its own or
/// `TIMEOUT` passes first.
async fn run_until(
    pipeline: Pipeline,
    what: &str,
    mut done: impl FnMut(&StatsSnapshot) -> bool,
) -> Result<RunSummary, BoxError> {
    let stats = pipeline.stats();
    let (trigger, shutdown) = Shutdown::manual();
    let mut run = tokio::spawn(pipeline.run(shutdown));
    let started = Instant::now();
    while !done(&stats.snapshot()) {
        if started.elapsed() > TIMEOUT {
            trigger.trigger();
            let _ = run.await;
            return Err(format!(
                "{what}: not done within {TIMEOUT:?} ({:?})",
                stats.snapshot()
            )
            .into());
        }
        tokio::select! {
            res = &mut run => {
                return Err(match res {
                    Ok(Ok(summary)) => format!("{what}: the pipeline stopped early: {summary}"),
                    Ok(Err(e)) => format!("{what}: {e}"),
                    Err(e) => format!("{what}: the pipeline task failed: {e}"),
                }
                .into());
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    trigger.trigger();
    Ok(run.await??)
}

fn payload(i: u64) -> String {
    format!(r#"{{"n":{i},"text":"record {i:04}"}}"#)
}

async fn run() -> Result<(), BoxError> {
    let bootstrap = env_or("FLOWGATE_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092");
    let postgres = env_or(
        "FLOWGATE_TEST_POSTGRES_URL",
        "postgres://flowgate@127.0.0.1:15432/flowgate",
    );
    let topic = unique("example-eo");
    // Schema names are letters, digits and `_`.
    let schema = topic.replace('-', "_");
    let pipeline = topic.clone();
    println!("exactly_once_postgres: Kafka topic {topic} -> table {schema}.events");

    // 1. Produce the input with flowgate's own Kafka sink; the broker creates the topic.
    let started = Instant::now();
    let producer = KafkaSink::new(KafkaSinkConfig {
        bootstrap_servers: bootstrap.clone(),
        topic: Some(topic.clone()),
        ..Default::default()
    })?;
    let records: Vec<Record> = (0..RECORDS)
        .map(|i| Record::new(PartitionId::new("input"), Position::from(i), payload(i)))
        .collect();
    for chunk in records.chunks(250) {
        producer
            .write(chunk)
            .await
            .map_err(|e| format!("producing to Kafka: {e:?}"))?;
    }
    producer.close().await?;
    println!(
        "exactly_once_postgres: produced {RECORDS} records to Kafka in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    // 2. The store keeps checkpoints and dedup marks; the table sink writes into its database.
    let store = PostgresStore::connect(PostgresConfig {
        url: postgres,
        schema: schema.clone(),
        ..Default::default()
    })
    .await?;
    let table = store
        .table_sink(&pipeline, "events", TableMode::Insert)
        .await?;

    // One run: the topic under consumer group `group` into the table, until every record is
    // settled (written, or skipped as already written).
    let run_once = |group: String| {
        let (store, table, pipeline, bootstrap, topic) = (
            store.clone(),
            table.clone(),
            pipeline.clone(),
            bootstrap.clone(),
            topic.clone(),
        );
        async move {
            let p = Pipeline::builder(pipeline)
                .source(KafkaSource::new(KafkaSourceConfig {
                    bootstrap_servers: bootstrap,
                    topics: vec![topic],
                    group_id: Some(group),
                    ..Default::default()
                })?)
                .sink(table)
                .checkpoint_store(store.clone())
                .dedup(store, KeyExtractor::SourcePosition)
                .build()?;
            run_until(p, "writing to PostgreSQL", |s| s.records_acked >= RECORDS).await
        }
    };

    let first = run_once(unique("example-eo-first")).await?;
    println!(
        "exactly_once_postgres: run 1 in {:.2}s: in {}, written {}, dedup hits {}",
        first.elapsed.as_secs_f64(),
        first.stats.records_in,
        first.stats.records_out,
        first.stats.dedup_hits
    );

    // 3. Replay the same offsets: no checkpoints, and a new group with no committed offsets,
    //    so the source starts again from the beginning of every partition.
    CheckpointStore::reset(&*store, &pipeline, None).await?;
    let replay = run_once(unique("example-eo-replay")).await?;
    println!(
        "exactly_once_postgres: run 2 (replay from offset 0) in {:.2}s: in {}, written {}, dedup hits {}",
        replay.elapsed.as_secs_f64(),
        replay.stats.records_in,
        replay.stats.records_out,
        replay.stats.dedup_hits
    );

    // 4. The table, read through the sink (`id` order).
    let rows = table.rows().await?;
    let distinct: HashSet<(PartitionId, Position)> = rows
        .iter()
        .map(|r| (r.partition.clone(), r.position.clone()))
        .collect();
    let payloads: HashSet<&[u8]> = rows.iter().map(|r| r.payload.as_ref()).collect();
    let missing = (0..RECORDS)
        .filter(|i| !payloads.contains(payload(*i).as_bytes()))
        .count();
    println!(
        "exactly_once_postgres: table {schema}.events holds {} rows: {} distinct offsets, {} duplicates, {missing} missing",
        rows.len(),
        distinct.len(),
        rows.len() - distinct.len()
    );
    if rows.len() as u64 != RECORDS || distinct.len() as u64 != RECORDS || missing > 0 {
        return Err("the table does not hold each produced record exactly once".into());
    }
    if replay.stats.records_in < RECORDS || replay.stats.dedup_hits < RECORDS {
        return Err(format!(
            "the replay should have read all {RECORDS} records again and skipped them all (read {}, skipped {})",
            replay.stats.records_in, replay.stats.dedup_hits
        )
        .into());
    }
    println!("exactly_once_postgres: OK");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exactly_once_postgres: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
