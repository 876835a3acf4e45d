//! Restart: the broker stopped and started under a running pipeline, with records written
//! before and after. Nothing is lost, the outage reads as `disconnected` and then `healthy`,
//! and the checkpoints (or acknowledgements) reach the end.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::{CheckpointStore, DedupStore};

use crate::KeyExtractor;
use crate::adapters::MemorySink;

use super::harness::{
    HealthLog, Running, assert_away_then_back, assert_checkpoints_at_last_records, numbered,
    paced_pipeline, payload_counts, unique, wait_for_distinct, wait_for_no_backlog,
};
use super::{BrokerHarness, ScenarioReport};

/// How the suite runs.
#[derive(Clone, Copy, Debug)]
pub struct RestartPlan {
    /// Records produced before the restart.
    pub before: usize,
    /// Records produced after the broker is back.
    pub after: usize,
    /// The sink's pace, slow enough that the broker goes away mid-stream.
    pub sink_per_sec: f64,
    /// `max_in_flight_per_partition`.
    pub max_in_flight: usize,
    /// Records written before the broker is stopped.
    pub stop_at: usize,
    /// How long the broker stays down.
    pub down_for: Duration,
}

/// Runs the suite. `store` is the checkpoint store of a replayable source, and the dedup
/// store (by the record's key) of a queue, whose unacknowledged messages come again after
/// the reconnect.
pub async fn loses_nothing<H, S>(h: &H, plan: RestartPlan, store: Arc<S>) -> ScenarioReport
where
    H: BrokerHarness,
    S: CheckpointStore + DedupStore + 'static,
{
    let caps = h.capabilities();
    assert!(
        caps.restartable,
        "{}: the rig cannot restart this broker",
        h.broker()
    );
    let stream = h.create().await;
    let pipeline = unique(&format!("{}-restart", h.broker()));
    h.produce(&stream, &numbered("m", 0..plan.before)).await;

    let sink = MemorySink::new();
    let mut builder = paced_pipeline(
        h,
        (&stream, &pipeline),
        sink.clone(),
        plan.sink_per_sec,
        plan.max_in_flight,
    );
    builder = if caps.replayable {
        builder.checkpoint_store(store.clone())
    } else {
        builder.dedup(store.clone(), KeyExtractor::Key)
    };
    let running = Running::start(builder, sink);
    running
        .wait_written(plan.stop_at, Duration::from_secs(60), h.broker())
        .await;
    let health = HealthLog::start(running.stats.clone());
    bounce_under(h, &stream, &running, plan).await;
    let total = plan.before + plan.after;
    wait_for_distinct(&running.sink, total, Duration::from_secs(120), h.broker()).await;
    // Let the last acknowledgements and commits go out.
    wait_for_no_backlog(h, &stream, &pipeline, Duration::from_secs(30)).await;
    assert_away_then_back(h.broker(), health.stop().await);
    let (summary, written) = running.stop().await;

    let counts = payload_counts(&written);
    for i in 0..total {
        assert!(
            counts.contains_key(&format!("m{i}")),
            "{}: m{i} lost",
            h.broker()
        );
    }
    if caps.replayable {
        // The checkpoints reached the end of every partition.
        let stored = store.load(&pipeline).await.expect("the checkpoints load");
        assert_checkpoints_at_last_records(h.broker(), &stored, &written, caps.partitions);
    }
    let report = ScenarioReport {
        stream,
        pipeline,
        summary,
        written,
    };
    eprintln!(
        "{}/restart: {total} records, {} written ({} duplicates), {} rebalances, {} retries, {} dedup hits",
        h.broker(),
        report.written.len(),
        report.duplicates(),
        report.summary.stats.rebalances,
        report.summary.stats.retries,
        report.summary.stats.dedup_hits,
    );
    report
}

/// Restarts the broker under the running pipeline, then produces the plan's second part.
async fn bounce_under<H: BrokerHarness>(h: &H, stream: &str, running: &Running, plan: RestartPlan) {
    let at_stop = running.sink.len();
    let gone = h.restart(plan.down_for).await;
    eprintln!(
        "{}/restart: broker stopped at {at_stop} records written, back after {:.1}s",
        h.broker(),
        gone.as_secs_f64()
    );
    h.produce(
        stream,
        &numbered("m", plan.before..plan.before + plan.after),
    )
    .await;
}
