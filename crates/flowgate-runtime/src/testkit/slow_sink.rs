//! Slow sink: a sink ten times slower than the backlog it is given. The pipeline holds no
//! more than its in-flight bound, keeps its membership (no rebalance while it is slow), shows
//! the lag while it lasts, and delivers every record once.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::CheckpointStore;

use crate::adapters::MemorySink;

use super::harness::{
    Running, numbered, paced_pipeline, payload_counts, unique, wait_for_no_backlog,
};
use super::{BrokerHarness, ScenarioReport};

/// Records produced by the suite.
pub const RECORDS: usize = 3_000;
/// The sink's pace, in records per second: the suite lasts about 10 s.
pub const SINK_PER_SEC: f64 = 300.0;
/// `max_in_flight_per_partition`: far below the backlog.
pub const MAX_IN_FLIGHT: usize = 100;

/// Until every record arrived: no rebalance; the highest lag seen.
async fn watch_while_slow(broker: &str, running: &Running, settled: u64) -> u64 {
    let started = std::time::Instant::now();
    let mut peak_lag = 0;
    while payload_counts(&running.sink.records()).len() < RECORDS {
        let s = running.stats.snapshot();
        peak_lag = peak_lag.max(s.lag);
        assert_eq!(
            s.rebalances, settled,
            "{broker}: a rebalance while the sink was slow"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{broker}: only {} of {RECORDS} records in 120 s",
            running.sink.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak_lag
}

/// Runs the suite; `store` is the checkpoint store when the broker is replayable.
pub async fn bounded_and_no_rebalance<H: BrokerHarness>(
    h: &H,
    store: Arc<dyn CheckpointStore>,
) -> ScenarioReport {
    let caps = h.capabilities();
    let stream = h.create().await;
    let pipeline = unique(&format!("{}-slow", h.broker()));
    h.produce(&stream, &numbered("s", 0..RECORDS)).await;

    let sink = MemorySink::new();
    let mut builder = paced_pipeline(
        h,
        (&stream, &pipeline),
        sink.clone(),
        SINK_PER_SEC,
        MAX_IN_FLIGHT,
    );
    if caps.replayable {
        builder = builder.checkpoint_store(store);
    }
    let running = Running::start(builder, sink);
    // Once records flow, every partition is assigned: from then on, no rebalance.
    running
        .wait_written(RECORDS / 10, Duration::from_secs(60), h.broker())
        .await;
    let settled = running.stats.snapshot().rebalances;
    let peak_lag = watch_while_slow(h.broker(), &running, settled).await;
    let (summary, written) = running.stop().await;

    assert_eq!(written.len(), RECORDS, "{}: every record once", h.broker());
    assert!(
        summary.stats.peak_partition_in_flight <= MAX_IN_FLIGHT as u64,
        "{}: {} records in flight in one partition, above the bound of {MAX_IN_FLIGHT}",
        h.broker(),
        summary.stats.peak_partition_in_flight
    );
    if caps.reports_lag {
        assert!(
            peak_lag >= (RECORDS / 4) as u64,
            "{}: the lag never showed the backlog (peak {peak_lag})",
            h.broker()
        );
    }
    assert_eq!(
        summary.stats.rebalances,
        settled,
        "{}: no rebalance",
        h.broker()
    );
    wait_for_no_backlog(h, &stream, &pipeline, Duration::from_secs(15)).await;
    eprintln!(
        "{}/slow sink: {RECORDS} records at {SINK_PER_SEC}/s, peak in flight {} (bound {MAX_IN_FLIGHT}), peak lag {peak_lag}, {} rebalances",
        h.broker(),
        summary.stats.peak_partition_in_flight,
        summary.stats.rebalances
    );
    ScenarioReport {
        stream,
        pipeline,
        summary,
        written,
    }
}
