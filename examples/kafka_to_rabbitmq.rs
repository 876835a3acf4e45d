//! A Kafka → RabbitMQ bridge. The example produces 1,000 records to a new Kafka topic
//! (created by the broker on first use), bridges them into a new RabbitMQ queue with a
//! `KafkaSource` → `RabbitSink` pipeline until all of them are acknowledged, then consumes the
//! queue with a `RabbitSource` and checks that every record arrived exactly once.
//!
//! Needs Kafka and RabbitMQ (`cargo xtask brokers up --only kafka,rabbitmq`; the addresses
//! come from `FLOWGATE_TEST_KAFKA_BOOTSTRAP` and `FLOWGATE_TEST_RABBITMQ_URL`, by default
//! `127.0.0.1:9092` and `amqp://guest:guest@127.0.0.1:5672/%2f`):
//!
//! ```sh
//! cargo run -p flowgate --example kafka_to_rabbitmq --features kafka,rabbitmq
//! ```

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flowgate::core::{PartitionId, Position, Record, Sink};
use flowgate::kafka::{KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig};
use flowgate::rabbitmq::{RabbitSink, RabbitSinkConfig, RabbitSource, RabbitSourceConfig};
use flowgate::runtime::adapters::MemorySink;
use flowgate::runtime::{Pipeline, RunSummary, Shutdown, StatsSnapshot};

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
    let amqp = env_or(
        "FLOWGATE_TEST_RABBITMQ_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let topic = unique("example-k2r");
    let queue = topic.clone();
    println!("kafka_to_rabbitmq: Kafka topic {topic} -> RabbitMQ queue {queue}");

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
        "kafka_to_rabbitmq: produced {RECORDS} records to Kafka in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    // 2. The bridge: Kafka offsets are committed only after RabbitMQ confirmed the publishes.
    let bridge = Pipeline::builder(unique("example-k2r-bridge"))
        .source(KafkaSource::new(KafkaSourceConfig {
            bootstrap_servers: bootstrap.clone(),
            topics: vec![topic.clone()],
            ..Default::default()
        })?)
        .sink(RabbitSink::new(RabbitSinkConfig {
            url: amqp.clone(),
            routing_key: Some(queue.clone()),
            declare_queue: Some(queue.clone()),
            ..Default::default()
        })?)
        .build()?;
    let bridged = run_until(bridge, "bridging", |s| s.records_acked >= RECORDS).await?;
    println!(
        "kafka_to_rabbitmq: bridged in {:.2}s: in {}, out {}, commits {}, checkpoints {}",
        bridged.elapsed.as_secs_f64(),
        bridged.stats.records_in,
        bridged.stats.records_out,
        bridged.stats.commits,
        bridged.checkpoints.len()
    );

    // 3. Read the queue back and check every record arrived once.
    let out = MemorySink::new();
    let reader = Pipeline::builder(unique("example-k2r-check"))
        .source(RabbitSource::new(RabbitSourceConfig {
            url: amqp,
            queue: queue.clone(),
            ..Default::default()
        })?)
        .sink(out.clone())
        .build()?;
    run_until(reader, "reading the queue back", |_| {
        out.len() as u64 >= RECORDS
    })
    .await?;
    let got = out.records();
    let distinct: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_ref()).collect();
    let missing = (0..RECORDS)
        .filter(|i| !distinct.contains(payload(*i).as_bytes()))
        .count();
    println!(
        "kafka_to_rabbitmq: read back {} messages from RabbitMQ: {} distinct, {} duplicates, {missing} missing",
        got.len(),
        distinct.len(),
        got.len() - distinct.len()
    );
    if got.len() as u64 != RECORDS || distinct.len() as u64 != RECORDS || missing > 0 {
        return Err("the queue does not hold each produced record exactly once".into());
    }
    println!("kafka_to_rabbitmq: OK");
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
            eprintln!("kafka_to_rabbitmq: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
