//! The DynamoDB store against moto's server (`cargo xtask brokers up`,
//! FLOWGATE_TEST_DYNAMODB_ENDPOINT): the store conformance suite (leases included), a zombie
//! writing concurrently with the new owner, workers on separate clients racing for one lease,
//! throttling answered by a proxy in front of moto (retried, counted, nothing lost), the
//! table's schema and permissions, and reading a lease table as the AWS KCL writes it.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use flowgate_checkpoint::{DynamoDbConfig, DynamoDbStore, KclCheckpoint, read_kcl_leases};
use flowgate_core::testkit::store::StoreHarness;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, ErrorKind, IdempotencyKey, LeaseStore, PartitionId,
    Position,
};

/// moto's endpoint, with static credentials (moto accepts any).
fn base_config(endpoint: String) -> DynamoDbConfig {
    DynamoDbConfig {
        endpoint_url: Some(endpoint),
        region: Some("us-east-1".into()),
        access_key_id: Some("flowgate-test".into()),
        secret_access_key: Some("flowgate-test".into()),
        ..Default::default()
    }
}

/// A table of its own, so runs never see each other's items.
fn config() -> DynamoDbConfig {
    DynamoDbConfig {
        table: flowgate_rig_tests::unique("t"),
        ..base_config(flowgate_rig_tests::endpoint(
            "FLOWGATE_TEST_DYNAMODB_ENDPOINT",
        ))
    }
}

struct Dynamo(DynamoDbConfig);

#[async_trait]
impl StoreHarness for Dynamo {
    type Store = DynamoDbStore;
    async fn open(&self) -> Arc<DynamoDbStore> {
        DynamoDbStore::connect(self.0.clone())
            .await
            .expect("connect")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_store_conforms() {
    flowgate_core::testkit::store::run_all(&Dynamo(config())).await;
}

/// Two deployments sharing one table under different key prefixes never see each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_prefixes_share_a_table() {
    let cfg = config();
    let a = DynamoDbStore::connect(DynamoDbConfig {
        key_prefix: "a/".into(),
        ..cfg.clone()
    })
    .await
    .unwrap();
    let b = DynamoDbStore::connect(DynamoDbConfig {
        key_prefix: "b/".into(),
        ..cfg
    })
    .await
    .unwrap();
    let cp = Checkpoint::new(PartitionId::new("p"), Position::from(5u64));
    a.commit("orders", std::slice::from_ref(&cp)).await.unwrap();
    assert_eq!(a.load("orders").await.unwrap(), vec![cp]);
    assert!(b.load("orders").await.unwrap().is_empty());
    let k = [IdempotencyKey::new("k")];
    a.mark("orders", &k, Duration::from_secs(60)).await.unwrap();
    assert_eq!(b.seen("orders", &k).await.unwrap(), vec![false]);
}

/// A commit of more checkpoints than one transaction holds (DynamoDB: 100) lands whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_above_one_transaction_land_whole() {
    let store = DynamoDbStore::connect(config()).await.unwrap();
    let cps: Vec<Checkpoint> = (0..250)
        .map(|i| {
            Checkpoint::new(
                PartitionId::new(format!("p{i:03}")),
                Position::from(i as u64),
            )
            .with_fence(Some(1))
        })
        .collect();
    store.commit("wide", &cps).await.unwrap();
    assert_eq!(store.load("wide").await.unwrap(), cps);
}

/// The new owner (fence 2) advances while a zombie (fence 1) keeps writing positions far
/// ahead from another client: every zombie write is refused, the owner's always win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_never_wins_against_the_new_owner() {
    let cfg = config();
    let owner = DynamoDbStore::connect(cfg.clone()).await.unwrap();
    let zombie = DynamoDbStore::connect(cfg).await.unwrap();
    let p = PartitionId::new("orders/0");
    let cp = move |pos: u64, fence: u64| {
        Checkpoint::new(p.clone(), Position::from(pos)).with_fence(Some(fence))
    };
    owner.commit("zombie", &[cp(0, 2)]).await.unwrap();
    let z = {
        let cp = cp.clone();
        tokio::spawn(async move {
            for pos in 1_000..1_100 {
                let e = zombie.commit("zombie", &[cp(pos, 1)]).await.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");
            }
        })
    };
    for pos in 1..=100 {
        owner.commit("zombie", &[cp(pos, 2)]).await.unwrap();
    }
    z.await.unwrap();
    assert_eq!(owner.load("zombie").await.unwrap(), vec![cp(100, 2)]);
}

/// A worker that lost its lease (taken over after expiry by another client) has its
/// checkpoint refused, and the refusal names the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_checkpoint_after_losing_its_lease_is_refused() {
    let cfg = config();
    let old = DynamoDbStore::connect(cfg.clone()).await.unwrap();
    let new = DynamoDbStore::connect(cfg).await.unwrap();
    let shard = PartitionId::new("shardId-000000000000");
    let ttl = Duration::from_millis(400);
    let a = old
        .acquire("kcl", &shard, "old", ttl, None)
        .await
        .unwrap()
        .unwrap();
    old.commit(
        "kcl",
        &[Checkpoint::new(shard.clone(), Position::from(10u64)).with_fence(Some(a.epoch))],
    )
    .await
    .unwrap();
    // The new worker first sees the lease now; it may take it one ttl later, not before.
    assert!(
        new.acquire("kcl", &shard, "new", ttl, None)
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(ttl * 2).await;
    let b = new
        .acquire("kcl", &shard, "new", Duration::from_secs(30), None)
        .await
        .unwrap()
        .expect("expired for the new worker");
    let e = old
        .commit(
            "kcl",
            &[Checkpoint::new(shard.clone(), Position::from(20u64)).with_fence(Some(a.epoch))],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced);
    assert!(e.to_string().contains("lease"), "{e}");
    assert_eq!(
        old.renew("kcl", &a, ttl).await.unwrap_err().kind(),
        ErrorKind::Fenced
    );
    new.commit(
        "kcl",
        &[Checkpoint::new(shard.clone(), Position::from(15u64)).with_fence(Some(b.epoch))],
    )
    .await
    .unwrap();
}

/// Rounds of racers on separate clients for one lease: one winner per round, epochs rising.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_take_a_lease_one_at_a_time() {
    let cfg = config();
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(DynamoDbStore::connect(cfg.clone()).await.unwrap());
    }
    let shard = PartitionId::new("shardId-000000000000");
    let mut last_epoch = 0;
    for round in 0..10 {
        let mut tasks = Vec::new();
        for (w, store) in workers.iter().enumerate() {
            for t in 0..3 {
                let (store, shard) = (Arc::clone(store), shard.clone());
                tasks.push(tokio::spawn(async move {
                    store
                        .acquire(
                            "race",
                            &shard,
                            &format!("w{w}-t{t}"),
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
        assert!(won.epoch > last_epoch);
        last_epoch = won.epoch;
        workers[round % workers.len()]
            .release("race", &won)
            .await
            .unwrap();
    }
}

/// Without `create_table`, a missing table is a config error naming it; a table with another
/// key schema is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_foreign_table_is_a_clear_error() {
    let cfg = config();
    let e = DynamoDbStore::connect(DynamoDbConfig {
        create_table: false,
        ..cfg.clone()
    })
    .await
    .err()
    .expect("no such table");
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains(&cfg.table), "{e}");

    let client = sdk_client(&cfg).await;
    let foreign = flowgate_rig_tests::unique("foreign");
    create_table(&client, &foreign, "leaseKey", None).await;
    let e = DynamoDbStore::connect(DynamoDbConfig {
        table: foreign.clone(),
        ..cfg
    })
    .await
    .err()
    .expect("foreign key schema");
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("key schema"), "{e}");
}

/// Nothing listening: a clear error after the retries, naming the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_dynamodb_is_a_clear_error() {
    let e = DynamoDbStore::connect(DynamoDbConfig {
        give_up_after: Duration::from_millis(500),
        ..base_config("http://127.0.0.1:1".into())
    })
    .await
    .err()
    .expect("nothing listens on port 1");
    assert_eq!(e.kind(), ErrorKind::Transient);
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
}

/// A proxy in front of moto answers every `every`-th request with DynamoDB's throttling
/// error (`ProvisionedThroughputExceededException`, HTTP 400), as AWS does above a table's
/// capacity, and forwards the others.
async fn throttling_proxy(upstream: String, every: u64) -> (String, Arc<AtomicU64>) {
    use axum::body::{Body, Bytes};
    use axum::http::{HeaderMap, Method, Response, StatusCode};
    let count = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::new();
    let app = {
        let throttled = throttled.clone();
        axum::Router::new().fallback(move |method: Method, headers: HeaderMap, body: Bytes| {
            let (client, upstream, count, throttled) =
                (client.clone(), upstream.clone(), count.clone(), throttled.clone());
            async move {
                if count.fetch_add(1, Ordering::SeqCst) % every == every - 1 {
                    throttled.fetch_add(1, Ordering::SeqCst);
                    return Response::builder()
                        .status(StatusCode::BAD_REQUEST)
                        .header("content-type", "application/x-amz-json-1.0")
                        .body(Body::from(
                            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"The level of configured provisioned throughput for the table was exceeded."}"#,
                        ))
                        .unwrap();
                }
                let mut req = client.request(method, format!("{upstream}/"));
                for (k, v) in &headers {
                    if k != "host" && k != "content-length" {
                        req = req.header(k, v);
                    }
                }
                let resp = req.body(body).send().await.unwrap();
                let mut out = Response::builder().status(resp.status().as_u16());
                for (k, v) in resp.headers() {
                    if k != "content-length" && k != "transfer-encoding" {
                        out = out.header(k, v);
                    }
                }
                out.body(Body::from(resp.bytes().await.unwrap())).unwrap()
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), throttled)
}

/// Every third call throttled: every checkpoint, mark and lease change still lands, the
/// throttles are counted, and nothing surfaces as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_counted_and_loses_nothing() {
    let direct = config();
    let (proxy, throttled) = throttling_proxy(direct.endpoint_url.clone().unwrap(), 3).await;
    let store = DynamoDbStore::connect(DynamoDbConfig {
        endpoint_url: Some(proxy),
        ..direct.clone()
    })
    .await
    .unwrap();
    let p = PartitionId::new("p");
    for pos in 0..30u64 {
        store
            .commit(
                "t",
                &[Checkpoint::new(p.clone(), Position::from(pos)).with_fence(Some(1))],
            )
            .await
            .unwrap();
    }
    let keys: Vec<IdempotencyKey> = (0..120)
        .map(|i| IdempotencyKey::new(format!("k{i}")))
        .collect();
    store
        .mark("t", &keys, Duration::from_secs(600))
        .await
        .unwrap();
    let lease = store
        .acquire(
            "t",
            &PartitionId::new("s"),
            "w",
            Duration::from_secs(30),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    for _ in 0..10 {
        store
            .renew("t", &lease, Duration::from_secs(30))
            .await
            .unwrap();
    }
    // Read back without the proxy.
    let check = DynamoDbStore::connect(direct).await.unwrap();
    assert_eq!(
        check.load("t").await.unwrap(),
        vec![Checkpoint::new(p, Position::from(29u64)).with_fence(Some(1))]
    );
    assert!(check.seen("t", &keys).await.unwrap().iter().all(|s| *s));
    let counted = store.throttles();
    assert!(counted >= 10, "throttles counted: {counted}");
    assert_eq!(
        counted,
        throttled.load(Ordering::SeqCst),
        "each throttle counted once"
    );
}

async fn sdk_client(cfg: &DynamoDbConfig) -> aws_sdk_dynamodb::Client {
    let conf = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .endpoint_url(cfg.endpoint_url.clone().unwrap())
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "flowgate-test",
            "flowgate-test",
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_dynamodb::Client::from_conf(conf)
}

async fn create_table(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    hash: &str,
    range: Option<&str>,
) {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    let mut call = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest);
    for (name, kind) in [(Some(hash), KeyType::Hash), (range, KeyType::Range)] {
        let Some(name) = name else { continue };
        call = call
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(name)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(name)
                    .key_type(kind)
                    .build()
                    .unwrap(),
            );
    }
    call.send().await.unwrap();
}

/// A lease table as the AWS KCL writes it: a parent shard at its end, a child mid-way (with a
/// KPL sub-sequence), a child not started; owners and counters as a worker leaves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kcl_lease_table_reads_as_kcl_wrote_it() {
    let cfg = config();
    let client = sdk_client(&cfg).await;
    let table = flowgate_rig_tests::unique("kcl-app");
    create_table(&client, &table, "leaseKey", None).await;
    let s = |v: &str| AttributeValue::S(v.into());
    let n = |v: u64| AttributeValue::N(v.to_string());
    let items: Vec<HashMap<String, AttributeValue>> = vec![
        HashMap::from([
            ("leaseKey".into(), s("shardId-000000000000")),
            ("checkpoint".into(), s("SHARD_END")),
            ("checkpointSubSequenceNumber".into(), n(0)),
            ("leaseCounter".into(), n(310)),
            ("ownerSwitchesSinceCheckpoint".into(), n(0)),
            (
                "childShardIds".into(),
                AttributeValue::Ss(vec![
                    "shardId-000000000001".into(),
                    "shardId-000000000002".into(),
                ]),
            ),
        ]),
        HashMap::from([
            ("leaseKey".into(), s("shardId-000000000001")),
            (
                "checkpoint".into(),
                s("49590338271490256608559692538361571095921575989136588898"),
            ),
            ("checkpointSubSequenceNumber".into(), n(2)),
            ("leaseOwner".into(), s("worker-7c1e")),
            ("leaseCounter".into(), n(88)),
            ("ownerSwitchesSinceCheckpoint".into(), n(1)),
            (
                "parentShardId".into(),
                AttributeValue::Ss(vec!["shardId-000000000000".into()]),
            ),
        ]),
        HashMap::from([
            ("leaseKey".into(), s("shardId-000000000002")),
            ("checkpoint".into(), s("TRIM_HORIZON")),
            ("checkpointSubSequenceNumber".into(), n(0)),
            ("leaseCounter".into(), n(1)),
            (
                "parentShardId".into(),
                AttributeValue::Ss(vec!["shardId-000000000000".into()]),
            ),
        ]),
    ];
    for item in items {
        client
            .put_item()
            .table_name(&table)
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
    }
    let leases = read_kcl_leases(&cfg, &table).await.unwrap();
    assert_eq!(leases.len(), 3);
    assert_eq!(leases[0].checkpoint, KclCheckpoint::ShardEnd);
    assert_eq!(
        leases[1].checkpoint,
        KclCheckpoint::Sequence {
            sequence_number: "49590338271490256608559692538361571095921575989136588898".into(),
            sub_sequence: 2
        }
    );
    assert_eq!(leases[1].parents, vec!["shardId-000000000000".to_string()]);
    assert_eq!(
        (leases[1].owner.as_deref(), leases[1].counter),
        (Some("worker-7c1e"), 88)
    );
    assert_eq!(leases[2].checkpoint, KclCheckpoint::TrimHorizon);

    let e = read_kcl_leases(&cfg, "no-such-kcl-table")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("no-such-kcl-table"), "{e}");
}
