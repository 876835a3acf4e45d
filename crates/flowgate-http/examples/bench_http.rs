//! Throughput harness for `cargo xtask bench http`: records of 100 bytes to a local HTTP
//! endpoint (a child process of this binary), either through a raw `reqwest` loop or through
//! a flowgate pipeline (generator → HTTP sink), at the same concurrency and batch size.
//!
//! ```text
//! cargo run --release -p flowgate-http --example bench_http -- MODE DELAY_MS RECORDS
//! MODE: raw | flowgate      DELAY_MS: the endpoint's time per request
//! ```
//! Prints one line: `mode delay_ms records seconds records_per_second`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_http::{HttpSink, HttpSinkConfig};
use flowgate_runtime::adapters::{GeneratorConfig, GeneratorSource};
use flowgate_runtime::{Pipeline, Shutdown};

/// Partitions of the generator, and requests in flight in the raw loop.
const CONCURRENCY: usize = 4;
/// Records per request.
const BATCH: usize = 500;

/// The endpoint: reads the body and answers `200` after `delay`.
async fn serve(delay: Duration) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("address"));
    let app = axum::Router::new().fallback(move |body: Bytes| async move {
        tokio::time::sleep(delay).await;
        format!("{}", body.len())
    });
    axum::serve(listener, app).await.expect("serve");
}

/// The baseline: `CONCURRENCY` tasks each POSTing `BATCH` pre-encoded records at a time.
async fn raw(url: String, records: u64) -> u64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let line = format!("\"{}\"\n", "x".repeat(98));
    let body = Bytes::from(line.repeat(BATCH));
    let per_task = records / CONCURRENCY as u64 / BATCH as u64;
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("send");
                assert!(resp.status().is_success());
                resp.bytes().await.expect("answer");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    per_task * CONCURRENCY as u64 * BATCH as u64
}

async fn flowgate(url: String, records: u64) -> u64 {
    let sink = HttpSink::new(HttpSinkConfig {
        url,
        max_batch_records: BATCH,
        ..Default::default()
    })
    .expect("sink");
    let summary = Pipeline::builder("bench-http")
        .source(
            GeneratorSource::new(GeneratorConfig {
                partitions: CONCURRENCY as u32,
                payload_size: 100,
                records_per_partition: Some(records / CONCURRENCY as u64),
                ..Default::default()
            })
            .expect("generator"),
        )
        .sink(sink)
        .build()
        .expect("build")
        .run(Shutdown::never())
        .await
        .expect("run");
    summary.stats.records_out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "flowgate".into());
    let delay = Duration::from_millis(args.next().and_then(|d| d.parse().ok()).unwrap_or(0));
    let records: u64 = args
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    if mode == "serve" {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(serve(delay));
        return;
    }
    let exe = std::env::current_exe().expect("exe");
    let mut server = Command::new(exe)
        .args(["serve", &delay.as_millis().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("endpoint");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("endpoint address");
    let addr: SocketAddr = line.trim().parse().expect("address");
    let url = format!("http://{addr}/ingest");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let done = rt.block_on(async {
        match mode.as_str() {
            "raw" => raw(url, records).await,
            "flowgate" => flowgate(url, records).await,
            other => panic!("unknown mode {other}"),
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let _ = server.kill();
    let _ = server.wait();
    println!(
        "{mode} {} {done} {secs:.3} {:.0}",
        delay.as_millis(),
        done as f64 / secs
    );
}
