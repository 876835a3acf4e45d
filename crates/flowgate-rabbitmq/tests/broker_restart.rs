//! RabbitMQ stopped and restarted under a running pipeline (its own test binary: it takes
//! the rig's broker away, which no other test may see): the source reconnects, re-consumes,
//! and nothing is lost; redelivered messages go through dedup.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_checkpoint::EmbeddedStore;
use flowgate_rabbitmq::QueueType;
use flowgate_rabbitmq::{RabbitSource, RabbitSourceConfig};
use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink, MemorySink};
use flowgate_runtime::{KeyExtractor, Pipeline, RuntimeSettings, Shutdown};

mod common;
use common::{publish, url};

async fn declare_classic(queue: &str) {
    let (conn, ch) = common::channel().await;
    common::declare(&ch, queue, QueueType::Classic).await;
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let queue = format!("restart-{nanos}");
    let (first, second) = (6_000, 2_000);
    declare_classic(&queue).await;
    publish(&queue, (0..first).map(|i| format!("m{i}"))).await;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.unwrap());
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder(format!("restart-{nanos}"))
        .source(
            RabbitSource::new(RabbitSourceConfig {
                url: url(),
                queue: queue.clone(),
                ..Default::default()
            })
            .unwrap(),
        )
        .sink(FaultInjectingSink::new(
            sink.clone(),
            FaultConfig {
                capacity_per_sec: Some(2_000.0),
                ..Default::default()
            },
        ))
        .dedup(store, KeyExtractor::Key)
        .settings(RuntimeSettings {
            max_in_flight_per_partition: 300,
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
        || sink.len() >= 2_000,
    )
    .await;
    let at_stop = sink.len();
    let watched = stats.clone();
    let health = flowgate_rig_tests::transitions(move || watched.health());
    let gone = flowgate_rig_tests::bounce("rabbitmq", Duration::from_secs(2)).await;
    eprintln!(
        "rabbitmq/restart: broker stopped at {at_stop} records written, back after {:.1}s",
        gone.as_secs_f64()
    );
    publish(&queue, (first..first + second).map(|i| format!("m{i}"))).await;

    let total = first + second;
    let waited = Instant::now();
    let count = |sink: &MemorySink| {
        let mut seen: HashMap<String, u32> = HashMap::new();
        for r in sink.records() {
            *seen
                .entry(String::from_utf8_lossy(&r.payload).into_owned())
                .or_default() += 1;
        }
        seen
    };
    loop {
        if count(&sink).len() >= total {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "after the restart only {} of {total} distinct messages arrived",
            count(&sink).len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the last acknowledgements go out, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The outage was visible: "disconnected" while the broker was away, healthy after.
    health
        .assert_away_then_back(
            "rabbitmq/restart",
            flowgate_runtime::Health::Disconnected,
            flowgate_runtime::Health::Healthy,
        )
        .await;
    trigger.trigger();
    run.await.unwrap().unwrap();
    let seen = count(&sink);
    for i in 0..total {
        assert!(seen.contains_key(&format!("m{i}")), "m{i} lost");
    }
    let written = sink.len();
    let s = stats.snapshot();
    eprintln!(
        "rabbitmq/restart: {total} messages, {written} written ({} duplicates), dedup hits {}, reassignments {}",
        written - total,
        s.dedup_hits,
        s.rebalances
    );
    assert!(
        s.rebalances >= 2,
        "the reconnect is a new assignment ({} seen)",
        s.rebalances
    );
}
