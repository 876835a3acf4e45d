//! The broker harness of the runtime's scenario suites for Kinesis (kinesis-mock): plain
//! AWS SDK calls. Kinesis keeps no consumer position, so the backlog is read as the KCL
//! would: `GetRecords` after each shard's stored checkpoint.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use flowgate_checkpoint::MemoryStore;
use flowgate_core::{CheckpointStore, Sink, Source};
use flowgate_kinesis::{KinesisSink, KinesisSinkConfig, KinesisSource, kpl};
use flowgate_runtime::testkit::{BrokerHarness, Capabilities};

use super::{
    client, connection, create_stream, put_keyed, read_all, read_shard, source_config, unique,
};

const SHARDS: u32 = 2;

/// The rig's kinesis-mock, with the store that holds the pipelines' leases and checkpoints.
pub(crate) struct Kinesis {
    pub(crate) store: Arc<MemoryStore>,
}

impl Default for Kinesis {
    fn default() -> Self {
        Kinesis {
            store: Arc::new(MemoryStore::new()),
        }
    }
}

fn dead_letter_stream(stream: &str) -> String {
    format!("{stream}-dlq")
}

#[async_trait]
impl BrokerHarness for Kinesis {
    fn broker(&self) -> &'static str {
        "kinesis"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            replayable: true,
            restartable: true,
            reports_lag: false,
            partitions: SHARDS,
        }
    }

    async fn create(&self) -> String {
        let stream = unique("scenario");
        create_stream(&stream, SHARDS as i32).await;
        create_stream(&dead_letter_stream(&stream), 1).await;
        stream
    }

    async fn produce(&self, stream: &str, payloads: &[String]) {
        put_keyed(&client().await, stream, payloads).await;
    }

    fn source(&self, stream: &str, _pipeline: &str) -> Box<dyn Source> {
        Box::new(KinesisSource::new(source_config(stream), self.store.clone()).unwrap())
    }

    async fn dead_letter_sink(&self, stream: &str) -> Option<Box<dyn Sink>> {
        let sink = KinesisSink::connect(KinesisSinkConfig {
            stream: dead_letter_stream(stream),
            connection: connection(),
            ..Default::default()
        })
        .await
        .unwrap();
        Some(Box::new(sink))
    }

    async fn dead_letters(&self, stream: &str) -> Vec<String> {
        read_all(&client().await, &dead_letter_stream(stream))
            .await
            .into_iter()
            .map(|(_, payload)| payload)
            .collect()
    }

    /// kinesis-mock persists its streams every 2 s: it is given 3 s to write them down
    /// before it is stopped, or the streams created since would be gone when it is back.
    async fn restart(&self, down_for: Duration) -> Duration {
        tokio::time::sleep(Duration::from_secs(3)).await;
        flowgate_rig_tests::bounce("kinesis", down_for).await
    }

    /// Records after each shard's stored checkpoint (from the oldest without one).
    async fn backlog(&self, stream: &str, pipeline: &str) -> u64 {
        let k = client().await;
        let checkpoints = self.store.load(pipeline).await.unwrap();
        let shards = k
            .list_shards()
            .stream_name(stream)
            .send()
            .await
            .expect("ListShards");
        let mut left = 0u64;
        for s in shards.shards() {
            let after = checkpoints
                .iter()
                .find(|c| c.partition.as_str() == s.shard_id())
                .and_then(|c| kpl::sequence_of(&c.position));
            let after = after.as_ref().map(|(seq, _)| seq.as_str());
            left += read_shard(&k, stream, s.shard_id(), after).await.len() as u64;
        }
        left
    }
}
