//! Helpers shared by the broker test files.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unused_imports)]

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub(crate) use flowgate_rig_tests::{rig, unique};

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
