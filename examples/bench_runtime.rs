//! Throughput harness for `cargo xtask bench runtime`: generator → null sink, 100-byte
//! records, 4 partitions, either through a raw loop (no runtime) or through the runtime with
//! and without checkpoints and dedup.
//!
//! ```text
//! cargo run --release --example bench_runtime -- MODE RECORDS
//! MODE: raw | runtime | runtime-checkpoint | runtime-checkpoint-dedup
//! ```
//! Prints one line: `mode records seconds records_per_second`.

use std::sync::Arc;
use std::time::Instant;

use flowgate::checkpoint::EmbeddedStore;
use flowgate::core::{Credits, Source, SourceContext, SourceEvent, StartPosition};
use flowgate::runtime::adapters::{GeneratorConfig, GeneratorSource, NullSink};
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
        .open(SourceContext {
            pipeline: "raw".into(),
            credits: credits.clone(),
        })
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

async fn runtime(records: u64, checkpoint: bool, dedup: bool) -> u64 {
    let sink = NullSink::default();
    let mut b = Pipeline::builder("bench")
        .source(generator(records))
        .sink(sink.clone())
        .settings(RuntimeSettings::default());
    let dir = tempfile::tempdir().expect("tempdir");
    if checkpoint || dedup {
        let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.expect("store"));
        if checkpoint {
            b = b.checkpoint_store(store.clone());
        }
        if dedup {
            b = b.dedup(store, KeyExtractor::SourcePosition);
        }
    }
    b.build()
        .expect("build")
        .run(Shutdown::never())
        .await
        .expect("run");
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
            "runtime" => runtime(records, false, false).await,
            "runtime-checkpoint" => runtime(records, true, false).await,
            "runtime-checkpoint-dedup" => runtime(records, true, true).await,
            other => panic!("unknown mode {other}"),
        }
    });
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(done, records, "every record must reach the sink");
    println!("{mode} {done} {secs:.3} {:.0}", done as f64 / secs);
}
