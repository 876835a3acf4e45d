//! Helpers shared by the kinesis-mock test files.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unused_imports)]

use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType, StreamStatus};
use flowgate_kinesis::{KinesisConnection, KinesisSourceConfig};

pub(crate) use flowgate_rig_tests::unique;

pub(crate) mod harness;

pub(crate) fn connection() -> KinesisConnection {
    KinesisConnection {
        endpoint_url: Some(flowgate_rig_tests::endpoint(
            "FLOWGATE_TEST_KINESIS_ENDPOINT",
        )),
        region: Some("us-east-1".into()),
        access_key_id: Some("flowgate".into()),
        secret_access_key: Some("flowgate".into()),
        call_timeout: None,
    }
}

/// A source over `stream` tuned for tests: short leases, quick idle polls.
pub(crate) fn source_config(stream: &str) -> KinesisSourceConfig {
    KinesisSourceConfig {
        stream: stream.into(),
        connection: connection(),
        lease_ttl: Duration::from_secs(3),
        idle_backoff: Duration::from_millis(200),
        shard_refresh: Duration::from_secs(2),
        ..Default::default()
    }
}

pub(crate) async fn client() -> aws_sdk_kinesis::Client {
    let c = connection();
    let config = aws_config::from_env()
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "flowgate", "flowgate", None, None, "test",
        ))
        .endpoint_url(c.endpoint_url.unwrap())
        .load()
        .await;
    aws_sdk_kinesis::Client::new(&config)
}

/// Waits until the stream is ACTIVE (after a create, split or merge).
pub(crate) async fn wait_active(k: &aws_sdk_kinesis::Client, stream: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = k
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .expect("DescribeStreamSummary");
        if d.stream_description_summary().unwrap().stream_status() == &StreamStatus::Active {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stream {stream} never became ACTIVE"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn create_stream(stream: &str, shards: i32) -> aws_sdk_kinesis::Client {
    let k = client().await;
    k.create_stream()
        .stream_name(stream)
        .shard_count(shards)
        .send()
        .await
        .expect("CreateStream");
    wait_active(&k, stream).await;
    k
}

/// Open shards with the first hash key of each, in hash order.
pub(crate) async fn open_shards(
    k: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Vec<(String, String)> {
    let out = k
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("ListShards");
    let mut shards: Vec<(String, String)> = out
        .shards()
        .iter()
        .filter(|s| {
            s.sequence_number_range()
                .is_some_and(|r| r.ending_sequence_number().is_none())
        })
        .map(|s| {
            (
                s.shard_id().to_string(),
                s.hash_key_range().unwrap().starting_hash_key().to_string(),
            )
        })
        .collect();
    shards.sort_by(|a, b| {
        let (x, y): (u128, u128) = (a.1.parse().unwrap(), b.1.parse().unwrap());
        x.cmp(&y)
    });
    shards
}

/// Puts `payloads` to the shard whose range starts at `hash_key`, in order, 500 per call;
/// retries entries that failed.
pub(crate) async fn put_to(
    k: &aws_sdk_kinesis::Client,
    stream: &str,
    hash_key: &str,
    payloads: &[String],
) {
    for chunk in payloads.chunks(500) {
        let mut pending: Vec<&String> = chunk.iter().collect();
        while !pending.is_empty() {
            let entries = pending
                .iter()
                .map(|p| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(p.as_bytes().to_vec()))
                        .partition_key("k")
                        .explicit_hash_key(hash_key)
                        .build()
                        .unwrap()
                })
                .collect();
            let out = k
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await
                .expect("PutRecords");
            pending = pending
                .into_iter()
                .zip(out.records())
                .filter(|(_, r)| r.error_code().is_some())
                .map(|(p, _)| p)
                .collect();
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Every record of every shard (closed ones included), from the oldest.
pub(crate) async fn read_all(k: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, String)> {
    let shards = k
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("ListShards");
    let mut out = Vec::new();
    for s in shards.shards() {
        out.extend(read_shard(k, stream, s.shard_id(), None).await);
    }
    out
}

/// `(partition key, payload)` of every record of one shard after the sequence number `after`
/// (from the oldest without one), by `GetRecords` until a call returns none.
pub(crate) async fn read_shard(
    k: &aws_sdk_kinesis::Client,
    stream: &str,
    shard: &str,
    after: Option<&str>,
) -> Vec<(String, String)> {
    let request = k.get_shard_iterator().stream_name(stream).shard_id(shard);
    let request = match after {
        Some(seq) => request
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(seq),
        None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
    };
    let mut it = request
        .send()
        .await
        .expect("GetShardIterator")
        .shard_iterator
        .unwrap();
    let mut out = Vec::new();
    loop {
        let r = k
            .get_records()
            .shard_iterator(&it)
            .limit(10_000)
            .send()
            .await
            .expect("GetRecords");
        for rec in r.records() {
            out.push((
                rec.partition_key().to_string(),
                String::from_utf8_lossy(rec.data().as_ref()).into_owned(),
            ));
        }
        match r.next_shard_iterator() {
            Some(next) if !r.records().is_empty() => it = next.to_string(),
            _ => break,
        }
    }
    out
}

/// Puts `payloads`, each with its own partition key (so they spread over the open shards),
/// retrying failed entries and failed calls (a stream being resharded may refuse a call).
pub(crate) async fn put_keyed(k: &aws_sdk_kinesis::Client, stream: &str, payloads: &[String]) {
    let mut pending: Vec<&String> = payloads.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "PutRecords kept failing");
        let entries = pending
            .iter()
            .map(|p| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(p.as_bytes().to_vec()))
                    .partition_key(p.as_str())
                    .build()
                    .unwrap()
            })
            .collect();
        match k
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
        {
            Ok(out) => {
                pending = pending
                    .into_iter()
                    .zip(out.records())
                    .filter(|(_, r)| r.error_code().is_some())
                    .map(|(p, _)| p)
                    .collect();
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
