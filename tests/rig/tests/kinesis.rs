//! Kinesis (kinesis-mock): create a 2-shard stream, PutRecords, read every record back from
//! both shards.
#![cfg(feature = "brokers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType, StreamStatus};
use flowgate_rig_tests::{endpoint, unique};

const RECORDS: usize = 2_000;

async fn client() -> aws_sdk_kinesis::Client {
    let endpoint = endpoint("FLOWGATE_TEST_KINESIS_ENDPOINT");
    let config = aws_config::from_env()
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "flowgate", "flowgate", None, None, "rig",
        ))
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_kinesis::Client::new(&config)
}

#[tokio::test]
async fn put_records_and_read_them_back_from_both_shards() {
    let kinesis = client().await;
    let stream = unique("rig-kinesis");
    kinesis
        .create_stream()
        .stream_name(&stream)
        .shard_count(2)
        .send()
        .await
        .expect("CreateStream");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = kinesis
            .describe_stream_summary()
            .stream_name(&stream)
            .send()
            .await
            .expect("DescribeStreamSummary");
        if d.stream_description_summary().map(|s| s.stream_status()) == Some(&StreamStatus::Active)
        {
            break;
        }
        assert!(Instant::now() < deadline, "stream not ACTIVE within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut sent = HashSet::new();
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(500) {
        let entries: Vec<PutRecordsRequestEntry> = chunk
            .iter()
            .map(|i| {
                sent.insert(format!("record-{i}"));
                PutRecordsRequestEntry::builder()
                    .partition_key(format!("key-{i}"))
                    .data(Blob::new(format!("record-{i}")))
                    .build()
                    .unwrap()
            })
            .collect();
        let out = kinesis
            .put_records()
            .stream_name(&stream)
            .set_records(Some(entries))
            .send()
            .await
            .expect("PutRecords");
        assert_eq!(out.failed_record_count(), Some(0), "no entry may fail");
    }

    let shards = kinesis
        .list_shards()
        .stream_name(&stream)
        .send()
        .await
        .expect("ListShards");
    let shards = shards.shards();
    assert_eq!(shards.len(), 2);
    let mut received = HashSet::new();
    let mut per_shard = Vec::new();
    for shard in shards {
        let mut iterator = kinesis
            .get_shard_iterator()
            .stream_name(&stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("GetShardIterator")
            .shard_iterator
            .expect("iterator");
        let mut n = 0;
        loop {
            let out = kinesis
                .get_records()
                .shard_iterator(&iterator)
                .limit(1000)
                .send()
                .await
                .expect("GetRecords");
            for r in out.records() {
                received.insert(String::from_utf8(r.data().as_ref().to_vec()).unwrap());
                n += 1;
            }
            if out.records().is_empty() && out.millis_behind_latest() == Some(0) {
                break;
            }
            match out.next_shard_iterator {
                Some(next) => iterator = next,
                None => break,
            }
        }
        per_shard.push(n);
    }
    assert_eq!(received, sent, "every record read back");
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "both shards hold records: {per_shard:?}"
    );
    kinesis
        .delete_stream()
        .stream_name(&stream)
        .send()
        .await
        .expect("DeleteStream");
}
