//! The runtime's scenario suites (delivery, poison, slow sink) against the rig's kinesis-mock, through a
//! harness of plain AWS SDK calls.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowgate_runtime::testkit;

mod common;
use common::harness::Kinesis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery() {
    let h = Kinesis::default();
    testkit::delivery::every_record_once(&h, h.store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dead_letter_stream() {
    let h = Kinesis::default();
    testkit::poison::dead_lettered_and_the_rest_flows(&h, h.store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink() {
    let h = Kinesis::default();
    testkit::slow_sink::bounded_and_no_rebalance(&h, h.store.clone()).await;
}
