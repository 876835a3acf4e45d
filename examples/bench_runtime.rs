//! Throughput harness for `cargo xtask bench runtime`: generator → null sink, 100-byte
//! records, 4 partitions, either through a raw loop (no runtime) or through the runtime with
//! and without checkpoints and dedup.
//!
//! ```text
//! cargo run --release --example bench_runtime -- MODE RECORDS
//! MODE: raw | runtime | runtime-checkpoint | runtime-checkpoint-dedup
//!       | runtime-checkpoint-dedup-keys   (one durable key per record instead of ranges)
//!       | sink-1ms | sink-1ms-checkpoint-dedup   (a sink answering each batch after 1 ms,
//!         like a broker round trip on a LAN)
//!       | runtime-endpoint   (`runtime` with the Prometheus recorder installed and the
//!         endpoint's /metrics and /status read every second, as a scraper would)
//! ```
//! Prints one line: `mode records seconds records_per_second`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate::checkpoint::EmbeddedStore;
use flowgate::core::{Credits, IdempotencyKey, Source, SourceContext, SourceEvent, StartPosition};
use flowgate::runtime::adapters::{
    FaultConfig, FaultInjectingSink, GeneratorConfig, GeneratorSource, NullSink,
};
use flowgate::runtime::{KeyExtractor, Pipeline, RuntimeSettings, Shutdown};

fn generator(records: u64) -> GeneratorSource {
    GeneratorSource::new(GeneratorConfig {
        partitions: 4,
        payload_size: 100,
        records_per_partition: Some(records / 4),
        key_cardinality: 1024,
        ..Default::default()
    })
    .expect("generator")
}

/// The baseline: what the generator and the sink cost without any runtime.
async fn raw(records: u64) -> u64 {
    use flowgate::core::Sink;
    let mut source = generator(records);
    let credits = Credits::new();
    source
        .open(SourceContext::new("raw", credits.clone()))
        .await
        .expect("open");
    let sink = NullSink::default();
    loop {
        match source.next().await.expect("next") {
            SourceEvent::Assigned(a) => {
                for x in &a {
                    credits.set(&x.partition, usize::MAX / 2);
                }
                source
                    .start(
                        a.into_iter()
                            .map(|x| StartPosition {
                                partition: x.partition,
                                after: None,
                            })
                            .collect(),
                    )
                    .await
                    .expect("start");
            }
            SourceEvent::Records(rs) => sink.write(&rs).await.expect("write"),
            SourceEvent::End => break,
            _ => {}
        }
    }
    sink.records()
}

/// `runtime`, observed: the endpoint serves the pipeline's metrics and a scraper reads
/// `/metrics` and `/status` every second while it runs.
async fn runtime_observed(records: u64) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let settings = flowgate::runtime::EndpointSettings {
        listen: Some("127.0.0.1:0".parse().expect("address")),
        ..Default::default()
    };
    let endpoint = flowgate::runtime::Endpoint::start(&settings, "bench")
        .await
        .expect("endpoint");
    let addr = endpoint.local_addr();
    let scraper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for path in ["/metrics", "/status"] {
                let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let request =
                    format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
                conn.write_all(request.as_bytes()).await.expect("request");
                let mut body = Vec::new();
                conn.read_to_end(&mut body).await.expect("response");
                assert!(
                    body.starts_with(b"HTTP/1.1 200"),
                    "{path} answered {:?}",
                    String::from_utf8_lossy(&body[..body.len().min(80)])
                );
            }
        }
    });
    let done = runtime(records, false, None, None, Some(&endpoint)).await;
    scraper.abort();
    done
}

async fn runtime(
    records: u64,
    checkpoint: bool,
    dedup: Option<KeyExtractor>,
    sink_latency: Option<Duration>,
    endpoint: Option<&flowgate::runtime::Endpoint>,
) -> u64 {
    let sink = NullSink::default();
    let b = Pipeline::builder("bench")
        .source(generator(records))
        // Checkpoints every 1000 records, as the figures in docs/performance.md were taken:
        // no time floor (`commit.min_interval`, 10 ms by default, would write far fewer).
        .settings(RuntimeSettings {
            commit: flowgate::runtime::CommitSettings {
                min_interval: Duration::ZERO,
                ..Default::default()
            },
            ..Default::default()
        });
    let mut b = match sink_latency {
        Some(latency) => b.sink(FaultInjectingSink::new(
            sink.clone(),
            FaultConfig {
                latency,
                ..Default::default()
            },
        )),
        None => b.sink(sink.clone()),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    if checkpoint || dedup.is_some() {
        let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.expect("store"));
        if checkpoint {
            b = b.checkpoint_store(store.clone());
        }
        if let Some(extractor) = dedup {
            b = b.dedup(store, extractor);
        }
    }
    let pipeline = b.build().expect("build");
    if let Some(endpoint) = endpoint {
        endpoint.attach(pipeline.stats());
    }
    pipeline.run(Shutdown::never()).await.expect("run");
    sink.records()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "runtime".into());
    let records: u64 = args
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let done = rt.block_on(async {
        match mode.as_str() {
            "raw" => raw(records).await,
            "runtime" => runtime(records, false, None, None, None).await,
            "runtime-checkpoint" => runtime(records, true, None, None, None).await,
            "runtime-checkpoint-dedup" => {
                runtime(
                    records,
                    true,
                    Some(KeyExtractor::SourcePosition),
                    None,
                    None,
                )
                .await
            }
            "runtime-checkpoint-dedup-keys" => {
                // The same keys, but through the per-key path (a custom extractor).
                let per_key = KeyExtractor::Custom(Arc::new(|r: &flowgate::Record| {
                    Some(IdempotencyKey::from_position(&r.partition, &r.position))
                }));
                runtime(records, true, Some(per_key), None, None).await
            }
            "sink-1ms" => runtime(records, false, None, Some(Duration::from_millis(1)), None).await,
            "sink-1ms-checkpoint-dedup" => {
                runtime(
                    records,
                    true,
                    Some(KeyExtractor::SourcePosition),
                    Some(Duration::from_millis(1)),
                    None,
                )
                .await
            }
            "runtime-endpoint" => runtime_observed(records).await,
            other => panic!("unknown mode {other}"),
        }
    });
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(done, records, "every record must reach the sink");
    println!("{mode} {done} {secs:.3} {:.0}", done as f64 / secs);
}
