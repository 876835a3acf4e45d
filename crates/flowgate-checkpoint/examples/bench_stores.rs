//! Harness of `cargo xtask bench stores`: checkpoint commits, dedup operations and lease
//! renewals per second, one key per call against many keys per call, for every store.
//!
//! ```text
//! bench_stores STORE SECONDS     STORE: embedded | postgres (FLOWGATE_TEST_POSTGRES_URL)
//!                                 | redis (FLOWGATE_TEST_REDIS_URL)
//!                                 | dynamodb (FLOWGATE_TEST_DYNAMODB_ENDPOINT)
//! ```
//! Prints one line per measurement: `store operation keys_per_call calls_per_second keys_per_second`;
//! for DynamoDB also `calls dynamodb operation api_calls_per_operation` (what AWS bills).
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_checkpoint::{
    DynamoDbConfig, DynamoDbStore, EmbeddedStore, PostgresConfig, PostgresStore, RedisConfig,
    RedisStore,
};
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, IdempotencyKey, LeaseStore, PartitionId, Position,
};

trait Store: CheckpointStore + DedupStore + LeaseStore {}
impl<T: CheckpointStore + DedupStore + LeaseStore> Store for T {}

async fn measure<F, Fut>(seconds: f64, mut op: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        op(calls).await;
        calls += 1;
    }
    calls as f64 / started.elapsed().as_secs_f64()
}

async fn run(name: &str, store: Arc<dyn Store>, seconds: f64) {
    let pipeline = format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    for per_call in [1usize, 16] {
        let s = store.clone();
        // A pipeline per measurement: each starts its positions at 0.
        let p = format!("{pipeline}-{per_call}");
        let rate = measure(seconds, |i| {
            let s = s.clone();
            let p = p.clone();
            async move {
                let cps: Vec<Checkpoint> = (0..per_call)
                    .map(|k| Checkpoint::new(PartitionId::new(format!("p{k}")), Position::from(i)))
                    .collect();
                s.commit(&p, &cps).await.expect("commit");
            }
        })
        .await;
        println!(
            "{name} checkpoint-commit {per_call} {rate:.0} {:.0}",
            rate * per_call as f64
        );
    }
    for per_call in [1usize, 500] {
        let s = store.clone();
        let p = pipeline.clone();
        let rate = measure(seconds, |i| {
            let s = s.clone();
            let p = p.clone();
            async move {
                let keys: Vec<IdempotencyKey> = (0..per_call as u64)
                    .map(|k| IdempotencyKey::new(format!("k{i}-{k}")))
                    .collect();
                s.mark(&p, &keys, Duration::from_secs(3600))
                    .await
                    .expect("mark");
            }
        })
        .await;
        println!(
            "{name} dedup-mark {per_call} {rate:.0} {:.0}",
            rate * per_call as f64
        );
        let s = store.clone();
        let p = pipeline.clone();
        let rate = measure(seconds, |i| {
            let s = s.clone();
            let p = p.clone();
            async move {
                let keys: Vec<IdempotencyKey> = (0..per_call as u64)
                    .map(|k| IdempotencyKey::new(format!("k{}-{k}", i % 50)))
                    .collect();
                s.seen(&p, &keys).await.expect("seen");
            }
        })
        .await;
        println!(
            "{name} dedup-check {per_call} {rate:.0} {:.0}",
            rate * per_call as f64
        );
    }
    let lease = store
        .acquire(
            &pipeline,
            &PartitionId::new("shard"),
            "bench",
            Duration::from_secs(60),
            None,
        )
        .await
        .expect("acquire")
        .expect("a fresh lease");
    let s = store.clone();
    let rate = measure(seconds, |_| {
        let (s, p, lease) = (s.clone(), pipeline.clone(), lease.clone());
        async move {
            s.renew(&p, &lease, Duration::from_secs(60))
                .await
                .expect("renew");
        }
    })
    .await;
    println!("{name} lease-renew 1 {rate:.0} {rate:.0}");
}

/// DynamoDB API calls per store operation (retries included), averaged over `n` operations.
async fn dynamodb_calls(store: &DynamoDbStore, n: u64) {
    let pipeline = format!("calls-{}", std::process::id());
    let per = |what: &str, before: u64, ops: u64| {
        println!(
            "calls dynamodb {what} {:.2}",
            (store.api_calls() - before) as f64 / ops as f64
        );
    };
    for per_call in [1usize, 16, 250] {
        let before = store.api_calls();
        for i in 0..n {
            let cps: Vec<Checkpoint> = (0..per_call)
                .map(|k| Checkpoint::new(PartitionId::new(format!("p{k}")), Position::from(i)))
                .collect();
            store
                .commit(&format!("{pipeline}-{per_call}"), &cps)
                .await
                .expect("commit");
        }
        per(&format!("checkpoint-commit-of-{per_call}"), before, n);
    }
    let shard = PartitionId::new("shard");
    let before = store.api_calls();
    let lease = store
        .acquire(&pipeline, &shard, "bench", Duration::from_secs(60), None)
        .await
        .expect("acquire")
        .expect("a fresh lease");
    per("lease-take", before, 1);
    let before = store.api_calls();
    for _ in 0..n {
        store
            .renew(&pipeline, &lease, Duration::from_secs(60))
            .await
            .expect("renew");
    }
    per("lease-renew", before, n);
    let before = store.api_calls();
    let _ = store.leases(&pipeline).await.expect("leases");
    per("lease-list", before, 1);
    let keys: Vec<IdempotencyKey> = (0..500)
        .map(|k| IdempotencyKey::new(format!("c{k}")))
        .collect();
    let before = store.api_calls();
    store
        .mark(&pipeline, &keys, Duration::from_secs(3600))
        .await
        .expect("mark");
    per("dedup-mark-of-500", before, 1);
    let before = store.api_calls();
    store.seen(&pipeline, &keys).await.expect("seen");
    per("dedup-check-of-500", before, 1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (store, seconds) = match args.as_slice() {
        [s, secs] => (s.clone(), secs.parse::<f64>().expect("SECONDS")),
        _ => panic!("usage: bench_stores embedded|postgres|redis|dynamodb SECONDS"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        match store.as_str() {
            "embedded" => {
                let dir = tempfile::tempdir().expect("tempdir");
                let s = Arc::new(EmbeddedStore::open_dir(dir.path()).await.expect("open"));
                run("embedded", s, seconds).await;
            }
            "postgres" => {
                let url = std::env::var("FLOWGATE_TEST_POSTGRES_URL")
                    .expect("FLOWGATE_TEST_POSTGRES_URL (cargo xtask brokers up --only postgres)");
                let s = PostgresStore::connect(PostgresConfig {
                    url,
                    schema: "flowgate_bench".into(),
                    ..Default::default()
                })
                .await
                .expect("connect");
                run("postgres", s, seconds).await;
            }
            "redis" => {
                let url = std::env::var("FLOWGATE_TEST_REDIS_URL")
                    .expect("FLOWGATE_TEST_REDIS_URL (cargo xtask brokers up --only redis)");
                let s = RedisStore::connect(RedisConfig {
                    url,
                    prefix: "flowgate-bench".into(),
                    ..Default::default()
                })
                .await
                .expect("connect");
                run("redis", s, seconds).await;
            }
            "dynamodb" => {
                let endpoint = std::env::var("FLOWGATE_TEST_DYNAMODB_ENDPOINT").expect(
                    "FLOWGATE_TEST_DYNAMODB_ENDPOINT (cargo xtask brokers up --only dynamodb)",
                );
                let s = DynamoDbStore::connect(DynamoDbConfig {
                    table: format!("flowgate-bench-{}", std::process::id()),
                    endpoint_url: Some(endpoint),
                    region: Some("us-east-1".into()),
                    access_key_id: Some("bench".into()),
                    secret_access_key: Some("bench".into()),
                    ..Default::default()
                })
                .await
                .expect("connect");
                // Calls first: moto copies every table for each transaction, so its transactions
                // slow down as the dedup measurements below fill the table.
                dynamodb_calls(&s, 20).await;
                run("dynamodb", s, seconds).await;
            }
            other => panic!("unknown store {other}"),
        }
    });
}
