//! Poison: a record the sink refuses as poison goes to the dead letters (a dead-letter sink,
//! or the broker's own dead-letter route), is acknowledged, and the partition keeps flowing:
//! every other record arrives, and the broker counts nothing left to consume.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::CheckpointStore;

use crate::adapters::{FaultConfig, FaultInjectingSink, MemorySink};
use crate::{Pipeline, Shutdown};

use super::harness::{payload, payload_counts, unique, wait_for_no_backlog};
use super::{BrokerHarness, ScenarioReport};

/// Records produced by the suite; every fiftieth (from the eighth) is poison.
pub const RECORDS: usize = 500;

fn is_poison(i: usize) -> bool {
    i % 50 == 7
}

/// Runs the suite: [`RECORDS`] records, of which 10 are poison; `store` is the checkpoint
/// store when the broker is replayable.
pub async fn dead_lettered_and_the_rest_flows<H: BrokerHarness>(
    h: &H,
    store: Arc<dyn CheckpointStore>,
) -> ScenarioReport {
    let stream = h.create().await;
    let pipeline = unique(&format!("{}-poison", h.broker()));
    let payloads: Vec<String> = (0..RECORDS)
        .map(|i| {
            if is_poison(i) {
                format!("poison-{i}")
            } else {
                format!("ok-{i}")
            }
        })
        .collect();
    let poisons: Vec<&String> = payloads
        .iter()
        .filter(|p| p.starts_with("poison"))
        .collect();
    let good = RECORDS - poisons.len();
    h.produce(&stream, &payloads).await;

    let sink = MemorySink::new();
    let faulty = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            poison_prefix: Some("poison".into()),
            ..Default::default()
        },
    );
    let mut builder = Pipeline::builder(pipeline.clone())
        .source(h.source(&stream, &pipeline))
        .sink(faulty);
    if h.capabilities().replayable {
        builder = builder.checkpoint_store(store);
    }
    if let Some(dead_letter) = h.dead_letter_sink(&stream).await {
        builder = builder.dead_letter(dead_letter);
    }
    let pipe = builder.build().expect("a valid pipeline");
    let stats = pipe.stats();
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipe.run(shutdown));
    let started = std::time::Instant::now();
    while sink.len() < good || stats.snapshot().dead_lettered < poisons.len() as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}: the partition stalled: {} of {good} good records written, {:?}",
            h.broker(),
            sink.len(),
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trigger.trigger();
    let summary = run
        .await
        .expect("the pipeline task")
        .expect("the pipeline stops cleanly");

    let written = sink.records();
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
    let started = std::time::Instant::now();
    let mut letters = h.dead_letters(&stream).await;
    while letters.len() < poisons.len() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        letters = h.dead_letters(&stream).await;
    }
    letters.sort();
    let mut want: Vec<String> = poisons.iter().map(|p| p.to_string()).collect();
    want.sort();
    assert_eq!(letters, want, "{}: exactly the poison records", h.broker());
    wait_for_no_backlog(h, &stream, &pipeline, Duration::from_secs(15)).await;
    if h.capabilities().replayable {
        // The last record of each partition is not poison: each checkpoint is the position of
        // the last record written there.
        for cp in &summary.checkpoints {
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
        assert_eq!(
            summary.checkpoints.len() as u32,
            h.capabilities().partitions,
            "{}: a checkpoint per partition",
            h.broker()
        );
    }
    ScenarioReport {
        stream,
        pipeline,
        summary,
        written,
    }
}
