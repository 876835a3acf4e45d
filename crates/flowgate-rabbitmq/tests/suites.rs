//! The runtime's scenario suites (delivery, poison, slow sink) against the rig's RabbitMQ, through a
//! harness of plain lapin clients; the broker restart suite runs in `broker_restart.rs`, a
//! test binary of its own, so that no other test meets the broker down.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use flowgate_checkpoint::EmbeddedStore;
use flowgate_runtime::testkit;

mod common;
use common::harness::Rabbit;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
    testkit::delivery::every_record_once(&Rabbit::default(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_on_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
    testkit::poison::dead_lettered_and_the_rest_flows(&Rabbit::default(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
    testkit::slow_sink::bounded_and_no_rebalance(&Rabbit::default(), store).await;
}
