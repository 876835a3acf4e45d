//! Delivery: every record produced arrives at the sink exactly once (nothing failed, so
//! nothing is redelivered), the pipeline stops drained, and the broker's own count shows
//! nothing left to consume — its committed positions (or acknowledgements) reached the end.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::{CheckpointStore, PartitionId};

use crate::adapters::MemorySink;
use crate::{Pipeline, RuntimeSettings, Shutdown};

use super::harness::{numbered, payload_counts, unique, wait_for_distinct, wait_for_no_backlog};
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
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(builder.build().expect("a valid pipeline").run(shutdown));
    wait_for_distinct(&sink, RECORDS, Duration::from_secs(60), h.broker()).await;
    trigger.trigger();
    let summary = run
        .await
        .expect("the pipeline task")
        .expect("the pipeline stops cleanly");

    let written = sink.records();
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
        // The checkpoint of each partition is its last record's position.
        let stored = store.load(&pipeline).await.expect("the checkpoints load");
        let partitions: std::collections::BTreeSet<&PartitionId> =
            written.iter().map(|r| &r.partition).collect();
        assert_eq!(
            stored.len(),
            partitions.len(),
            "{}: a checkpoint per partition: {stored:?}",
            h.broker()
        );
        for cp in &stored {
            let last = written
                .iter()
                .filter(|r| r.partition == cp.partition)
                .map(|r| &r.position)
                .max();
            assert_eq!(
                Some(&cp.position),
                last,
                "{}: checkpoint of {}",
                h.broker(),
                cp.partition
            );
        }
    }
    ScenarioReport {
        stream,
        pipeline,
        summary,
        written,
    }
}
