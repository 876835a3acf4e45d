//! The runtime's broker-restart suite against the rig's kinesis-mock (in a test binary of its
//! own: the endpoint goes down under it).
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use flowgate_runtime::testkit::{self, restart::RestartPlan};

mod common;
use common::harness::Kinesis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let h = Kinesis::default();
    let plan = RestartPlan {
        before: 3_000,
        after: 1_000,
        sink_per_sec: 1_000.0,
        max_in_flight: 300,
        stop_at: 1_000,
        down_for: Duration::from_secs(3),
    };
    testkit::restart::loses_nothing(&h, plan, h.store.clone()).await;
}
