//! Kafka: create a topic with the admin API, produce 10,000 records, consume them in a group
//! with manual commits, and read the committed offsets back with Kafka's own
//! consumer-groups tool.
#![cfg(feature = "brokers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use flowgate_rig_tests::{endpoint, unique};
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

const RECORDS: usize = 10_000;
const PARTITIONS: i32 = 4;

#[tokio::test]
async fn produce_consume_commit_and_read_offsets_with_the_kafka_tool() {
    let bootstrap = endpoint("FLOWGATE_TEST_KAFKA_BOOTSTRAP");
    let classpath = endpoint("FLOWGATE_TEST_KAFKA_CLASSPATH");
    let topic = unique("rig-kafka");
    let group = unique("rig-group");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics request");
    for r in created {
        r.expect("topic created");
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let started = Instant::now();
    let sends = (0..RECORDS).map(|i| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let key = format!("k{i}");
            let payload = format!("record-{i}");
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    for r in futures_util::future::join_all(sends).await {
        r.expect("delivery report");
    }
    eprintln!("kafka: produced {RECORDS} in {:?}", started.elapsed());

    let bootstrap2 = bootstrap.clone();
    let topic2 = topic.clone();
    let group2 = group.clone();
    let consumed = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap2)
            .set("group.id", &group2)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic2]).expect("subscribe");
        let mut per_partition: BTreeMap<i32, usize> = BTreeMap::new();
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(90);
        while seen < RECORDS {
            assert!(
                Instant::now() < deadline,
                "consumed only {seen} of {RECORDS} within 90 s"
            );
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.expect("message");
                consumer
                    .store_offset_from_message(&m)
                    .expect("store offset");
                *per_partition.entry(m.partition()).or_default() += 1;
                seen += 1;
            }
        }
        consumer
            .commit_consumer_state(CommitMode::Sync)
            .expect("manual commit");
        consumer.unsubscribe();
        per_partition
    })
    .await
    .unwrap();
    assert_eq!(consumed.values().sum::<usize>(), RECORDS);
    assert_eq!(
        consumed.len(),
        PARTITIONS as usize,
        "records spread over every partition"
    );

    // Read the committed offsets with Kafka's own tool.
    let out = Command::new("java")
        .args([
            "-cp",
            &classpath,
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        ])
        .args([
            "--bootstrap-server",
            &bootstrap,
            "--describe",
            "--group",
            &group,
        ])
        .output()
        .expect("run kafka-consumer-groups");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kafka-consumer-groups failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut committed = 0u64;
    let mut rows = 0;
    for line in text.lines().filter(|l| l.contains(&topic)) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
        let current: u64 = cols[3].parse().expect("CURRENT-OFFSET");
        let end: u64 = cols[4].parse().expect("LOG-END-OFFSET");
        assert_eq!(
            cols[5], "0",
            "lag of partition {} must be 0: {line}",
            cols[2]
        );
        assert_eq!(current, end);
        committed += current;
        rows += 1;
    }
    assert_eq!(rows, PARTITIONS, "one row per partition in:\n{text}");
    assert_eq!(
        committed, RECORDS as u64,
        "committed offsets add up to every record"
    );
}
