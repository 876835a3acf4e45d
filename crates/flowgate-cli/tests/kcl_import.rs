//! `flowgate checkpoints import-kcl` against a real stream (kinesis-mock) and a KCL lease table
//! in DynamoDB (moto), written in the KCL's layout: a parent read to its end, its children
//! one mid-way and one not started, and a second parent mid-way whose children have no leases
//! yet. The import is refused while a KCL worker renews a lease; then the flowgate pipeline
//! reads from the next record of each shard: none repeated, none skipped, children after
//! their parents.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use aws_sdk_kinesis::types::{ShardIteratorType, StreamStatus};
use flowgate_rig_tests::{endpoint, unique};
use flowgate_runtime::adapters::JsonLinesSink;

/// The SDK's settings for the rig's endpoint in `var` (static credentials, us-east-1).
async fn aws(var: &str) -> aws_config::SdkConfig {
    aws_config::from_env()
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "flowgate", "flowgate", None, None, "test",
        ))
        .endpoint_url(endpoint(var))
        .load()
        .await
}

async fn kinesis() -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::new(&aws("FLOWGATE_TEST_KINESIS_ENDPOINT").await)
}

async fn dynamodb() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&aws("FLOWGATE_TEST_DYNAMODB_ENDPOINT").await)
}

async fn wait_active(k: &aws_sdk_kinesis::Client, stream: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = k
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .unwrap();
        if d.stream_description_summary().unwrap().stream_status() == &StreamStatus::Active {
            return;
        }
        assert!(Instant::now() < deadline, "stream never became ACTIVE");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Open shards: (id, starting hash key).
async fn open_shards(k: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, u128)> {
    let listed = k.list_shards().stream_name(stream).send().await.unwrap();
    listed
        .shards()
        .iter()
        .filter(|s| {
            s.sequence_number_range()
                .and_then(|r| r.ending_sequence_number())
                .is_none()
        })
        .map(|s| {
            let start = s
                .hash_key_range()
                .unwrap()
                .starting_hash_key()
                .parse()
                .unwrap();
            (s.shard_id().to_string(), start)
        })
        .collect()
}

/// `n` records into each open shard, named `<shard>-<i>`.
async fn put_each(k: &aws_sdk_kinesis::Client, stream: &str, n: usize) {
    for (shard, hash) in open_shards(k, stream).await {
        for i in 0..n {
            k.put_record()
                .stream_name(stream)
                .partition_key("k")
                .explicit_hash_key(hash.to_string())
                .data(aws_sdk_kinesis::primitives::Blob::new(format!(
                    "{shard}-{i:03}"
                )))
                .send()
                .await
                .unwrap();
        }
    }
}

/// Every shard's records as (sequence number, payload), read from TRIM_HORIZON.
async fn read_all(
    k: &aws_sdk_kinesis::Client,
    stream: &str,
) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out = BTreeMap::new();
    let listed = k.list_shards().stream_name(stream).send().await.unwrap();
    for s in listed.shards() {
        let mut it = k
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(s.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator()
            .map(str::to_string);
        let mut records = Vec::new();
        let mut empty = 0;
        while let Some(iter) = it {
            let got = k.get_records().shard_iterator(iter).send().await.unwrap();
            if got.records().is_empty() {
                empty += 1;
                if empty > 3 {
                    break;
                }
            }
            for r in got.records() {
                records.push((
                    r.sequence_number().to_string(),
                    String::from_utf8_lossy(r.data().as_ref()).into_owned(),
                ));
            }
            it = got.next_shard_iterator().map(str::to_string);
        }
        out.insert(s.shard_id().to_string(), records);
    }
    out
}

async fn kcl_table(d: &aws_sdk_dynamodb::Client, table: &str) {
    d.create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("leaseKey")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("leaseKey")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

/// A lease item as the KCL writes it.
async fn kcl_lease(
    d: &aws_sdk_dynamodb::Client,
    table: &str,
    shard: &str,
    checkpoint: &str,
    owner: Option<&str>,
    parents: &[&str],
) {
    let s = |v: &str| AttributeValue::S(v.into());
    let n = |v: u64| AttributeValue::N(v.to_string());
    let mut item = HashMap::from([
        ("leaseKey".to_string(), s(shard)),
        ("checkpoint".to_string(), s(checkpoint)),
        ("checkpointSubSequenceNumber".to_string(), n(0)),
        ("leaseCounter".to_string(), n(40)),
        ("ownerSwitchesSinceCheckpoint".to_string(), n(0)),
    ]);
    if let Some(o) = owner {
        item.insert("leaseOwner".into(), s(o));
    }
    if !parents.is_empty() {
        item.insert(
            "parentShardId".into(),
            AttributeValue::Ss(parents.iter().map(|p| p.to_string()).collect()),
        );
    }
    d.put_item()
        .table_name(table)
        .set_item(Some(item))
        .send()
        .await
        .unwrap();
}

fn flowgate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        .env("FLOWGATE_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn pipeline_file(dir: &Path, stream: &str, store_table: &str, out: &Path) -> std::path::PathBuf {
    let kinesis = endpoint("FLOWGATE_TEST_KINESIS_ENDPOINT");
    let dynamo = endpoint("FLOWGATE_TEST_DYNAMODB_ENDPOINT");
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            r#"
name = "from-kcl"

[source]
type = "kinesis"
stream = "{stream}"
worker_id = "flowgate-1"
lease_ttl = "3s"
shard_refresh = "1s"
idle_backoff = "200ms"
connection = {{ endpoint_url = "{kinesis}", region = "us-east-1", access_key_id = "flowgate", secret_access_key = "flowgate" }}

[sink]
type = "jsonl"
path = "{out}"

[store]
type = "dynamodb"
table = "{store_table}"
endpoint_url = "{dynamo}"
region = "us-east-1"
access_key_id = "flowgate"
secret_access_key = "flowgate"
"#,
            out = out.display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kcl_application_is_continued_exactly_after_its_checkpoints() {
    let k = kinesis().await;
    let d = dynamodb().await;
    let stream = unique("kcl");
    k.create_stream()
        .stream_name(&stream)
        .shard_count(2)
        .send()
        .await
        .unwrap();
    wait_active(&k, &stream).await;
    put_each(&k, &stream, 40).await;
    // Split both shards: 0 → 2, 3 and 1 → 4, 5.
    for (shard, start) in open_shards(&k, &stream).await {
        let next = start + (u128::MAX / 4);
        k.split_shard()
            .stream_name(&stream)
            .shard_to_split(&shard)
            .new_starting_hash_key(next.to_string())
            .send()
            .await
            .unwrap();
        wait_active(&k, &stream).await;
    }
    put_each(&k, &stream, 25).await;
    let shards = read_all(&k, &stream).await;
    let id = |n: u32| format!("shardId-{n:012}");
    assert_eq!(shards.len(), 6, "{:?}", shards.keys());
    let listed = k.list_shards().stream_name(&stream).send().await.unwrap();
    let parents: BTreeMap<String, String> = listed
        .shards()
        .iter()
        .filter_map(|s| Some((s.shard_id().to_string(), s.parent_shard_id()?.to_string())))
        .collect();
    let expected_parents: BTreeMap<String, String> = [
        (id(2), id(0)),
        (id(3), id(0)),
        (id(4), id(1)),
        (id(5), id(1)),
    ]
    .into_iter()
    .collect();
    assert_eq!(parents, expected_parents, "the splits' children");

    // The KCL application: shard 0 done; child 2 checkpointed at its 10th record, child 3 not
    // started; shard 1 at its 20th record (its children have no leases yet).
    let table = unique("kcl-app");
    kcl_table(&d, &table).await;
    kcl_lease(&d, &table, &id(0), "SHARD_END", None, &[]).await;
    let at = |shard: &str, i: usize| shards[shard][i].0.clone();
    kcl_lease(
        &d,
        &table,
        &id(2),
        &at(&id(2), 9),
        Some("kcl-worker-1"),
        &[&id(0)],
    )
    .await;
    kcl_lease(
        &d,
        &table,
        &id(3),
        "TRIM_HORIZON",
        Some("kcl-worker-1"),
        &[&id(0)],
    )
    .await;
    kcl_lease(
        &d,
        &table,
        &id(1),
        &at(&id(1), 19),
        Some("kcl-worker-2"),
        &[],
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let file = pipeline_file(dir.path(), &stream, &unique("fg"), &out);
    let file_arg = file.to_str().unwrap();
    let moto = endpoint("FLOWGATE_TEST_DYNAMODB_ENDPOINT");
    let import = |observe: &str| {
        flowgate(&[
            "checkpoints",
            "import-kcl",
            "-c",
            file_arg,
            "--table",
            &table,
            "--endpoint-url",
            &moto,
            "--observe",
            observe,
        ])
    };

    // A KCL worker still renewing its lease: refused, naming it.
    let renewing = tokio::spawn({
        let (d, table, shard) = (d.clone(), table.clone(), id(1));
        async move {
            loop {
                d.update_item()
                    .table_name(&table)
                    .key("leaseKey", AttributeValue::S(shard.clone()))
                    .update_expression("SET leaseCounter = leaseCounter + :one")
                    .expression_attribute_values(":one", AttributeValue::N("1".into()))
                    .send()
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    // (Blocks one of the test's two runtime threads; the renewals run on the other.)
    let (ok, text) = import("2s");
    renewing.abort();
    assert!(!ok, "imported while a KCL worker renews: {text}");
    assert!(
        text.contains("still renew") && text.contains(&id(1)),
        "{text}"
    );

    let (ok, text) = import("1s");
    assert!(ok, "{text}");
    assert!(
        text.contains("imported 2 checkpoint(s) and 1 finished shard(s)"),
        "{text}"
    );
    // The store's own view.
    let (ok, shown) = flowgate(&["checkpoints", "show", "-c", file_arg]);
    assert!(ok, "{shown}");
    assert!(shown.contains(&id(1)) && shown.contains(&id(2)), "{shown}");
    // A second import would overwrite the pipeline's own progress: refused.
    let (ok, again) = flowgate(&[
        "checkpoints",
        "import-kcl",
        "-c",
        file_arg,
        "--table",
        &table,
        "--endpoint-url",
        &moto,
        "--observe",
        "0s",
    ]);
    assert!(
        !ok && again.contains("already has 2 checkpoint(s)"),
        "{again}"
    );

    // What flowgate must read: the rest of 2 and 1, all of 3, 4 and 5; nothing of 0.
    let mut expected: Vec<String> = Vec::new();
    for (shard, records) in &shards {
        let skip = match shard.as_str() {
            s if s == id(0) => records.len(),
            s if s == id(2) => 10,
            s if s == id(1) => 20,
            _ => 0,
        };
        expected.extend(records[skip..].iter().map(|(_, p)| p.clone()));
    }
    expected.sort();

    let mut run = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["run", "-c", file_arg])
        .env("FLOWGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let read = || -> Vec<(String, String)> {
        if !out.exists() {
            return Vec::new();
        }
        JsonLinesSink::read(&out)
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r.partition.to_string(),
                    String::from_utf8_lossy(&r.payload).into_owned(),
                )
            })
            .collect()
    };
    while read().len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "read {} of {}: {}",
            read().len(),
            expected.len(),
            std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Time for anything extra (a repeat) to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.kill().unwrap();
    run.wait().unwrap();

    let records = read();
    let mut got: Vec<String> = records.iter().map(|(_, p)| p.clone()).collect();
    got.sort();
    assert_eq!(
        got, expected,
        "none repeated, none skipped, nothing of the finished parent"
    );
    // Children after their parents: shard 1's remaining records come before any of 4 and 5.
    let last_parent = records.iter().rposition(|(s, _)| *s == id(1)).unwrap();
    let first_child = records
        .iter()
        .position(|(s, _)| *s == id(4) || *s == id(5))
        .unwrap();
    assert!(
        last_parent < first_child,
        "child read before its parent ended"
    );
    eprintln!(
        "cli/kcl import: {} records read after the KCL checkpoints (shard 0 finished, 2 and 1 continued mid-way, 3/4/5 from the start), none repeated, none skipped; children after parents",
        got.len()
    );
}
