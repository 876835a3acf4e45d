//! The broker harness of the runtime's scenario suites for Kafka: plain rdkafka clients.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use flowgate_checkpoint::EmbeddedStore;
use flowgate_core::{Sink, Source};
use flowgate_kafka::{KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig};
use flowgate_runtime::testkit::{BrokerHarness, Capabilities};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{bootstrap, create_topic, unique};

const PARTITIONS: u32 = 4;

/// The rig's Kafka.
pub(crate) struct Kafka;

pub(crate) fn dead_letter_topic(stream: &str) -> String {
    format!("{stream}-dlq")
}

#[async_trait]
impl BrokerHarness for Kafka {
    fn broker(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            replayable: true,
            restartable: true,
            reports_lag: true,
            partitions: PARTITIONS,
        }
    }

    async fn create(&self) -> String {
        let topic = unique("scenario");
        create_topic(&topic, PARTITIONS as i32).await;
        create_topic(&dead_letter_topic(&topic), 1).await;
        topic
    }

    async fn produce(&self, stream: &str, payloads: &[String]) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let sends = payloads.iter().enumerate().map(|(i, payload)| {
            let producer = producer.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(stream)
                            .partition((i % PARTITIONS as usize) as i32)
                            .key("k")
                            .payload(payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        for sent in futures_util::future::join_all(sends).await {
            sent.expect("delivered");
        }
    }

    fn source(&self, stream: &str, pipeline: &str) -> Box<dyn Source> {
        Box::new(
            KafkaSource::new(KafkaSourceConfig {
                bootstrap_servers: bootstrap(),
                topics: vec![stream.to_string()],
                group_id: Some(pipeline.to_string()),
                ..Default::default()
            })
            .unwrap(),
        )
    }

    async fn dead_letter_sink(&self, stream: &str) -> Option<Box<dyn Sink>> {
        Some(Box::new(
            KafkaSink::new(KafkaSinkConfig {
                bootstrap_servers: bootstrap(),
                topic: Some(dead_letter_topic(stream)),
                ..Default::default()
            })
            .unwrap(),
        ))
    }

    async fn dead_letters(&self, stream: &str) -> Vec<String> {
        super::read_back(&dead_letter_topic(stream))
            .await
            .iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect()
    }

    async fn restart(&self, down_for: Duration) -> Duration {
        flowgate_rig_tests::bounce("kafka", down_for).await
    }

    /// The group's committed offsets behind the partitions' high watermarks, as
    /// `kafka-consumer-groups --describe` computes LAG.
    async fn backlog(&self, stream: &str, pipeline: &str) -> u64 {
        let (topic, group) = (stream.to_string(), pipeline.to_string());
        tokio::task::spawn_blocking(move || {
            let reader: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", bootstrap())
                .set("group.id", &group)
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS as i32 {
                tpl.add_partition(&topic, p);
            }
            let committed = reader
                .committed_offsets(tpl, Duration::from_secs(10))
                .unwrap();
            (0..PARTITIONS as i32)
                .map(|p| {
                    let (_, high) = reader
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .unwrap();
                    let done = committed
                        .find_partition(&topic, p)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                        .unwrap_or(0);
                    (high - done).max(0) as u64
                })
                .sum()
        })
        .await
        .unwrap()
    }
}

pub(crate) async fn store() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
    (dir, store)
}
