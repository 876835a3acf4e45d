//! Poison: a record the sink refuses as poison goes to the dead letters (a dead-letter sink,
//! or the broker's own dead-letter route), is acknowledged, and the partition keeps flowing:
//! every other record arrives, and the broker counts nothing left to consume.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::CheckpointStore;

use crate::adapters::{FaultConfig, FaultInjectingSink, MemorySink};
use crate::{Pipeline, PipelineBuilder};

use super::harness::{
    Running, assert_checkpoints_at_last_records, payload, payload_counts, unique,
    wait_for_no_backlog,
};
use super::{BrokerHarness, ScenarioReport};

/// Records produced by the suite; every fiftieth (from the eighth) is poison, so the last
/// record of each partition is not.
pub const RECORDS: usize = 500;

fn payloads() -> Vec<String> {
    (0..RECORDS)
        .map(|i| {
            if i % 50 == 7 {
                format!("poison-{i}")
            } else {
                format!("ok-{i}")
            }
        })
        .collect()
}

/// Runs the suite: [`RECORDS`] records, of which 10 are poison; `store` is the checkpoint
/// store when the broker is replayable.
pub async fn dead_lettered_and_the_rest_flows<H: BrokerHarness>(
    h: &H,
    store: Arc<dyn CheckpointStore>,
) -> ScenarioReport {
    let caps = h.capabilities();
    let stream = h.create().await;
    let pipeline = unique(&format!("{}-poison", h.broker()));
    let payloads = payloads();
    let mut poisons: Vec<String> = payloads
        .iter()
        .filter(|p| p.starts_with("poison"))
        .cloned()
        .collect();
    poisons.sort();
    let good = RECORDS - poisons.len();
    h.produce(&stream, &payloads).await;

    let sink = MemorySink::new();
    let builder = pipeline_of(h, &stream, &pipeline, store, sink.clone()).await;
    let running = Running::start(builder, sink);
    let started = std::time::Instant::now();
    while running.sink.len() < good || running.stats.snapshot().dead_lettered < poisons.len() as u64
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}: the partition stalled: {} of {good} good records written, {:?}",
            h.broker(),
            running.sink.len(),
            running.stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (summary, written) = running.stop().await;

    assert_eq!(
        written.len(),
        good,
        "{}: every other record, once",
        h.broker()
    );
    assert!(
        written.iter().all(|r| !payload(r).starts_with("poison")),
        "{}: no poison reached the sink",
        h.broker()
    );
    assert_eq!(
        payload_counts(&written).len(),
        good,
        "{}: no good record twice",
        h.broker()
    );
    assert_eq!(summary.stats.dead_lettered, poisons.len() as u64);
    assert_eq!(
        read_dead_letters(h, &stream, poisons.len()).await,
        poisons,
        "{}: exactly the poison records",
        h.broker()
    );
    wait_for_no_backlog(h, &stream, &pipeline, Duration::from_secs(15)).await;
    if caps.replayable {
        assert_checkpoints_at_last_records(
            h.broker(),
            &summary.checkpoints,
            &written,
            caps.partitions,
        );
    }
    ScenarioReport {
        stream,
        pipeline,
        summary,
        written,
    }
}

/// The pipeline of the suite: the sink refuses records whose payload starts with `poison`;
/// dead letters go where the harness says.
async fn pipeline_of<H: BrokerHarness>(
    h: &H,
    stream: &str,
    pipeline: &str,
    store: Arc<dyn CheckpointStore>,
    sink: MemorySink,
) -> PipelineBuilder {
    let faulty = FaultInjectingSink::new(
        sink,
        FaultConfig {
            poison_prefix: Some("poison".into()),
            ..Default::default()
        },
    );
    let mut builder = Pipeline::builder(pipeline)
        .source(h.source(stream, pipeline))
        .sink(faulty);
    if h.capabilities().replayable {
        builder = builder.checkpoint_store(store);
    }
    if let Some(dead_letter) = h.dead_letter_sink(stream).await {
        builder = builder.dead_letter(dead_letter);
    }
    builder
}

/// The dead letters read back, sorted, once `want` arrived (or after 10 s).
async fn read_dead_letters<H: BrokerHarness>(h: &H, stream: &str, want: usize) -> Vec<String> {
    let started = std::time::Instant::now();
    let mut letters = h.dead_letters(stream).await;
    while letters.len() < want && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        letters = h.dead_letters(stream).await;
    }
    letters.sort();
    letters
}
