//! Harness of `cargo xtask bench kinesis`: a raw aws-sdk-kinesis `GetRecords` loop against
//! the flowgate Kinesis source, on the same stream of kinesis-mock.
//!
//! ```text
//! bench_kinesis fill STREAM N              create STREAM (4 shards), PutRecords N records of
//!                                          100 bytes spread evenly over the shards
//! bench_kinesis consume-raw STREAM N       one task per shard: TRIM_HORIZON, GetRecords
//!                                          (limit 10,000) at most every 200 ms, until N in all
//! bench_kinesis consume-flowgate STREAM N  KinesisSource (defaults) -> null sink, until N
//! ```
//! Prints `mode records seconds records_per_second throttles=T`. Endpoint:
//! FLOWGATE_TEST_KINESIS_ENDPOINT (the stream helpers are the tests' own, `tests/common`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::types::ShardIteratorType;
use flowgate_checkpoint::MemoryStore;
use flowgate_kinesis::{KinesisSource, KinesisSourceConfig};
use flowgate_runtime::adapters::NullSink;
use flowgate_runtime::{Pipeline, Shutdown};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{client, connection, create_stream, open_shards, put_to};

const SHARDS: i32 = 4;
const CALL_INTERVAL: Duration = Duration::from_millis(200);

/// Creates the stream and puts `n` records of 100 bytes, spread evenly over its shards.
async fn fill(stream: &str, n: u64) -> u64 {
    let k = create_stream(stream, SHARDS).await;
    let shards = open_shards(&k, stream).await;
    let payload = "x".repeat(100);
    let per_shard = n as usize / shards.len();
    for (i, (_, hash)) in shards.iter().enumerate() {
        let count = if i + 1 == shards.len() {
            n as usize - per_shard * i
        } else {
            per_shard
        };
        put_to(&k, stream, hash, &vec![payload.clone(); count]).await;
    }
    n
}

async fn consume_raw(stream: &str, n: u64) -> (u64, u64) {
    let k = client().await;
    let shards = k
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("ListShards");
    let read = Arc::new(AtomicU64::new(0));
    let throttles = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for s in shards.shards() {
        let (k, stream, id) = (k.clone(), stream.to_string(), s.shard_id().to_string());
        let (read, throttles) = (read.clone(), throttles.clone());
        tasks.push(tokio::spawn(async move {
            let mut it = k
                .get_shard_iterator()
                .stream_name(&stream)
                .shard_id(&id)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("GetShardIterator")
                .shard_iterator
                .unwrap();
            let mut next_call = tokio::time::Instant::now();
            while read.load(Ordering::Relaxed) < n {
                tokio::time::sleep_until(next_call).await;
                next_call = tokio::time::Instant::now() + CALL_INTERVAL;
                match k
                    .get_records()
                    .shard_iterator(&it)
                    .limit(10_000)
                    .send()
                    .await
                {
                    Ok(out) => {
                        read.fetch_add(out.records().len() as u64, Ordering::Relaxed);
                        match out.next_shard_iterator() {
                            Some(next) => it = next.to_string(),
                            None => return,
                        }
                    }
                    Err(_) => {
                        throttles.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    while read.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        t.abort();
    }
    (
        read.load(Ordering::Relaxed),
        throttles.load(Ordering::Relaxed),
    )
}

async fn consume_flowgate(stream: &str, n: u64) -> (u64, u64) {
    let sink = NullSink::default();
    let source = KinesisSource::new(
        KinesisSourceConfig {
            stream: stream.to_string(),
            connection: connection(),
            ..Default::default()
        },
        Arc::new(MemoryStore::new()),
    )
    .expect("source");
    let stats = source.stats();
    let pipeline = Pipeline::builder(format!("bench-{stream}-{}", std::process::id()))
        .source(source)
        .sink(sink.clone())
        .build()
        .expect("pipeline");
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipeline.run(shutdown));
    while sink.records() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    trigger.trigger();
    run.await.expect("join").expect("run");
    let throttles = stats.shards().values().map(|s| s.throttles).sum();
    (n, throttles)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, stream, n) = match args.as_slice() {
        [m, s, n] => (m.as_str(), s.as_str(), n.parse::<u64>().expect("N")),
        _ => panic!("usage: see the module documentation of bench_kinesis"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let (done, throttles) = rt.block_on(async {
        match mode {
            "fill" => (fill(stream, n).await, 0),
            "consume-raw" => consume_raw(stream, n).await,
            "consume-flowgate" => consume_flowgate(stream, n).await,
            other => panic!("unknown mode {other}"),
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{mode} {done} {secs:.3} {:.0} throttles={throttles}",
        done as f64 / secs
    );
}
