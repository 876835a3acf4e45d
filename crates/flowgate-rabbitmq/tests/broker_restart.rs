//! RabbitMQ stopped and restarted under a running pipeline (its own test binary: it takes
//! the rig's broker away, which no other test may see): the source reconnects, re-consumes,
//! and nothing is lost; redelivered messages go through dedup.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_checkpoint::EmbeddedStore;
use flowgate_rabbitmq::{RabbitSource, RabbitSourceConfig};
use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink, MemorySink};
use flowgate_runtime::{KeyExtractor, Pipeline, RuntimeSettings, Shutdown};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn url() -> String {
    std::env::var("FLOWGATE_TEST_RABBITMQ_URL").unwrap_or_else(|_| {
        panic!("FLOWGATE_TEST_RABBITMQ_URL is not set: run `cargo xtask brokers up` and export what it prints (or `cargo xtask test`)")
    })
}

/// `cargo xtask brokers <verb> --only rabbitmq`, from the workspace root.
fn rig(verb: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["xtask", "brokers", verb, "--only", "rabbitmq"])
        .current_dir(root)
        .status()
        .expect("run cargo xtask");
    assert!(
        status.success(),
        "cargo xtask brokers {verb} --only rabbitmq failed"
    );
}

async fn publish(queue: &str, ids: std::ops::Range<usize>) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in ids {
        let id = format!("m{i}");
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                id.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.as_str().into()),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
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
    publish(&queue, 0..first).await;

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

    let waited = Instant::now();
    while sink.len() < 2_000 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the pipeline did not get going: {} records",
            sink.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_stop = sink.len();
    tokio::task::spawn_blocking(|| rig("down")).await.unwrap();
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(|| rig("up")).await.unwrap();
    eprintln!(
        "rabbitmq/restart: broker stopped at {at_stop} records written, back after {:.1}s",
        stopped.elapsed().as_secs_f64()
    );
    publish(&queue, first..first + second).await;

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
