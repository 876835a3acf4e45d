//! A RabbitMQ → Kafka bridge. The example publishes 1,000 messages (each with an AMQP
//! `message_id`) to a new RabbitMQ queue with flowgate's own `RabbitSink`, bridges them into a
//! new Kafka topic with a `RabbitSource` → `KafkaSink` pipeline until all of them are
//! acknowledged, then reads the topic with a `KafkaSource` and checks that every message
//! arrived exactly once and that its `message_id` travelled along as the
//! `flowgate-idempotency-key` header.
//!
//! Needs Kafka and RabbitMQ (`cargo xtask brokers up --only kafka,rabbitmq`; the addresses
//! come from `FLOWGATE_TEST_KAFKA_BOOTSTRAP` and `FLOWGATE_TEST_RABBITMQ_URL`, by default
//! `127.0.0.1:9092` and `amqp://guest:guest@127.0.0.1:5672/%2f`):
//!
//! ```sh
//! cargo run -p flowgate --example rabbitmq_to_kafka --features kafka,rabbitmq
//! ```

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flowgate::core::{IdempotencyKey, PartitionId, Position, Record, Sink, headers};
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
    format!(r#"{{"n":{i},"text":"message {i:04}"}}"#)
}

fn message_id(i: u64) -> String {
    format!("msg-{i:06}")
}

async fn run() -> Result<(), BoxError> {
    let bootstrap = env_or("FLOWGATE_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092");
    let amqp = env_or(
        "FLOWGATE_TEST_RABBITMQ_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let queue = unique("example-r2k");
    let topic = queue.clone();
    println!("rabbitmq_to_kafka: RabbitMQ queue {queue} -> Kafka topic {topic}");

    // 1. Publish the input with flowgate's own RabbitMQ sink, which declares the queue. The
    //    idempotency key travels as the AMQP `message_id`.
    let started = Instant::now();
    let publisher = RabbitSink::new(RabbitSinkConfig {
        url: amqp.clone(),
        routing_key: Some(queue.clone()),
        declare_queue: Some(queue.clone()),
        ..Default::default()
    })?;
    let records: Vec<Record> = (0..RECORDS)
        .map(|i| {
            Record::new(PartitionId::new("input"), Position::from(i), payload(i))
                .with_idempotency_key(IdempotencyKey::new(message_id(i)))
        })
        .collect();
    for chunk in records.chunks(250) {
        publisher
            .write(chunk)
            .await
            .map_err(|e| format!("publishing to RabbitMQ: {e:?}"))?;
    }
    publisher.close().await?;
    println!(
        "rabbitmq_to_kafka: published {RECORDS} messages to RabbitMQ in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    // 2. The bridge: a message is acknowledged to RabbitMQ only after Kafka's delivery report.
    //    The source makes each `message_id` the record's idempotency key, and the Kafka sink
    //    forwards it as a header. (RabbitMQ redelivers unacknowledged messages after a lost
    //    connection; with `.dedup(store, ..)` the runtime skips those already written, by
    //    that message id.)
    let bridge = Pipeline::builder(unique("example-r2k-bridge"))
        .source(RabbitSource::new(RabbitSourceConfig {
            url: amqp.clone(),
            queue: queue.clone(),
            ..Default::default()
        })?)
        .sink(KafkaSink::new(KafkaSinkConfig {
            bootstrap_servers: bootstrap.clone(),
            topic: Some(topic.clone()),
            ..Default::default()
        })?)
        .build()?;
    let bridged = run_until(bridge, "bridging", |s| s.records_acked >= RECORDS).await?;
    println!(
        "rabbitmq_to_kafka: bridged in {:.2}s: in {}, out {}, commits {}",
        bridged.elapsed.as_secs_f64(),
        bridged.stats.records_in,
        bridged.stats.records_out,
        bridged.stats.commits
    );

    // 3. Read the topic back from the beginning and check every message arrived once, with
    //    its message id.
    let out = MemorySink::new();
    let reader = Pipeline::builder(unique("example-r2k-check"))
        .source(KafkaSource::new(KafkaSourceConfig {
            bootstrap_servers: bootstrap,
            topics: vec![topic.clone()],
            ..Default::default()
        })?)
        .sink(out.clone())
        .build()?;
    run_until(reader, "reading the topic back", |_| {
        out.len() as u64 >= RECORDS
    })
    .await?;
    let got = out.records();
    let distinct: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_ref()).collect();
    let missing = (0..RECORDS)
        .filter(|i| !distinct.contains(payload(*i).as_bytes()))
        .count();
    let wrong_ids = got
        .iter()
        .filter(|r| {
            let n = serde_json::from_slice::<serde_json::Value>(&r.payload)
                .ok()
                .and_then(|v| v.get("n").and_then(serde_json::Value::as_u64));
            let id = r.headers.get(headers::IDEMPOTENCY_KEY);
            n.is_none_or(|n| id.is_none_or(|id| id.as_ref() != message_id(n).as_bytes()))
        })
        .count();
    println!(
        "rabbitmq_to_kafka: read back {} records from Kafka: {} distinct, {} duplicates, {missing} missing, {wrong_ids} without their message id",
        got.len(),
        distinct.len(),
        got.len() - distinct.len()
    );
    if got.len() as u64 != RECORDS || distinct.len() as u64 != RECORDS || missing > 0 {
        return Err("the topic does not hold each published message exactly once".into());
    }
    if wrong_ids > 0 {
        return Err("message ids were lost on the way".into());
    }
    println!("rabbitmq_to_kafka: OK");
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
            eprintln!("rabbitmq_to_kafka: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
