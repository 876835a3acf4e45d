//! Delivery: every record produced arrives at the sink exactly once (nothing failed, so
//! nothing is redelivered), the pipeline stops drained, and the broker's own count shows
//! nothing left to consume — its committed positions (or acknowledgements) reached the end.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::CheckpointStore;

use crate::adapters::MemorySink;
use crate::{Pipeline, RuntimeSettings};

use super::harness::{
    Running, assert_checkpoints_at_last_records, numbered, payload_counts, unique,
    wait_for_distinct, wait_for_no_backlog,
};
use super::{BrokerHarness, ScenarioReport};

/// Records produced by the suite.
pub const RECORDS: usize = 2_000;

/// Produces [`RECORDS`] numbered records, runs a pipeline into a memory sink (with `store` as
/// its checkpoint store when the broker is replayable) until all arrived, stops it, and checks
/// delivery and the broker's backlog.
pub async fn every_record_once<H: BrokerHarness>(
    h: &H,
    store: Arc<dyn CheckpointStore>,
) -> ScenarioReport {
    let caps = h.capabilities();
    let stream = h.create().await;
    let pipeline = unique(&format!("{}-delivery", h.broker()));
    let payloads = numbered("d", 0..RECORDS);
    h.produce(&stream, &payloads).await;

    let sink = MemorySink::new();
    let mut builder = Pipeline::builder(pipeline.clone())
        .source(h.source(&stream, &pipeline))
        .sink(sink.clone())
        .settings(RuntimeSettings::default());
    if caps.replayable {
        builder = builder.checkpoint_store(store.clone());
    }
    let running = Running::start(builder, sink);
    wait_for_distinct(&running.sink, RECORDS, Duration::from_secs(60), h.broker()).await;
    let (summary, written) = running.stop().await;

    let counts = payload_counts(&written);
    for p in &payloads {
        assert_eq!(
            counts.get(p),
            Some(&1),
            "{}: {p} must be written exactly once",
            h.broker()
        );
    }
    assert_eq!(
        written.len(),
        RECORDS,
        "{}: nothing else written",
        h.broker()
    );
    assert!(
        summary.drained,
        "{}: stopped with records in flight",
        h.broker()
    );
    wait_for_no_backlog(h, &stream, &pipeline, Duration::from_secs(15)).await;
    if caps.replayable {
        let stored = store.load(&pipeline).await.expect("the checkpoints load");
        assert_checkpoints_at_last_records(h.broker(), &stored, &written, caps.partitions);
    }
    ScenarioReport {
        stream,
        pipeline,
        summary,
        written,
    }
}
