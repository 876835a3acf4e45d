//! The runtime's broker-restart suite against the rig's Kafka (in a test binary of its own:
//! the broker goes down under it).
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use flowgate_runtime::testkit::{self, restart::RestartPlan};

mod common;
use common::harness::{Kafka, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let (_dir, store) = store().await;
    let plan = RestartPlan {
        before: 20_000,
        after: 10_000,
        sink_per_sec: 4_000.0,
        max_in_flight: 500,
        stop_at: 6_000,
        down_for: Duration::from_secs(3),
    };
    testkit::restart::loses_nothing(&Kafka, plan, store).await;
}
