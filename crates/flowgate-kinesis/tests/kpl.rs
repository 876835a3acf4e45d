//! KPL-aggregated records against kinesis-mock: read as their user records, each with its own
//! position; a checkpoint inside an aggregate resumes at the next user record (none repeated,
//! none skipped); dedup by source position recognises every user record on a replay.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_kinesis::primitives::Blob;
use flowgate_checkpoint::MemoryStore;
use flowgate_core::testkit::source::Driver;
use flowgate_core::{PartitionId, Position, Record};
use flowgate_kinesis::{KinesisSource, kpl};
use flowgate_runtime::adapters::MemorySink;
use flowgate_runtime::{KeyExtractor, Pipeline, RuntimeSettings, Shutdown};

mod common;
use common::{create_stream, source_config, unique};

/// Puts, in order: a plain record, an aggregate of 5, a plain record, an aggregate of 3.
/// Returns the user payloads in stream order.
async fn fill(stream: &str) -> Vec<String> {
    let k = create_stream(stream, 1).await;
    let mut expected = Vec::new();
    let put = |data: bytes::Bytes, key: &str| {
        let k = k.clone();
        let (stream, key) = (stream.to_string(), key.to_string());
        async move {
            k.put_record()
                .stream_name(stream)
                .partition_key(key)
                .data(Blob::new(data.to_vec()))
                .send()
                .await
                .expect("PutRecord");
        }
    };
    put(bytes::Bytes::from_static(b"plain-0"), "p").await;
    expected.push("plain-0".to_string());
    let users: Vec<(String, String)> = (0..5)
        .map(|i| (format!("k{i}"), format!("agg1-{i}")))
        .collect();
    let refs: Vec<(&str, &[u8])> = users
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .collect();
    put(kpl::aggregate(&refs), "outer").await;
    expected.extend(users.iter().map(|(_, v)| v.clone()));
    put(bytes::Bytes::from_static(b"plain-1"), "p").await;
    expected.push("plain-1".to_string());
    let users: Vec<(String, String)> = (0..3)
        .map(|i| (format!("j{i}"), format!("agg2-{i}")))
        .collect();
    let refs: Vec<(&str, &[u8])> = users
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .collect();
    put(kpl::aggregate(&refs), "outer").await;
    expected.extend(users.iter().map(|(_, v)| v.clone()));
    expected
}

/// Reads `want` records of the stream's single shard, resuming after `after` if given.
async fn read(stream: &str, after: Option<Position>, want: usize) -> Vec<Record> {
    let k = common::client().await;
    let (shard, _) = common::open_shards(&k, stream).await.remove(0);
    let shard = PartitionId::new(shard);
    let source = KinesisSource::new(source_config(stream), Arc::new(MemoryStore::new())).unwrap();
    let mut d = Driver::open(source, 100).await;
    if let Some(a) = after {
        d.starts.insert(shard.clone(), a);
    }
    let got = d.read_until(std::slice::from_ref(&shard), want).await;
    // Nothing more arrives: what was read is all there is after `after`.
    let extra = d
        .poll(std::time::Duration::from_secs(2))
        .await
        .unwrap_or_default();
    d.close().await;
    let mut records = got.into_values().next().unwrap_or_default();
    records.extend(extra);
    records
}

fn payloads(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_records_are_read_as_user_records_with_positions_of_their_own() {
    let stream = unique("kpl");
    let expected = fill(&stream).await;
    let records = read(&stream, None, expected.len()).await;
    assert_eq!(payloads(&records), expected);
    for w in records.windows(2) {
        assert!(w[0].position < w[1].position, "positions increase: {:?}", w);
    }
    // User keys come from the aggregate's key table.
    assert_eq!(records[1].key.as_deref(), Some(&b"k0"[..]));
    assert_eq!(records[3].key.as_deref(), Some(&b"k2"[..]));
    // A plain record is sub-record 0 of its sequence number.
    assert_eq!(kpl::sequence_of(&records[0].position).unwrap().1, 0);
    assert_eq!(kpl::sequence_of(&records[3].position).unwrap().1, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_inside_an_aggregate_resumes_at_the_next_user_record() {
    let stream = unique("kpl-resume");
    let expected = fill(&stream).await;
    let all = read(&stream, None, expected.len()).await;
    // After each user record in turn — inside both aggregates, at their ends, on plain ones.
    for cut in 0..all.len() - 1 {
        let rest = read(
            &stream,
            Some(all[cut].position.clone()),
            expected.len() - cut - 1,
        )
        .await;
        assert_eq!(
            payloads(&rest),
            expected[cut + 1..].to_vec(),
            "after {} ({})",
            expected[cut],
            all[cut].position
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_by_position_recognises_each_user_record_on_a_replay() {
    let stream = unique("kpl-dedup");
    let expected = fill(&stream).await;
    let dedup = Arc::new(MemoryStore::new());
    let mut per_run = Vec::new();
    for run in 0..2 {
        // No checkpoint store: the second run reads the stream from its start again.
        let sink = MemorySink::new();
        let (trigger, shutdown) = Shutdown::manual();
        let pipeline = Pipeline::builder("kpl-dedup")
            .source(
                KinesisSource::new(source_config(&stream), Arc::new(MemoryStore::new())).unwrap(),
            )
            .sink(sink.clone())
            .dedup(dedup.clone(), KeyExtractor::SourcePosition)
            .settings(RuntimeSettings::default())
            .build()
            .unwrap();
        let stats = pipeline.stats();
        let handle = tokio::spawn(pipeline.run(shutdown));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while stats.snapshot().records_in < expected.len() as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "run {run}: {:?}",
                stats.snapshot()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        trigger.trigger();
        let summary = handle.await.unwrap().unwrap();
        per_run.push((payloads(&sink.records()), summary.stats.dedup_hits));
    }
    let by_run: BTreeMap<usize, _> = per_run.into_iter().enumerate().collect();
    assert_eq!(by_run[&0].0, expected, "first run: every user record once");
    assert_eq!(by_run[&0].1, 0);
    assert!(
        by_run[&1].0.is_empty(),
        "replay: nothing written again: {:?}",
        by_run[&1].0
    );
    assert_eq!(
        by_run[&1].1,
        expected.len() as u64,
        "replay: every user record a dedup hit"
    );
}
