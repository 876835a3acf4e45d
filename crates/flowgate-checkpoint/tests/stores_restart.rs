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

/// A Redis server that restarts answers `LOADING` until it has read its dataset back: calls
/// wait until it serves, they do not fail. A server of the test's own (the same
/// `redis-server` as the rig's), whose 20,000 keys load 100 µs apart (`key-load-delay`),
/// answering clients every 1 KiB read: seconds of `LOADING`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loading_its_dataset_after_a_restart_is_waited_out() {
    let dir = std::env::temp_dir().join(flowgate_rig_tests::unique("redis-loading"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = |extra: &[&str]| {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--dir"])
            .arg(&dir)
            .args(["--appendonly", "no", "--save", ""])
            .args(extra)
            .stdout(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .expect("redis-server (Debian's redis-server package)");
        KillOnDrop(child)
    };
    let answers = || {
        flowgate_rig_tests::wait_until(
            || format!("redis-server listening on {port}"),
            Duration::from_secs(10),
            move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        )
    };
    let first = server(&[]);
    answers().await;
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for chunk in 0..2 {
        let mut pipe = redis::pipe();
        for i in 0..10_000 {
            pipe.set(format!("filler:{chunk}:{i}"), i).ignore();
        }
        pipe.query_async::<()>(&mut raw).await.unwrap();
    }
    redis::cmd("SAVE")
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    let store = RedisStore::connect(RedisConfig {
        url: url.clone(),
        prefix: flowgate_rig_tests::unique("loading"),
        give_up_after: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    let p = PartitionId::new("orders/0");
    store
        .commit("loading", &[Checkpoint::new(p.clone(), Position::from(1))])
        .await
        .unwrap();
    drop(first);

    // It answers clients (`LOADING`) every 1 KiB read, as a large dataset's server does
    // every 2 MiB by default.
    let _second = server(&[
        "--key-load-delay",
        "100",
        "--loading-process-events-interval-bytes",
        "1024",
    ]);
    answers().await;
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        info.contains("loading:1"),
        "the server is still loading its dataset: {info}"
    );
    let started = Instant::now();
    store
        .commit("loading", &[Checkpoint::new(p.clone(), Position::from(2))])
        .await
        .expect("a commit waits until the server has loaded its dataset");
    store
        .mark(
            "loading",
            &[IdempotencyKey::new("k2")],
            Duration::from_secs(600),
        )
        .await
        .expect("a mark waits until the server has loaded its dataset");
    let waited = started.elapsed();
    let stored = store.load("loading").await.unwrap();
    assert_eq!(stored[0].position, Position::from(2));
    eprintln!(
        "redis/loading: the commit waited {:.1}s for the server to load 20,000 keys",
        waited.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
