//! The Kafka broker stopped and restarted under a running pipeline (its own test binary:
//! it takes the rig's broker away, which no other test may see).
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_checkpoint::EmbeddedStore;
use flowgate_core::{CheckpointStore, Position};
use flowgate_kafka::{KafkaSource, KafkaSourceConfig, partition_id};
use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink, MemorySink};
use flowgate_runtime::{Pipeline, RuntimeSettings, Shutdown};

mod common;
use common::{bootstrap, create_topic, produce, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let topic = unique("restart");
    let group = unique("restart-group");
    let (partitions, first, second) = (4, 5_000, 2_500);
    create_topic(&topic, partitions).await;
    produce(&topic, partitions, first).await;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder(group.clone())
        .source(
            KafkaSource::new(KafkaSourceConfig {
                bootstrap_servers: bootstrap(),
                topics: vec![topic.clone()],
                group_id: Some(group.clone()),
                ..Default::default()
            })
            .unwrap(),
        )
        // Slow enough that the broker goes away mid-stream.
        .sink(FaultInjectingSink::new(
            sink.clone(),
            FaultConfig {
                capacity_per_sec: Some(4_000.0),
                ..Default::default()
            },
        ))
        .checkpoint_store(store.clone())
        .settings(RuntimeSettings {
            max_in_flight_per_partition: 500,
            ..Default::default()
        })
        .build()
        .unwrap();
    let (trigger, shutdown) = Shutdown::manual();
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run(shutdown));

    flowgate_rig_tests::wait_until(
        || format!("the pipeline did not get going: {} records", sink.len()),
        Duration::from_secs(60),
        || sink.len() >= 6_000,
    )
    .await;
    let at_stop = sink.len();
    let watched = stats.clone();
    let health = flowgate_rig_tests::transitions(move || watched.health());
    let gone = flowgate_rig_tests::bounce("kafka", Duration::from_secs(3)).await;
    eprintln!(
        "kafka/restart: broker stopped at {at_stop} records written, back after {:.1}s",
        gone.as_secs_f64()
    );
    // More records after the restart: the pipeline must pick them up too.
    produce(&topic, partitions, second).await;

    let total = (partitions as usize) * (first + second);
    let waited = Instant::now();
    let distinct = |records: &[flowgate_core::Record]| {
        let mut seen = HashMap::new();
        for r in records {
            *seen
                .entry((r.partition.clone(), r.position.clone()))
                .or_insert(0u32) += 1;
        }
        seen
    };
    loop {
        let seen = distinct(&sink.records());
        if seen.len() >= total {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "after the restart only {} of {total} distinct records arrived",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The outage was visible: "disconnected" while the broker was away, healthy after.
    health
        .assert_away_then_back(
            "kafka/restart",
            flowgate_runtime::Health::Disconnected,
            flowgate_runtime::Health::Healthy,
        )
        .await;
    trigger.trigger();
    let summary = run.await.unwrap().unwrap();
    let records = sink.records();
    let seen = distinct(&records);
    assert_eq!(seen.len(), total, "every record, none lost");
    let per_partition = (first + second) as i64;
    for p in 0..partitions {
        for o in 0..per_partition {
            let key = (partition_id(&topic, p), Position::from_offset(o).unwrap());
            assert!(seen.contains_key(&key), "partition {p} offset {o} missing");
        }
    }
    // The checkpoints reached the end of every partition.
    let checkpoints = store.load(&group).await.unwrap();
    for p in 0..partitions {
        let cp = checkpoints
            .iter()
            .find(|c| c.partition == partition_id(&topic, p))
            .expect("a checkpoint");
        assert_eq!(
            cp.position.as_offset(),
            Some(per_partition - 1),
            "checkpoint of partition {p}"
        );
    }
    let s = stats.snapshot();
    eprintln!(
        "kafka/restart: {total} records, {} written ({} duplicates), {} rebalances, retries {}; {summary:?}",
        records.len(),
        records.len() - total,
        s.rebalances,
        s.retries,
    );
}
