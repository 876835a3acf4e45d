//! The PostgreSQL and Redis stores against the servers of `cargo xtask brokers up`: the store
//! conformance suite (shared with the embedded store), a zombie writing concurrently with
//! the new owner of a partition, workers on separate connections racing for one lease, the
//! PostgreSQL table sink (conformance, exactly-once across replays, upserts), and an
//! unreachable server.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use flowgate_checkpoint::{
    PostgresConfig, PostgresStore, PostgresTableSink, PostgresTls, RedisConfig, RedisStore,
    RedisTls, TableMode,
};
use flowgate_core::testkit::sink::SinkHarness;
use flowgate_core::testkit::store::StoreHarness;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, ErrorKind, IdempotencyKey, LeaseStore, PartitionId,
    Position, Record, Sink, TxContext, WriteError,
};

/// A store in a schema of its own, so runs never see each other's rows.
fn pg_config() -> PostgresConfig {
    PostgresConfig {
        url: flowgate_rig_tests::endpoint("FLOWGATE_TEST_POSTGRES_URL"),
        schema: flowgate_rig_tests::unique("t").replace('-', "_"),
        ..Default::default()
    }
}

/// Keys under a prefix of their own, so runs never see each other's keys.
fn redis_config() -> RedisConfig {
    RedisConfig {
        url: flowgate_rig_tests::endpoint("FLOWGATE_TEST_REDIS_URL"),
        prefix: flowgate_rig_tests::unique("t"),
        ..Default::default()
    }
}

struct Pg(PostgresConfig);

#[async_trait]
impl StoreHarness for Pg {
    type Store = PostgresStore;
    async fn open(&self) -> Arc<PostgresStore> {
        PostgresStore::connect(self.0.clone())
            .await
            .expect("connect")
    }
}

struct Redis(RedisConfig);

#[async_trait]
impl StoreHarness for Redis {
    type Store = RedisStore;
    async fn open(&self) -> Arc<RedisStore> {
        RedisStore::connect(self.0.clone()).await.expect("connect")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    flowgate_core::testkit::store::run_all(&Pg(pg_config())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    flowgate_core::testkit::store::run_all(&Redis(redis_config())).await;
}

/// The new owner (fence 2) advances while a zombie (fence 1) keeps writing, from another
/// connection, positions far ahead: every zombie write is refused, the owner's always win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_never_wins_against_the_new_owner_postgres() {
    let cfg = pg_config();
    let owner = PostgresStore::connect(cfg.clone()).await.unwrap();
    let zombie = PostgresStore::connect(cfg).await.unwrap();
    zombie_race(owner, zombie).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_never_wins_against_the_new_owner_redis() {
    let cfg = redis_config();
    let owner = RedisStore::connect(cfg.clone()).await.unwrap();
    let zombie = RedisStore::connect(cfg).await.unwrap();
    zombie_race(owner, zombie).await;
}

async fn zombie_race<S: CheckpointStore + 'static>(owner: Arc<S>, zombie: Arc<S>) {
    let p = PartitionId::new("orders/0");
    let cp = move |pos: u64, fence: u64| {
        Checkpoint::new(p.clone(), Position::from(pos)).with_fence(Some(fence))
    };
    owner.commit("zombie", &[cp(0, 2)]).await.unwrap();
    let z = {
        let cp = cp.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            for pos in 1_000..1_200 {
                match zombie.commit("zombie", &[cp(pos, 1)]).await {
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");
                        refused += 1;
                    }
                    Ok(()) => panic!("a zombie write at {pos} was accepted"),
                }
            }
            refused
        })
    };
    for pos in 1..=200 {
        owner.commit("zombie", &[cp(pos, 2)]).await.unwrap();
    }
    assert_eq!(z.await.unwrap(), 200);
    let stored = owner.load("zombie").await.unwrap();
    assert_eq!(stored, vec![cp(200, 2)]);
    // Backwards, even with the current fence: refused; a reset is the way back.
    let e = owner.commit("zombie", &[cp(150, 2)]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced);
    owner
        .reset("zombie", Some(&[PartitionId::new("orders/0")]))
        .await
        .unwrap();
    owner.commit("zombie", &[cp(150, 2)]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_take_a_lease_one_at_a_time_postgres() {
    let cfg = pg_config();
    let mut workers = Vec::new();
    for _ in 0..6 {
        workers.push(PostgresStore::connect(cfg.clone()).await.unwrap());
    }
    lease_race(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_take_a_lease_one_at_a_time_redis() {
    let cfg = redis_config();
    let mut workers = Vec::new();
    for _ in 0..6 {
        workers.push(RedisStore::connect(cfg.clone()).await.unwrap());
    }
    lease_race(workers).await;
}

/// Rounds of 24 racers (4 tasks on each worker's own connections) for one lease: each round
/// exactly one wins, with a higher epoch than the round before, and releases it for the next.
async fn lease_race<S: LeaseStore + 'static>(workers: Vec<Arc<S>>) {
    let shard = PartitionId::new("shardId-000000000000");
    let mut last_epoch = 0;
    for round in 0..25 {
        let mut tasks = Vec::new();
        for (w, store) in workers.iter().enumerate() {
            for t in 0..4 {
                let (store, shard) = (Arc::clone(store), shard.clone());
                tasks.push(tokio::spawn(async move {
                    store
                        .acquire(
                            "race",
                            &shard,
                            &format!("w{w}-t{t}-r{round}"),
                            Duration::from_secs(30),
                            None,
                        )
                        .await
                        .unwrap()
                }));
            }
        }
        let mut winners = Vec::new();
        for t in tasks {
            winners.extend(t.await.unwrap());
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let won = winners.remove(0);
        assert!(won.epoch > last_epoch, "round {round}: epoch did not rise");
        last_epoch = won.epoch;
        let held = workers[0].leases("race").await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].owner, won.owner, "the store names the winner");
        workers[round % workers.len()]
            .release("race", &won)
            .await
            .unwrap();
    }
    eprintln!(
        "lease race: 25 rounds of 24 racers on {} connections, one winner each",
        workers.len()
    );
}

/// Nothing listening is a clear error after the retries, naming the server (no password).
fn assert_clear_unreachable(err: Option<flowgate_core::Error>) {
    let text = err.expect("nothing listens on port 1").to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_a_clear_error() {
    assert_clear_unreachable(
        RedisStore::connect(RedisConfig {
            url: "redis://:hunter2@127.0.0.1:1".into(),
            give_up_after: Duration::from_millis(500),
            ..Default::default()
        })
        .await
        .err(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_is_a_clear_error() {
    assert_clear_unreachable(
        PostgresStore::connect(PostgresConfig {
            url: "postgres://flowgate:hunter2@127.0.0.1:1/flowgate".into(),
            give_up_after: Duration::from_millis(500),
            ..Default::default()
        })
        .await
        .err(),
    );
}

struct PgTable(PostgresConfig, String);

#[async_trait]
impl SinkHarness for PgTable {
    type Sink = PostgresTableSink;
    async fn open_sink(&self) -> Result<PostgresTableSink, flowgate_core::Error> {
        PostgresStore::connect(self.0.clone())
            .await?
            .table_sink("conformance", &self.1, TableMode::Insert)
            .await
    }
    async fn read_back(&self) -> Result<Vec<Record>, flowgate_core::Error> {
        self.open_sink().await?.rows().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_table_sink_conforms() {
    flowgate_core::testkit::sink::run_all(&PgTable(pg_config(), "events".into())).await;
}

fn rec(i: u64, key: &str) -> Record {
    Record::new(
        PartitionId::new("p"),
        Position::from(i),
        format!("payload-{i}"),
    )
    .with_key(key.to_string())
    .with_idempotency_key(IdempotencyKey::new(format!("p@{i}")))
}

/// A transactional write replayed (whole, or overlapping the next batch) writes each row once:
/// the marks and the rows commit together, and only newly marked keys write a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_table_sink_writes_each_record_once_across_replays() {
    let store = PostgresStore::connect(pg_config()).await.unwrap();
    let sink = store
        .table_sink("tx", "events", TableMode::Insert)
        .await
        .unwrap();
    let tx = TxContext {
        pipeline: "tx",
        dedup_marks: &[],
        dedup_ttl: Duration::from_secs(3600),
    };
    let first: Vec<Record> = (0..10).map(|i| rec(i, "k")).collect();
    let overlapping: Vec<Record> = (5..20).map(|i| rec(i, "k")).collect();
    sink.write_transactional(&first, &tx).await.unwrap();
    sink.write_transactional(&first, &tx).await.unwrap();
    sink.write_transactional(&overlapping, &tx).await.unwrap();
    let rows = sink.rows().await.unwrap();
    let positions: Vec<u64> = rows.iter().map(|r| r.position.as_u64().unwrap()).collect();
    assert_eq!(
        positions,
        (0..20).collect::<Vec<_>>(),
        "each record once, in order"
    );
    // The marks were written in the same transactions.
    let seen = store
        .seen(
            "tx",
            &[IdempotencyKey::new("p@3"), IdempotencyKey::new("p@42")],
        )
        .await
        .unwrap();
    assert_eq!(seen, vec![true, false]);
}

/// Upsert mode keeps one row per key, the latest record's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_table_sink_upserts_by_key() {
    let store = PostgresStore::connect(pg_config()).await.unwrap();
    let sink = store
        .table_sink("up", "latest", TableMode::Upsert)
        .await
        .unwrap();
    let batch: Vec<Record> = (0..9)
        .map(|i| rec(i, ["a", "b", "c"][i as usize % 3]))
        .collect();
    sink.write(&batch[..5]).await.unwrap();
    sink.write(&batch[5..]).await.unwrap();
    let mut rows: Vec<(String, String)> = sink
        .rows()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                String::from_utf8_lossy(r.key.as_ref().unwrap()).into_owned(),
                String::from_utf8_lossy(&r.payload).into_owned(),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("a".to_string(), "payload-6".to_string()),
            ("b".to_string(), "payload-7".to_string()),
            ("c".to_string(), "payload-8".to_string())
        ]
    );
    let keyless = Record::new(PartitionId::new("p"), Position::from(99u64), "x");
    match sink.write(&[keyless]).await {
        Err(WriteError::Partial(e)) => assert_eq!(e[0].1.kind(), ErrorKind::Poison),
        other => panic!("a keyless record must be poison in upsert mode: {other:?}"),
    }
}

/// With `tls`, every connection of the store is encrypted and the server verified against the
/// configured CA; a CA that did not sign the server's certificate is refused with a clear
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_over_tls_verifies_the_server() {
    let ca = std::path::PathBuf::from(flowgate_rig_tests::endpoint("FLOWGATE_TEST_POSTGRES_CA"));
    let app = flowgate_rig_tests::unique("tls").replace('-', "_");
    let base = pg_config();
    let cfg = PostgresConfig {
        url: format!("{}?application_name={app}", base.url),
        // The rig's server asks TLS clients for a certificate whose CN is the user.
        tls: Some(PostgresTls {
            ca_file: Some(ca.clone()),
            cert_file: Some(ca.with_file_name("client.pem")),
            key_file: Some(ca.with_file_name("client.key")),
        }),
        ..base.clone()
    };
    let store = PostgresStore::connect(cfg.clone()).await.unwrap();
    store
        .commit(
            "tls",
            &[Checkpoint::new(PartitionId::new("p"), Position::from(7u64))],
        )
        .await
        .unwrap();
    assert_eq!(store.load("tls").await.unwrap().len(), 1);
    let (client, conn) = tokio_postgres::connect(&base.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "the store's connections are visible");
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(0)),
        "every connection of the store uses TLS"
    );

    // Without a client certificate the server refuses the connection, with its reason.
    let anonymous = PostgresConfig {
        tls: Some(PostgresTls {
            ca_file: Some(ca.clone()),
            ..Default::default()
        }),
        give_up_after: Duration::from_millis(500),
        ..cfg.clone()
    };
    let err = PostgresStore::connect(anonymous)
        .await
        .err()
        .expect("a TLS client without a certificate must be refused");
    let anonymous_text = format!("{err:#}");
    assert!(
        anonymous_text.contains("client certificate"),
        "{anonymous_text}"
    );
    assert_eq!(err.kind(), ErrorKind::Config, "{anonymous_text}");
    eprintln!("postgres/tls: without a client certificate: {anonymous_text}");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = flowgate_rig_tests::foreign_client_certificate(dir.path());
    let foreign = PostgresConfig {
        tls: Some(PostgresTls {
            ca_file: Some(ca.clone()),
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
        }),
        give_up_after: Duration::from_millis(500),
        ..cfg.clone()
    };
    let err = PostgresStore::connect(foreign)
        .await
        .err()
        .expect("a client certificate of another CA must be refused");
    eprintln!("postgres/tls: a client certificate of another CA: {err:#}");
    assert_eq!(err.kind(), ErrorKind::Config, "{err:#}");
    assert!(err.to_string().contains("client certificate"), "{err:#}");

    // The server's own certificate is not the CA that signed it: verification fails.
    let wrong = PostgresConfig {
        tls: Some(PostgresTls {
            ca_file: Some(ca.with_file_name("server.pem")),
            ..Default::default()
        }),
        give_up_after: Duration::from_millis(500),
        ..cfg
    };
    let err = PostgresStore::connect(wrong)
        .await
        .err()
        .expect("an untrusted server must be refused");
    let text = format!("{err:#}");
    assert!(
        text.to_lowercase().contains("certificate") || text.contains("TLS"),
        "{text}"
    );
    eprintln!(
        "postgres/tls: {} TLS connections; wrong CA refused: {text}",
        rows.len()
    );
}

/// With a `rediss://` url and the rig's CA, the store works over TLS; a CA that did not sign
/// the server's certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_over_tls_verifies_the_server() {
    let ca = std::path::PathBuf::from(flowgate_rig_tests::endpoint("FLOWGATE_TEST_REDIS_CA"));
    let cfg = RedisConfig {
        url: flowgate_rig_tests::endpoint("FLOWGATE_TEST_REDIS_TLS_URL"),
        // The rig's TLS port asks for a client certificate of its CA.
        tls: Some(RedisTls {
            ca_file: Some(ca.clone()),
            cert_file: Some(ca.with_file_name("client.pem")),
            key_file: Some(ca.with_file_name("client.key")),
        }),
        ..redis_config()
    };
    let store = RedisStore::connect(cfg.clone()).await.unwrap();
    store
        .commit(
            "tls",
            &[Checkpoint::new(PartitionId::new("p"), Position::from(7u64))],
        )
        .await
        .unwrap();
    assert_eq!(store.load("tls").await.unwrap().len(), 1);
    let anonymous = RedisConfig {
        tls: Some(RedisTls {
            ca_file: Some(ca.clone()),
            ..Default::default()
        }),
        give_up_after: Duration::from_millis(500),
        ..cfg.clone()
    };
    let err = RedisStore::connect(anonymous)
        .await
        .err()
        .expect("a TLS client without a certificate must be refused");
    assert_eq!(err.kind(), ErrorKind::Config, "{err:#}");
    assert!(err.to_string().contains("client certificate"), "{err:#}");
    eprintln!("redis/tls: without a client certificate: {err:#}");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = flowgate_rig_tests::foreign_client_certificate(dir.path());
    let foreign = RedisConfig {
        tls: Some(RedisTls {
            ca_file: Some(ca.clone()),
            cert_file: Some(cert),
            key_file: Some(key),
        }),
        give_up_after: Duration::from_millis(500),
        ..cfg.clone()
    };
    let err = RedisStore::connect(foreign)
        .await
        .err()
        .expect("a client certificate of another CA must be refused");
    eprintln!("redis/tls: a client certificate of another CA: {err:#}");
    assert_eq!(err.kind(), ErrorKind::Config, "{err:#}");
    assert!(err.to_string().contains("client certificate"), "{err:#}");
    let wrong = RedisConfig {
        tls: Some(RedisTls {
            ca_file: Some(ca.with_file_name("server.pem")),
            ..Default::default()
        }),
        give_up_after: Duration::from_millis(500),
        ..cfg
    };
    let err = RedisStore::connect(wrong)
        .await
        .err()
        .expect("an untrusted server must be refused");
    let text = err.to_string();
    assert_eq!(err.kind(), ErrorKind::Config, "{text}");
    assert!(text.contains("UnknownIssuer"), "the cause is named: {text}");
    eprintln!("redis/tls: commit and load over TLS; wrong CA refused: {text}");
}
