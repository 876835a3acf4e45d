//! A Kinesis consumer whose shard leases and checkpoints live in PostgreSQL, so that several
//! workers (processes or hosts) can split a stream's shards. The example creates a 2-shard
//! stream, writes 1,000 records to it with flowgate's own `KinesisSink` (keys spread over both
//! shards), reads them with a `KinesisSource` that takes its shard leases in a
//! `PostgresStore` (the pipeline's checkpoint store too, so a worker that lost a lease can no
//! longer checkpoint its shard), and checks that every record arrived exactly once from both
//! shards. It then shows the leases and checkpoints the store holds, and deletes the stream.
//! Processes running such a consumer with the same stream, pipeline name and store split the
//! shards between them, and take over each other's shards when one stops.
//!
//! Needs kinesis-mock and PostgreSQL (`cargo xtask brokers up --only kinesis,postgres`; the
//! addresses come from `FLOWGATE_TEST_KINESIS_ENDPOINT` and `FLOWGATE_TEST_POSTGRES_URL`, by
//! default `http://127.0.0.1:4568` and `postgres://flowgate@127.0.0.1:15432/flowgate`):
//!
//! ```sh
//! cargo run -p flowgate --example kinesis_leases_postgres --features kinesis,postgres-store
//! ```
//!
//! flowgate reads and writes streams but does not create them; on AWS that is
//! `aws kinesis create-stream --stream-name NAME --shard-count 2` or your infrastructure code.
//! Against kinesis-mock, which does not check request signatures, this example creates and
//! deletes its stream with plain unsigned calls (and refuses any endpoint but loopback).

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flowgate::checkpoint::{PostgresConfig, PostgresStore};
use flowgate::core::{CheckpointStore, LeaseStore, PartitionId, Position, Record, Sink};
use flowgate::kinesis::{
    KinesisConnection, KinesisSink, KinesisSinkConfig, KinesisSource, KinesisSourceConfig,
};
use flowgate::runtime::adapters::MemorySink;
use flowgate::runtime::{Pipeline, RunSummary, Shutdown, StatsSnapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RECORDS: u64 = 1_000;
/// How long each step may take before the example fails.
const TIMEOUT: Duration = Duration::from_secs(90);
/// Shards of the stream the example creates.
const SHARDS: usize = 2;

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

/// One call of the Kinesis JSON API to kinesis-mock, unsigned (AWS itself would refuse it:
/// use the AWS CLI or SDK there). Only loopback endpoints are accepted.
async fn kinesis_mock(
    endpoint: &str,
    action: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, BoxError> {
    let host = endpoint
        .strip_prefix("http://")
        .map(|h| h.trim_end_matches('/'))
        .ok_or_else(|| format!("{endpoint}: expected http://HOST:PORT of kinesis-mock"))?;
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(host).await?.collect();
    if addrs.is_empty() || !addrs.iter().all(|a| a.ip().is_loopback()) {
        return Err(format!(
            "{endpoint}: unsigned calls go to a local kinesis-mock only; create the stream with the AWS CLI"
        )
        .into());
    }
    let mut conn = tokio::net::TcpStream::connect(&addrs[..])
        .await
        .map_err(|e| format!("{action}: cannot reach kinesis-mock at {endpoint}: {e}"))?;
    let body = body.to_string();
    let request = format!(
        "POST / HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/x-amz-json-1.1\r\n\
         X-Amz-Target: Kinesis_20131202.{action}\r\nX-Amz-Date: 20000101T000000Z\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=example/20000101/us-east-1/kinesis/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature=0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{action}: not an HTTP response from {endpoint}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("{action}: {status}: {body}").into());
    }
    if body.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    Ok(serde_json::from_str(body)?)
}

/// Creates a stream of `SHARDS` shards and waits until it is ACTIVE.
async fn create_stream(endpoint: &str, stream: &str) -> Result<(), BoxError> {
    kinesis_mock(
        endpoint,
        "CreateStream",
        serde_json::json!({ "StreamName": stream, "ShardCount": SHARDS }),
    )
    .await?;
    let started = Instant::now();
    loop {
        let summary = kinesis_mock(
            endpoint,
            "DescribeStreamSummary",
            serde_json::json!({ "StreamName": stream }),
        )
        .await?;
        if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE" {
            return Ok(());
        }
        if started.elapsed() > TIMEOUT {
            return Err(format!("stream {stream} not ACTIVE within {TIMEOUT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn payload(i: u64) -> String {
    format!(r#"{{"n":{i},"text":"record {i:04}"}}"#)
}

async fn run() -> Result<(), BoxError> {
    let endpoint = env_or("FLOWGATE_TEST_KINESIS_ENDPOINT", "http://127.0.0.1:4568");
    let postgres = env_or(
        "FLOWGATE_TEST_POSTGRES_URL",
        "postgres://flowgate@127.0.0.1:15432/flowgate",
    );
    let stream = unique("example-kinesis");
    let schema = stream.replace('-', "_");
    let pipeline = stream.clone();
    // kinesis-mock takes any static credentials; on AWS leave them `None` (default chain).
    let connection = KinesisConnection {
        endpoint_url: Some(endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("example".into()),
        secret_access_key: Some("example".into()),
        call_timeout: None,
    };
    println!(
        "kinesis_leases_postgres: stream {stream} ({SHARDS} shards), leases and checkpoints in schema {schema}"
    );

    // 1. The stream, and the input written with flowgate's own Kinesis sink. Each record has
    //    a key of its own, so the keys' hashes spread the records over both shards.
    let started = Instant::now();
    create_stream(&endpoint, &stream).await?;
    let producer = KinesisSink::connect(KinesisSinkConfig {
        stream: stream.clone(),
        connection: connection.clone(),
        ..Default::default()
    })
    .await?;
    let records: Vec<Record> = (0..RECORDS)
        .map(|i| {
            Record::new(PartitionId::new("input"), Position::from(i), payload(i))
                .with_key(format!("key-{i}"))
        })
        .collect();
    for chunk in records.chunks(250) {
        producer
            .write(chunk)
            .await
            .map_err(|e| format!("writing to Kinesis: {e:?}"))?;
    }
    println!(
        "kinesis_leases_postgres: created the stream and wrote {RECORDS} records in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    // 2. The consumer: leases and checkpoints in the same PostgreSQL store.
    let store = PostgresStore::connect(PostgresConfig {
        url: postgres,
        schema: schema.clone(),
        ..Default::default()
    })
    .await?;
    let source = KinesisSource::new(
        KinesisSourceConfig {
            stream: stream.clone(),
            connection,
            ..Default::default()
        },
        store.clone(),
    )?;
    let worker = source.worker_id().to_string();
    let out = MemorySink::new();
    let consumer = Pipeline::builder(pipeline.clone())
        .source(source)
        .sink(out.clone())
        .checkpoint_store(store.clone())
        .build()?;
    let summary = run_until(consumer, "reading the stream", |_| {
        out.len() as u64 >= RECORDS
    })
    .await?;

    // 3. What arrived, and what the store keeps.
    let got = out.records();
    let distinct: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_ref()).collect();
    let missing = (0..RECORDS)
        .filter(|i| !distinct.contains(payload(*i).as_bytes()))
        .count();
    let mut per_shard: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &got {
        *per_shard.entry(r.partition.as_str()).or_default() += 1;
    }
    println!(
        "kinesis_leases_postgres: worker {worker} read {} records in {:.2}s: {} distinct, {} duplicates, {missing} missing; per shard {per_shard:?}",
        got.len(),
        summary.elapsed.as_secs_f64(),
        distinct.len(),
        got.len() - distinct.len()
    );
    let leases = LeaseStore::leases(&*store, &pipeline).await?;
    for l in &leases {
        println!(
            "kinesis_leases_postgres: lease {}: epoch {}, owner {}",
            l.partition,
            l.epoch,
            l.owner.as_deref().unwrap_or("none (released at shutdown)")
        );
    }
    let checkpoints = CheckpointStore::load(&*store, &pipeline).await?;
    for c in &checkpoints {
        // A position is the sequence number and the KPL sub-sequence number in one.
        let at = match flowgate::kinesis::kpl::sequence_of(&c.position) {
            Some((sequence, sub)) => format!("sequence number {sequence} (sub-sequence {sub})"),
            None => format!("position {}", c.position),
        };
        println!(
            "kinesis_leases_postgres: checkpoint {}: fence {:?}, {at}",
            c.partition, c.fence
        );
    }
    kinesis_mock(
        &endpoint,
        "DeleteStream",
        serde_json::json!({ "StreamName": stream }),
    )
    .await?;

    if got.len() as u64 != RECORDS || distinct.len() as u64 != RECORDS || missing > 0 {
        return Err("the consumer did not get each record exactly once".into());
    }
    if per_shard.len() != SHARDS || leases.len() != SHARDS || checkpoints.len() != SHARDS {
        return Err(format!(
            "expected records, a lease and a checkpoint for each of the {SHARDS} shards \
             (records from {}, {} leases, {} checkpoints)",
            per_shard.len(),
            leases.len(),
            checkpoints.len()
        )
        .into());
    }
    println!("kinesis_leases_postgres: OK");
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
            eprintln!("kinesis_leases_postgres: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
