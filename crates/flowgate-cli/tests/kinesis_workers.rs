//! Two `flowgate run` processes share a 4-shard Kinesis stream (kinesis-mock) through leases in
//! PostgreSQL, and again in DynamoDB (moto): they balance 2 + 2; one is SIGKILLed mid-stream; the other takes its shards over from their
//! checkpoints within a few lease periods; every record ends up in the sinks (duplicates only
//! from the killed worker's uncommitted window, counted).
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used)]

mod cli;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_checkpoint::{DynamoDbConfig, DynamoDbStore, PostgresConfig, PostgresStore};
use flowgate_core::{LeaseStore, PartitionId, Position, Record, Sink};
use flowgate_kinesis::{KinesisConnection, KinesisSink, KinesisSinkConfig};
use flowgate_rig_tests::{endpoint, unique};
use flowgate_runtime::adapters::JsonLinesSink;

const PER_ROUND: usize = 2_000;
const TTL_SECS: u64 = 3;

fn connection() -> KinesisConnection {
    KinesisConnection {
        endpoint_url: Some(endpoint("FLOWGATE_TEST_KINESIS_ENDPOINT")),
        region: Some("us-east-1".into()),
        access_key_id: Some("flowgate".into()),
        secret_access_key: Some("flowgate".into()),
        call_timeout: None,
    }
}

async fn create_stream(stream: &str) {
    let c = connection();
    let config = aws_config::from_env()
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "flowgate", "flowgate", None, None, "test",
        ))
        .endpoint_url(c.endpoint_url.unwrap())
        .load()
        .await;
    let k = aws_sdk_kinesis::Client::new(&config);
    k.create_stream()
        .stream_name(stream)
        .shard_count(4)
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = k
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .unwrap();
        if d.stream_description_summary().unwrap().stream_status()
            == &aws_sdk_kinesis::types::StreamStatus::Active
        {
            return;
        }
        assert!(Instant::now() < deadline, "stream never became ACTIVE");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `PER_ROUND` records with distinct partition keys (spread over the shards) through the
/// flowgate Kinesis sink.
async fn produce(stream: &str, round: usize) {
    let sink = KinesisSink::connect(KinesisSinkConfig {
        stream: stream.into(),
        connection: connection(),
        ..Default::default()
    })
    .await
    .unwrap();
    let records: Vec<Record> = (0..PER_ROUND)
        .map(|i| {
            Record::new(
                PartitionId::new("producer"),
                Position::from(i as u64),
                format!("r{round}-{i:05}"),
            )
            .with_key(format!("key-{round}-{i}"))
        })
        .collect();
    for chunk in records.chunks(500) {
        let mut pending = chunk.to_vec();
        while !pending.is_empty() {
            match sink.write(&pending).await {
                Ok(()) => pending.clear(),
                Err(flowgate_core::WriteError::Partial(failed)) => {
                    pending = failed.iter().map(|(i, _)| pending[*i].clone()).collect();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(flowgate_core::WriteError::Batch(e)) => panic!("produce: {e}"),
            }
        }
    }
}

fn config(stream: &str, worker: &str, out: &Path, store: &str, name: &str) -> String {
    let c = connection();
    format!(
        r#"
name = "{name}"

[source]
type = "kinesis"
stream = "{stream}"
worker_id = "{worker}"
lease_ttl = "{TTL_SECS}s"
shard_refresh = "2s"
idle_backoff = "200ms"
connection = {{ endpoint_url = "{endpoint}", region = "us-east-1", access_key_id = "flowgate", secret_access_key = "flowgate" }}

[sink]
type = "jsonl"
path = "{out}"

{store}

[runtime.commit]
every_records = 200
every = "200ms"
"#,
        endpoint = c.endpoint_url.unwrap(),
        out = out.display(),
    )
}

fn spawn(dir: &Path, worker: &str, cfg: &str) -> Child {
    let path = dir.join(format!("{worker}.toml"));
    std::fs::write(&path, cfg).unwrap();
    Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["run", "--config"])
        .arg(&path)
        .env("FLOWGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{worker}.log"))).unwrap())
        .spawn()
        .unwrap()
}

/// Live leases per owner.
async fn owners(store: &dyn LeaseStore, name: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in store.leases(name).await.unwrap() {
        if let (Some(o), false) = (&l.owner, l.remaining.is_zero()) {
            *m.entry(o.clone()).or_default() += 1;
        }
    }
    m
}

fn payloads(files: &[&Path]) -> (BTreeMap<String, usize>, usize) {
    let mut m = BTreeMap::new();
    let mut total = 0;
    for f in files {
        if !f.exists() {
            continue;
        }
        for r in JsonLinesSink::read(f).unwrap() {
            *m.entry(String::from_utf8_lossy(&r.payload).into_owned())
                .or_default() += 1;
            total += 1;
        }
    }
    (m, total)
}

async fn wait_until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_stream_and_one_takes_over_after_a_sigkill() {
    let pg_url = endpoint("FLOWGATE_TEST_POSTGRES_URL");
    let schema = unique("kw").replace('-', "_");
    let store = PostgresStore::connect(PostgresConfig {
        url: pg_url.clone(),
        schema: schema.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let section =
        format!("[store]\ntype = \"postgres\"\nurl = \"{pg_url}\"\nschema = \"{schema}\"");
    share_and_take_over(store, &section).await;
}

/// The same with the leases and checkpoints in DynamoDB, where a lease's expiry is judged by
/// each worker's own clock (the KCL's way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_stream_through_dynamodb_leases() {
    let cfg = DynamoDbConfig {
        table: unique("kw"),
        endpoint_url: Some(endpoint("FLOWGATE_TEST_DYNAMODB_ENDPOINT")),
        region: Some("us-east-1".into()),
        access_key_id: Some("flowgate".into()),
        secret_access_key: Some("flowgate".into()),
        ..Default::default()
    };
    let store = DynamoDbStore::connect(cfg.clone()).await.unwrap();
    let section = format!(
        "[store]\ntype = \"dynamodb\"\ntable = \"{}\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"flowgate\"\nsecret_access_key = \"flowgate\"",
        cfg.table,
        cfg.endpoint_url.as_deref().unwrap()
    );
    share_and_take_over(store, &section).await;
}

async fn share_and_take_over(store: Arc<dyn LeaseStore>, section: &str) {
    let store = &*store;
    let dir = tempfile::tempdir().unwrap();
    let stream = unique("cli-workers");
    let name = unique("cli-workers-pipeline");
    create_stream(&stream).await;
    produce(&stream, 0).await;
    let (out_a, out_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    // From outside, before anything runs: reachable, and every shard behind by its records'
    // age, held by nobody.
    let config_a = dir.path().join("worker-a.toml");
    std::fs::write(
        &config_a,
        config(&stream, "worker-a", &out_a, section, &name),
    )
    .unwrap();
    let (code, report) = cli::validate(&config_a);
    assert_eq!(code, 0, "{report}");
    let before = cli::lag(&config_a);
    assert_eq!(before.len(), 4, "{before:?}");
    assert!(
        before
            .values()
            .any(|p| p["lag_seconds"].as_f64().unwrap() > 0.0),
        "records wait: {before:?}"
    );
    assert!(before.values().all(|p| p["owner"].is_null()), "{before:?}");
    let mut a = spawn(
        dir.path(),
        "worker-a",
        &config(&stream, "worker-a", &out_a, section, &name),
    );
    wait_until(
        "A takes the 4 shards",
        Duration::from_secs(60),
        async || owners(store, &name).await.get("worker-a") == Some(&4),
    )
    .await;
    let mut b = spawn(
        dir.path(),
        "worker-b",
        &config(&stream, "worker-b", &out_b, section, &name),
    );
    let balanced = wait_until("2 + 2", Duration::from_secs(60), async || {
        let o = owners(store, &name).await;
        o.get("worker-a") == Some(&2) && o.get("worker-b") == Some(&2)
    })
    .await;
    // Round 1 is produced while both read; A is killed part way through it.
    let producing = tokio::spawn({
        let stream = stream.clone();
        async move { produce(&stream, 1).await }
    });
    let files = [out_a.as_path(), out_b.as_path()];
    wait_until(
        "part of round 1 read",
        Duration::from_secs(90),
        async || payloads(&files).0.len() >= PER_ROUND + PER_ROUND / 4,
    )
    .await;
    assert!(a.try_wait().unwrap().is_none(), "A is still running");

    a.kill().unwrap();
    a.wait().unwrap();
    let taken_over = wait_until(
        "B holds all 4 after A's SIGKILL",
        Duration::from_secs(TTL_SECS * 4),
        async || owners(store, &name).await.get("worker-b") == Some(&4),
    )
    .await;
    producing.await.unwrap();
    produce(&stream, 2).await;
    wait_until("every record read", Duration::from_secs(90), async || {
        payloads(&files).0.len() >= 3 * PER_ROUND
    })
    .await;
    // From outside again: B holds every shard, and nothing is behind its checkpoints.
    wait_until(
        "flowgate lag: 0 behind, B owns all",
        Duration::from_secs(30),
        async || {
            let config_a = config_a.clone();
            let now = tokio::task::spawn_blocking(move || cli::lag(&config_a))
                .await
                .unwrap();
            now.values()
                .all(|p| p["lag_seconds"].as_f64() == Some(0.0) && p["owner"] == "worker-b")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.kill().unwrap();
    b.wait().unwrap();

    let (m, total) = payloads(&files);
    for round in 0..3 {
        for i in 0..PER_ROUND {
            assert!(
                m.contains_key(&format!("r{round}-{i:05}")),
                "r{round}-{i} lost"
            );
        }
    }
    assert_eq!(m.len(), 3 * PER_ROUND, "no unexpected records");
    eprintln!(
        "cli/kinesis workers ({}): {} records, 2 processes balanced 2+2 in {balanced:?}; after A's SIGKILL, B held all 4 shards in {taken_over:?} (lease ttl {TTL_SECS}s); {} duplicates (A's uncommitted window), 0 lost",
        store.describe(),
        m.len(),
        total - m.len()
    );
}
