//! The runtime's scenario suites (delivery, poison, slow sink) against the rig's Kafka,
//! through a harness of plain rdkafka clients; plus what is specific to Kafka. The broker restart
//! suite runs in `broker_restart.rs`: a test binary of its own, so that no other test meets
//! the broker down.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowgate_runtime::testkit;

mod common;
use common::harness::{Kafka, dead_letter_topic, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery() {
    let (_dir, store) = store().await;
    testkit::delivery::every_record_once(&Kafka, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dead_letter_topic() {
    let (_dir, store) = store().await;
    let report = testkit::poison::dead_lettered_and_the_rest_flows(&Kafka, store).await;
    // Kafka's own: the dead letter keeps the record's key.
    let letters = common::read_back(&dead_letter_topic(&report.stream)).await;
    assert!(letters.iter().all(|r| r.key.as_deref() == Some(&b"k"[..])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink() {
    let (_dir, store) = store().await;
    testkit::slow_sink::bounded_and_no_rebalance(&Kafka, store).await;
}
