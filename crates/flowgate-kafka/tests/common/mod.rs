//! Helpers shared by the broker test files.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unused_imports)]

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub(crate) use flowgate_rig_tests::{rig, unique};

pub(crate) mod harness;

pub(crate) fn bootstrap() -> String {
    flowgate_rig_tests::endpoint("FLOWGATE_TEST_KAFKA_BOOTSTRAP")
}

pub(crate) async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let res = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create_topics");
    for r in res {
        r.expect("topic created");
    }
}

pub(crate) async fn produce(topic: &str, partitions: i32, per_partition: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut futs = Vec::new();
    for p in 0..partitions {
        for i in 0..per_partition {
            let producer = producer.clone();
            let topic = topic.to_string();
            futs.push(async move {
                let payload = format!("p{p}-{i}");
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .partition(p)
                            .key("k")
                            .payload(&payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
            });
        }
    }
    for r in futures_util::future::join_all(futs).await {
        r.expect("delivered");
    }
}

/// Every record of partition 0 of `topic`, read through the plain listener (payload, key and
/// the idempotency key header), until 3 s pass without a new one.
pub(crate) async fn read_back(topic: &str) -> Vec<flowgate_core::Record> {
    use bytes::Bytes;
    use flowgate_core::{IdempotencyKey, PartitionId, Position, Record, headers};
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers as _;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    use std::time::Instant;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", unique("conf-read"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < Duration::from_secs(3) {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                let mut r = Record::new(
                    PartitionId::new("read"),
                    Position::from(m.offset() as u64),
                    Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                );
                r.key = m.key().map(Bytes::copy_from_slice);
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        if h.key == headers::IDEMPOTENCY_KEY {
                            r.idempotency_key = h
                                .value
                                .map(|v| IdempotencyKey::new(Bytes::copy_from_slice(v)));
                        }
                    }
                }
                out.push(r);
                idle_since = Instant::now();
            }
        }
        out
    })
    .await
    .unwrap()
}
