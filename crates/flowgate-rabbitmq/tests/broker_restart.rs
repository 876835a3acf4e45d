//! The runtime's broker-restart suite against the rig's RabbitMQ (in a test binary of its
//! own: the broker goes down under it).
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use flowgate_checkpoint::EmbeddedStore;
use flowgate_runtime::testkit::{self, restart::RestartPlan};

mod common;
use common::harness::Rabbit;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
    let plan = RestartPlan {
        before: 6_000,
        after: 2_000,
        sink_per_sec: 2_000.0,
        max_in_flight: 300,
        stop_at: 2_000,
        down_for: Duration::from_secs(2),
    };
    let report = testkit::restart::loses_nothing(&Rabbit::default(), plan, store).await;
    // RabbitMQ's own: the reconnect is a new assignment of the queue.
    assert!(
        report.summary.stats.rebalances >= 2,
        "the reconnect is a new assignment ({} seen)",
        report.summary.stats.rebalances
    );
}
