//! PostgreSQL, then Redis, restarted while a worker commits checkpoints and writes marks (its
//! own test binary: it takes the rig's servers away): writes wait and retry, none is lost,
//! no checkpoint goes backwards.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use flowgate_checkpoint::{PostgresConfig, PostgresStore};
use flowgate_core::DedupStore;
use flowgate_core::{Checkpoint, CheckpointStore, IdempotencyKey, PartitionId, Position};

use std::sync::Arc;

use flowgate_checkpoint::{RedisConfig, RedisStore};

trait Store: CheckpointStore + DedupStore + 'static {}
impl<T: CheckpointStore + DedupStore + 'static> Store for T {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_write_loses_and_regresses_nothing() {
    let store = PostgresStore::connect(PostgresConfig {
        url: flowgate_rig_tests::endpoint("FLOWGATE_TEST_POSTGRES_URL"),
        schema: flowgate_rig_tests::unique("restart").replace('-', "_"),
        give_up_after: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    restart_mid_write("postgres", store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_write_loses_and_regresses_nothing() {
    let store = RedisStore::connect(RedisConfig {
        url: flowgate_rig_tests::endpoint("FLOWGATE_TEST_REDIS_URL"),
        prefix: flowgate_rig_tests::unique("restart"),
        give_up_after: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    restart_mid_write("redis", store).await;
}

async fn restart_mid_write(server: &'static str, store: Arc<dyn Store>) {
    let p = PartitionId::new("orders/0");
    let writer = {
        let store = store.clone();
        let p = p.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut pos = 0u64;
            let mut slowest = Duration::ZERO;
            // Until well after the restart.
            while started.elapsed() < Duration::from_secs(20) {
                pos += 1;
                let t = Instant::now();
                store
                    .commit(
                        "restart",
                        &[Checkpoint::new(p.clone(), Position::from(pos))],
                    )
                    .await
                    .expect("a commit must wait out the restart, not fail");
                store
                    .mark(
                        "restart",
                        &[IdempotencyKey::new(format!("k{pos}"))],
                        Duration::from_secs(600),
                    )
                    .await
                    .expect("a mark must wait out the restart, not fail");
                slowest = slowest.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (pos, slowest)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gone = flowgate_rig_tests::bounce(server, Duration::from_secs(1)).await;
    let (last, slowest) = writer.await.unwrap();
    let stored = store.load("restart").await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].position,
        Position::from(last),
        "the last commit is stored"
    );
    let keys: Vec<IdempotencyKey> = (1..=last)
        .map(|i| IdempotencyKey::new(format!("k{i}")))
        .collect();
    assert!(
        store
            .seen("restart", &keys)
            .await
            .unwrap()
            .iter()
            .all(|b| *b),
        "every mark written before and after the restart is there"
    );
    eprintln!(
        "{server}/restart: server gone for {:.1}s; {last} commits and marks, the slowest waited {:.1}s",
        gone.as_secs_f64(),
        slowest.as_secs_f64()
    );
}
