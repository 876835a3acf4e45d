//! The facade wires the crates together: a generator into the embedded store's table sink,
//! exactly once, through `flowgate::` paths only. (Broker scenarios join this directory with
//! the adapters, behind their Cargo features.)
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use flowgate::checkpoint::EmbeddedStore;
use flowgate::runtime::adapters::{GeneratorConfig, GeneratorSource};
use flowgate::runtime::{KeyExtractor, Pipeline, Shutdown};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_into_a_table_exactly_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    for run in 0..3 {
        let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
        let config = GeneratorConfig {
            partitions: 2,
            records_per_partition: Some(500 * (run + 1)),
            ..Default::default()
        };
        let summary = Pipeline::builder("facade")
            .source(GeneratorSource::new(config).unwrap())
            .sink(store.table_sink("events"))
            .checkpoint_store(store.clone())
            .dedup(store.clone(), KeyExtractor::SourcePosition)
            .build()
            .unwrap()
            .run(Shutdown::never())
            .await
            .unwrap();
        assert_eq!(
            summary.stats.records_out, 1_000,
            "run {run}: resumes after its checkpoints"
        );
        let rows = store.table_sink("events").rows().await.unwrap();
        assert_eq!(rows.len() as u64, 1_000 * (run + 1), "one row per record");
    }
}

/// When `run` returns, the pipeline holds no handle on its stores any more (the dedup marker
/// included): the embedded store reopens at once, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_free_when_run_returns() {
    let dir = tempfile::tempdir().unwrap();
    for run in 0..10u64 {
        let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
        Pipeline::builder("free")
            .source(
                GeneratorSource::new(GeneratorConfig {
                    partitions: 2,
                    records_per_partition: Some(100 * (run + 1)),
                    ..Default::default()
                })
                .unwrap(),
            )
            .sink(flowgate::runtime::adapters::NullSink::default())
            .checkpoint_store(store.clone())
            .dedup(store.clone(), KeyExtractor::SourcePosition)
            .build()
            .unwrap()
            .run(Shutdown::never())
            .await
            .unwrap();
        drop(store);
    }
}
