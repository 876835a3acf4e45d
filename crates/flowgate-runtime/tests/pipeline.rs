//! Runtime behaviour: backpressure, overflow policies, dead letters, retries, throttling,
//! shutdown, health, ordering and revocation.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::{
    Assignment, Checkpoint, CheckpointStore, Credits, Error, ErrorKind, PartitionId, Position,
    Record, Revocation, RevocationWaiter, Source, SourceCapabilities, SourceContext, SourceEvent,
    StartPosition, headers,
};
use flowgate_runtime::adapters::{
    FaultConfig, FaultInjectingSink, GeneratorConfig, GeneratorSource, MemorySink, MemorySource,
    NullSink,
};
use flowgate_runtime::{
    BatchSettings, CommitSettings, ConcurrencySettings, Health, KeyExtractor, OverflowPolicy,
    Pipeline, RuntimeSettings, Shutdown, SinkOrdering,
};

mod common;
use common::MemoryStore;

fn generator(partitions: u32, per_partition: u64, rate: Option<f64>) -> GeneratorSource {
    GeneratorSource::new(GeneratorConfig {
        partitions,
        records_per_partition: Some(per_partition),
        rate,
        ..Default::default()
    })
    .expect("valid generator")
}

fn by_partition(records: &[Record]) -> BTreeMap<PartitionId, Vec<u64>> {
    let mut m: BTreeMap<PartitionId, Vec<u64>> = BTreeMap::new();
    for r in records {
        m.entry(r.partition.clone())
            .or_default()
            .push(r.position.as_u64().expect("u64"));
    }
    m
}

/// A slow sink never gets more than the credit in flight and memory stays under the byte
/// budget while the generator runs 10× faster; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_is_bounded_by_credit_and_byte_budget() {
    let limit = 200;
    let budget = 64 * 1024;
    let sink = MemorySink::new();
    // Sink: 2,000 records/s whatever the concurrency; generator: 20,000 records/s.
    let slow = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            capacity_per_sec: Some(2_000.0),
            ..Default::default()
        },
    );
    let settings = RuntimeSettings {
        max_in_flight_per_partition: limit,
        max_buffer_bytes: budget,
        batch: BatchSettings {
            max_records: 50,
            ..Default::default()
        },
        ..Default::default()
    };
    let per_partition = 1_500;
    let pipeline = Pipeline::builder("slow")
        .source(generator(2, per_partition, Some(20_000.0)))
        .sink(slow)
        .settings(settings)
        .build()
        .unwrap();
    let stats = pipeline.stats();
    let summary = pipeline.run(Shutdown::never()).await.unwrap();
    let s = stats.snapshot();
    assert_eq!(s.records_out, 2 * per_partition, "no record lost");
    assert!(
        s.peak_partition_in_flight <= limit as u64,
        "credit exceeded: {} > {limit}",
        s.peak_partition_in_flight
    );
    let record_size = Record::new(PartitionId::new("gen-0"), Position::ZERO, vec![0u8; 100])
        .with_key("key-000000")
        .byte_size() as u64;
    assert!(
        s.peak_buffer_bytes <= budget as u64 + 1024 * record_size,
        "byte budget exceeded by more than one source batch: {} > {budget}",
        s.peak_buffer_bytes
    );
    assert!(s.lag > 0 || summary.stats.records_in > 0);
    let got = by_partition(&sink.records());
    for (p, positions) in got {
        assert_eq!(
            positions,
            (0..per_partition).collect::<Vec<_>>(),
            "partition {p} in order, complete"
        );
    }
}

async fn run_with_policy(
    policy: OverflowPolicy,
) -> (Result<flowgate_runtime::RunSummary, Error>, MemorySink) {
    let sink = MemorySink::new();
    let slow = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            capacity_per_sec: Some(5_000.0),
            ..Default::default()
        },
    );
    let settings = RuntimeSettings {
        max_in_flight_per_partition: 100,
        overflow: policy,
        batch: BatchSettings {
            max_records: 20,
            ..Default::default()
        },
        ..Default::default()
    };
    let res = Pipeline::builder(format!("overflow-{policy:?}"))
        .source(generator(2, 2_000, None))
        .sink(slow)
        .settings(settings)
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await;
    (res, sink)
}

/// Each shedding policy counts exactly what it sheds: written + shed = generated, and the
/// checkpoint still reaches the end (shed records are acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_policies_count_exactly_what_they_shed() {
    for policy in [OverflowPolicy::ShedNewest, OverflowPolicy::ShedOldest] {
        let (res, sink) = run_with_policy(policy).await;
        let summary = res.unwrap();
        let written = sink.len() as u64;
        assert!(
            summary.stats.shed > 0,
            "{policy:?}: the sink is slower than the source, something must be shed"
        );
        assert_eq!(summary.stats.records_out, written);
        assert_eq!(
            written + summary.stats.shed,
            4_000,
            "{policy:?}: written + shed = generated"
        );
        for c in &summary.checkpoints {
            assert_eq!(
                c.position,
                Position::from(1_999),
                "{policy:?}: shed records are acknowledged"
            );
        }
        // Positions written are unique and ordered per partition.
        for (p, pos) in by_partition(&sink.records()) {
            assert!(
                pos.windows(2).all(|w| w[0] < w[1]),
                "{policy:?} {p}: order kept"
            );
        }
        if policy == OverflowPolicy::ShedNewest {
            // Newest are dropped: the first records of each partition were written.
            for (_, pos) in by_partition(&sink.records()) {
                assert_eq!(pos[0], 0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fast_stops_with_a_clear_error() {
    let (res, _) = run_with_policy(OverflowPolicy::FailFast).await;
    let err = res.expect_err("fail_fast must stop the pipeline");
    assert_eq!(err.kind(), ErrorKind::Fatal);
    assert!(err.to_string().contains("overflow"), "{err}");
}

fn records_with_poison(partitions: usize, per_partition: u64, poison_at: u64) -> Vec<Record> {
    let mut v = Vec::new();
    for p in 0..partitions {
        for i in 0..per_partition {
            let payload = if i == poison_at && p == 0 {
                "POISON: not json".to_string()
            } else {
                format!("{{\"n\":{i}}}")
            };
            v.push(Record::new(
                PartitionId::new(format!("q-{p}")),
                Position::from(i),
                payload,
            ));
        }
    }
    v
}

/// A poison record goes to the dead-letter sink with the error attached and the partition
/// keeps flowing; its position is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_is_dead_lettered_and_the_partition_keeps_flowing() {
    let sink = MemorySink::new();
    let dlq = MemorySink::new();
    let store = Arc::new(MemoryStore::new());
    let faulty = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            poison_prefix: Some("POISON".into()),
            ..Default::default()
        },
    );
    let summary = Pipeline::builder("poison")
        .source(MemorySource::new(records_with_poison(2, 1_000, 500)))
        .sink(faulty)
        .dead_letter(dlq.clone())
        .checkpoint_store(store.clone())
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(sink.len(), 1_999);
    assert_eq!(summary.stats.dead_lettered, 1);
    let letters = dlq.records();
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(l.position, Position::from(500));
    assert_eq!(
        l.headers.get(headers::ERROR_KIND).map(|b| &b[..]),
        Some(&b"poison"[..])
    );
    assert!(
        String::from_utf8_lossy(l.headers.get(headers::ERROR).unwrap()).contains("injected poison")
    );
    assert_eq!(
        l.headers.get(headers::SOURCE_PARTITION).map(|b| &b[..]),
        Some(&b"q-0"[..])
    );
    let cps = store.load("poison").await.unwrap();
    assert!(
        cps.iter().all(|c| c.position == Position::from(999)),
        "{cps:?}"
    );
}

/// Without a dead-letter destination a poison record stops the pipeline with an error that
/// says how to fix it, and its position is not committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_without_dead_letter_destination_is_a_clear_error() {
    let store = Arc::new(MemoryStore::new());
    let faulty = FaultInjectingSink::new(
        MemorySink::new(),
        FaultConfig {
            poison_prefix: Some("POISON".into()),
            ..Default::default()
        },
    );
    let err = Pipeline::builder("poison-nodlq")
        .source(MemorySource::new(records_with_poison(1, 1_000, 500)))
        .sink(faulty)
        .checkpoint_store(store.clone())
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .expect_err("must stop");
    assert!(err.to_string().contains("dead-letter"), "{err}");
    let cps = store.load("poison-nodlq").await.unwrap();
    assert!(
        cps.iter().all(|c| c.position < Position::from(500)),
        "poison position never committed: {cps:?}"
    );
}

/// Transient failures are retried (counted, bounded) and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried() {
    let sink = MemorySink::new();
    let faulty = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            transient_failure_rate: 0.3,
            seed: 7,
            ..Default::default()
        },
    );
    let mut settings = RuntimeSettings::default();
    settings.retry.initial_backoff = Duration::from_millis(1);
    settings.retry.max_backoff = Duration::from_millis(20);
    let summary = Pipeline::builder("transient")
        .source(generator(2, 3_000, None))
        .sink(faulty)
        .settings(settings)
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .unwrap();
    assert!(summary.stats.retries > 0);
    assert_eq!(sink.len(), 6_000);
    for (_, pos) in by_partition(&sink.records()) {
        assert_eq!(pos, (0..3_000).collect::<Vec<_>>());
    }
}

/// Retries are bounded: a sink that always fails transiently stops the pipeline after the
/// budget, naming the cause, with nothing committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_is_bounded() {
    let faulty = FaultInjectingSink::new(
        MemorySink::new(),
        FaultConfig {
            transient_failure_rate: 1.0,
            ..Default::default()
        },
    );
    let mut settings = RuntimeSettings::default();
    settings.retry.initial_backoff = Duration::from_millis(1);
    settings.retry.max_backoff = Duration::from_millis(5);
    settings.retry.max_attempts = 5;
    let store = Arc::new(MemoryStore::new());
    let pipeline = Pipeline::builder("always-fails")
        .source(generator(1, 100, None))
        .sink(faulty)
        .checkpoint_store(store.clone())
        .settings(settings)
        .build()
        .unwrap();
    let stats = pipeline.stats();
    let err = pipeline
        .run(Shutdown::never())
        .await
        .expect_err("must give up");
    assert!(
        err.to_string().contains("injected transient failure"),
        "{err}"
    );
    assert!(
        err.to_string().contains("gave_up_after=5 attempts"),
        "{err}"
    );
    assert_eq!(stats.snapshot().retries, 4, "5 attempts = 4 retries");
    assert!(store.load("always-fails").await.unwrap().is_empty());
}

/// Throttling is visible, lowers concurrency and does not busy-loop; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_lowers_concurrency_and_is_counted() {
    let sink = MemorySink::new();
    let faulty = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            throttle_above_per_sec: Some(4_000.0),
            latency: Duration::from_millis(2),
            ..Default::default()
        },
    );
    let settings = RuntimeSettings {
        concurrency: ConcurrencySettings {
            initial: 16,
            max: 32,
            ..Default::default()
        },
        batch: BatchSettings {
            max_records: 100,
            ..Default::default()
        },
        ..Default::default()
    };
    let pipeline = Pipeline::builder("throttled")
        .source(generator(4, 2_000, None))
        .sink(faulty)
        .settings(settings)
        .build()
        .unwrap();
    let stats = pipeline.stats();
    let started = Instant::now();
    let summary = pipeline.run(Shutdown::never()).await.unwrap();
    let s = summary.stats;
    assert_eq!(sink.len(), 8_000);
    assert!(s.throttles > 0, "throttles must be counted");
    assert!(
        stats.snapshot().concurrency < 16,
        "concurrency must drop under throttling: {}",
        s.concurrency
    );
    // No busy loop: retries are paced by the broker's retry-after, so their number stays
    // within a small multiple of the throttle-limited run time in batches.
    let secs = started.elapsed().as_secs_f64();
    assert!(
        (s.retries as f64) < secs * 200.0,
        "{} retries in {secs:.1}s looks like a busy loop",
        s.retries
    );
}

/// The stored checkpoint of each partition is the last record the sink received.
async fn assert_final_checkpoints(store: &MemoryStore, pipeline: &str, sink: &MemorySink) {
    let stored: HashMap<PartitionId, Position> = store
        .load(pipeline)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.partition, c.position))
        .collect();
    for (p, pos) in by_partition(&sink.records()) {
        assert_eq!(
            stored.get(&p),
            Some(&Position::from(*pos.last().unwrap())),
            "{p}: final checkpoint = last written"
        );
    }
}

/// Shutdown drains in-flight records and writes the final checkpoint: the checkpoint of each
/// partition is exactly the last record the sink received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_commits() {
    let sink = MemorySink::new();
    let slowish = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            latency: Duration::from_millis(5),
            ..Default::default()
        },
    );
    let store = Arc::new(MemoryStore::new());
    let (trigger, shutdown) = Shutdown::manual();
    let pipeline = Pipeline::builder("drain")
        .source(
            GeneratorSource::new(GeneratorConfig {
                partitions: 3,
                rate: Some(30_000.0),
                ..Default::default()
            })
            .unwrap(),
        )
        .sink(slowish)
        .checkpoint_store(store.clone())
        .build()
        .unwrap();
    let handle = tokio::spawn(pipeline.run(shutdown));
    tokio::time::sleep(Duration::from_millis(800)).await;
    trigger.trigger();
    let summary = handle.await.unwrap().unwrap();
    assert!(summary.drained);
    assert!(sink.len() > 1_000);
    assert_final_checkpoints(&store, "drain", &sink).await;
    assert_eq!(summary.stats.in_flight, 0);
}

/// Health flips to unhealthy when the sink stalls (lag grows, nothing acknowledged) and back
/// when it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflects_progress() {
    let sink = MemorySink::new();
    let stalling = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            stall_after: Some(Duration::from_millis(300)),
            stall_for: Duration::from_secs(3),
            ..Default::default()
        },
    );
    let mut settings = RuntimeSettings::default();
    settings.health.stall_window = Duration::from_millis(800);
    let pipeline = Pipeline::builder("health")
        .source(
            GeneratorSource::new(GeneratorConfig {
                partitions: 2,
                rate: Some(2_000.0),
                ..Default::default()
            })
            .unwrap(),
        )
        .sink(stalling)
        .settings(settings)
        .build()
        .unwrap();
    let stats = pipeline.stats();
    let (trigger, shutdown) = Shutdown::manual();
    let handle = tokio::spawn(pipeline.run(shutdown));
    let mut seen = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        let h = stats.health();
        if seen.last() != Some(&h) {
            seen.push(h);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trigger.trigger();
    handle.await.unwrap().unwrap();
    assert_eq!(stats.health(), Health::Stopped);
    let i = seen
        .iter()
        .position(|h| *h == Health::Unhealthy)
        .unwrap_or_else(|| panic!("never unhealthy: {seen:?}"));
    assert!(seen[..i].contains(&Health::Healthy), "{seen:?}");
    assert!(
        seen[i..].contains(&Health::Healthy),
        "healthy again after the stall: {seen:?}"
    );
}

/// With unordered processing and random sink latency, acks arrive out of order; the final
/// checkpoint is still exactly the end, and every record arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_processing_keeps_the_watermark_contiguous() {
    struct Jitter(MemorySink);
    #[async_trait]
    impl flowgate_core::Sink for Jitter {
        fn capabilities(&self) -> flowgate_core::SinkCapabilities {
            flowgate_core::SinkCapabilities::basic()
        }
        async fn write(&self, batch: &[Record]) -> Result<(), flowgate_core::WriteError> {
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..3_000))).await;
            self.0.write(batch).await
        }
    }
    let sink = MemorySink::new();
    let store = Arc::new(MemoryStore::new());
    let settings = RuntimeSettings {
        ordering: SinkOrdering::Unordered,
        batch: BatchSettings {
            max_records: 10,
            ..Default::default()
        },
        concurrency: ConcurrencySettings {
            initial: 16,
            ..Default::default()
        },
        ..Default::default()
    };
    let summary = Pipeline::builder("unordered")
        .source(generator(2, 2_000, None))
        .sink(Jitter(sink.clone()))
        .checkpoint_store(store.clone())
        .settings(settings)
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .unwrap();
    assert!(
        summary.stats.peak_batches_in_flight > 2,
        "batches of one partition ran concurrently"
    );
    let mut all = by_partition(&sink.records());
    let mut reordered = false;
    for pos in all.values_mut() {
        reordered |= pos.windows(2).any(|w| w[0] > w[1]);
        pos.sort();
        assert_eq!(*pos, (0..2_000).collect::<Vec<_>>());
    }
    assert!(
        reordered,
        "the test should actually exercise out-of-order acks"
    );
    assert!(
        store
            .load("unordered")
            .await
            .unwrap()
            .iter()
            .all(|c| c.position == Position::from(1_999))
    );
}

/// Key ordering: records of one key stay in order while keys of one partition run in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ordering_keeps_each_key_in_order() {
    let sink = MemorySink::new();
    let jitter = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            latency: Duration::from_millis(1),
            ..Default::default()
        },
    );
    let settings = RuntimeSettings {
        ordering: SinkOrdering::Key,
        key_lanes: 8,
        batch: BatchSettings {
            max_records: 16,
            ..Default::default()
        },
        concurrency: ConcurrencySettings {
            initial: 16,
            ..Default::default()
        },
        ..Default::default()
    };
    Pipeline::builder("keyed")
        .source(
            GeneratorSource::new(GeneratorConfig {
                partitions: 1,
                records_per_partition: Some(3_000),
                key_cardinality: 50,
                ..Default::default()
            })
            .unwrap(),
        )
        .sink(jitter)
        .settings(settings)
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .unwrap();
    let mut per_key: HashMap<Bytes, Vec<u64>> = HashMap::new();
    for r in sink.records() {
        per_key
            .entry(r.key.clone().unwrap())
            .or_default()
            .push(r.position.as_u64().unwrap());
    }
    assert_eq!(per_key.values().map(Vec::len).sum::<usize>(), 3_000);
    for (k, pos) in per_key {
        assert!(
            pos.windows(2).all(|w| w[0] < w[1]),
            "key {k:?} out of order"
        );
    }
}

/// A source that assigns two partitions, delivers, then revokes one and waits for the runtime
/// to hand back the final checkpoint of the revoked partition.
struct RevokingSource {
    inner: MemorySource,
    delivered: usize,
    revoke_after: usize,
    waiter: Option<tokio::sync::oneshot::Sender<RevocationWaiter>>,
    revoked: bool,
    r0_delivered: usize,
}

#[async_trait]
impl Source for RevokingSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::replayable_ordered().with_dynamic_assignment(true)
    }
    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        self.inner.open(ctx).await
    }
    async fn next(&mut self) -> Result<SourceEvent, Error> {
        if !self.revoked && self.delivered >= self.revoke_after {
            self.revoked = true;
            let (rev, waiter) = Revocation::new(vec![PartitionId::new("r-1")], false);
            if let Some(tx) = self.waiter.take() {
                let _ = tx.send(waiter);
            }
            return Ok(SourceEvent::Revoked(rev));
        }
        if self.r0_delivered >= 2_000 {
            // The memory source would wait forever for credit on the revoked partition.
            return Ok(SourceEvent::End);
        }
        let ev = self.inner.next().await?;
        if let SourceEvent::Records(rs) = &ev {
            self.delivered += rs.len();
            self.r0_delivered += rs.iter().filter(|r| r.partition.as_str() == "r-0").count();
            if self.revoked {
                // The revoked partition's records must no longer be delivered by a real source.
                let kept: Vec<Record> = rs
                    .iter()
                    .filter(|r| r.partition.as_str() != "r-1")
                    .cloned()
                    .collect();
                return Ok(SourceEvent::Records(kept));
            }
        }
        Ok(ev)
    }
    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        self.inner.start(starts).await
    }
    async fn commit(&mut self, cps: &[Checkpoint]) -> Result<(), Error> {
        self.inner.commit(cps).await
    }
    async fn close(&mut self) -> Result<(), Error> {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_drains_in_flight_and_returns_the_final_checkpoint() {
    revocation_case(Arc::new(MemoryStore::new()), false).await;
}

/// With dedup marks that take 50 ms, a revocation also waits for the marks of the batches the
/// sink already confirmed: the final checkpoint covers every record written (the next owner
/// reads the last mark when it is assigned, so no mark may land after the release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_waits_for_the_dedup_marks_of_confirmed_batches() {
    let store = MemoryStore::with_mark_delay(Duration::from_millis(50)).positional(true);
    revocation_case(Arc::new(store), true).await;
}

async fn revocation_case(store: Arc<MemoryStore>, dedup: bool) {
    let records: Vec<Record> = (0..2)
        .flat_map(|p| {
            (0..2_000u64).map(move |i| {
                Record::new(PartitionId::new(format!("r-{p}")), Position::from(i), "x")
            })
        })
        .collect();
    let sink = MemorySink::new();
    let slow = FaultInjectingSink::new(
        sink.clone(),
        FaultConfig {
            latency: Duration::from_millis(3),
            ..Default::default()
        },
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    let source = RevokingSource {
        inner: MemorySource::new(records),
        delivered: 0,
        revoke_after: 600,
        waiter: Some(tx),
        revoked: false,
        r0_delivered: 0,
    };
    let commits = source.inner.commits();
    let mut builder = Pipeline::builder("revoke")
        .source(source)
        .sink(slow)
        .checkpoint_store(store.clone())
        .settings(RuntimeSettings {
            batch: BatchSettings {
                max_records: 50,
                ..Default::default()
            },
            ..Default::default()
        });
    if dedup {
        builder = builder.dedup(store.clone(), KeyExtractor::SourcePosition);
    }
    let pipeline = builder.build().unwrap();
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run(Shutdown::never()));
    let waiter = rx.await.unwrap();
    let finals = waiter.wait(Duration::from_secs(10)).await;
    let summary = run.await.unwrap().unwrap();
    assert_eq!(
        finals.len(),
        1,
        "the revoked partition's final checkpoint is handed back"
    );
    let fin = &finals[0];
    assert_eq!(fin.partition.as_str(), "r-1");
    // Everything written for r-1 is covered by the final checkpoint, nothing beyond it.
    let written_r1: Vec<u64> = by_partition(&sink.records())
        .remove(&PartitionId::new("r-1"))
        .unwrap_or_default();
    assert_eq!(
        Position::from(*written_r1.last().unwrap()),
        fin.position,
        "final checkpoint = last record written"
    );
    let stored = store.load("revoke").await.unwrap();
    let r1 = stored
        .iter()
        .find(|c| c.partition.as_str() == "r-1")
        .unwrap();
    assert_eq!(
        r1.position, fin.position,
        "written to the store before release"
    );
    // No broker commit for r-1 after the revocation (the source commits it itself).
    let after: Vec<Checkpoint> = commits
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.partition.as_str() == "r-1" && c.position > fin.position)
        .cloned()
        .collect();
    assert!(after.is_empty(), "{after:?}");
    assert_eq!(stats.snapshot().rebalances, 2);
    assert!(
        summary
            .checkpoints
            .iter()
            .any(|c| c.partition.as_str() == "r-0" && c.position == Position::from(1_999))
    );
}

/// A partition handed out with an epoch below the stored checkpoint's fence (a Kafka group
/// deleted and created anew restarts its generations) takes the stored fence: its checkpoints
/// are written, not refused forever. Above it, the new epoch fences the old owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_below_the_stored_fence_takes_the_stored_fence() {
    for (assigned, stored_fence, expected) in [(3, 50, 50), (60, 50, 60)] {
        let store = Arc::new(MemoryStore::new());
        let p = PartitionId::new("f-0");
        store
            .commit(
                "fenced",
                &[Checkpoint::new(p.clone(), Position::from(9)).with_fence(Some(stored_fence))],
            )
            .await
            .unwrap();
        let records = (0..20u64).map(|i| Record::new(p.clone(), Position::from(i), "x"));
        let sink = MemorySink::new();
        let summary = Pipeline::builder("fenced")
            .source(MemorySource::new(records).with_fence(assigned))
            .sink(sink.clone())
            .checkpoint_store(store.clone())
            .build()
            .unwrap()
            .run(Shutdown::never())
            .await
            .unwrap();
        assert_eq!(sink.records().len(), 10, "resumed after the checkpoint");
        let stored = store.load("fenced").await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].position, Position::from(19), "{summary:?}");
        assert_eq!(stored[0].fence, Some(expected));
    }
}

/// The runtime refuses a source that delivers without credit? No: it accepts overshoot and
/// counts it; but credit given to the source is exactly the limit minus what is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_seen_by_the_source_tracks_in_flight_records() {
    struct Probe {
        credits: Option<Credits>,
        seen: Arc<std::sync::Mutex<Vec<usize>>>,
        n: u64,
        started: bool,
    }
    #[async_trait]
    impl Source for Probe {
        fn capabilities(&self) -> SourceCapabilities {
            SourceCapabilities::replayable_ordered()
        }
        async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
            self.credits = Some(ctx.credits);
            Ok(())
        }
        async fn next(&mut self) -> Result<SourceEvent, Error> {
            let p = PartitionId::new("c-0");
            if !self.started {
                self.started = true;
                return Ok(SourceEvent::Assigned(vec![Assignment::new(p)]));
            }
            if self.n >= 500 {
                return Ok(SourceEvent::End);
            }
            let credits = self.credits.clone().unwrap();
            credits.wait_for(&p).await;
            let c = credits.available(&p);
            self.seen.lock().unwrap().push(c);
            let take = c.min(7) as u64;
            let rs = (self.n..self.n + take)
                .map(|i| Record::new(p.clone(), Position::from(i), "x"))
                .collect();
            self.n += take;
            Ok(SourceEvent::Records(rs))
        }
        async fn start(&mut self, _: Vec<StartPosition>) -> Result<(), Error> {
            Ok(())
        }
        async fn commit(&mut self, _: &[Checkpoint]) -> Result<(), Error> {
            Ok(())
        }
        async fn close(&mut self) -> Result<(), Error> {
            Ok(())
        }
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let probe = Probe {
        credits: None,
        seen: seen.clone(),
        n: 0,
        started: false,
    };
    let sink = FaultInjectingSink::new(
        NullSink::default(),
        FaultConfig {
            latency: Duration::from_millis(2),
            ..Default::default()
        },
    );
    let settings = RuntimeSettings {
        max_in_flight_per_partition: 20,
        ..Default::default()
    };
    let summary = Pipeline::builder("credit")
        .source(probe)
        .sink(sink)
        .settings(settings)
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(summary.stats.records_out, 500);
    let seen = seen.lock().unwrap();
    assert!(seen.iter().all(|c| *c <= 20 && *c > 0), "{seen:?}");
    assert!(
        seen.iter().any(|c| *c < 20),
        "credit must shrink while records are in flight: {seen:?}"
    );
    assert!(summary.stats.peak_partition_in_flight <= 20);
}

/// A sink remembering the size of every batch it was handed.
#[derive(Default)]
struct BatchSizes(std::sync::Mutex<Vec<(usize, usize)>>);

#[async_trait]
impl flowgate_core::Sink for BatchSizes {
    fn capabilities(&self) -> flowgate_core::SinkCapabilities {
        flowgate_core::SinkCapabilities::basic()
    }
    async fn write(&self, batch: &[Record]) -> Result<(), flowgate_core::WriteError> {
        let bytes = batch.iter().map(Record::byte_size).sum();
        self.0.lock().unwrap().push((batch.len(), bytes));
        Ok(())
    }
}

/// Batches hold at most `max_records` records and `max_bytes` bytes, and every record is
/// written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_respect_the_record_and_byte_limits() {
    for (max_records, max_bytes) in [(7, 1 << 20), (1000, 2_000)] {
        let sink = Arc::new(BatchSizes::default());
        let pipeline = Pipeline::builder("limits")
            .source(
                GeneratorSource::new(GeneratorConfig {
                    partitions: 3,
                    records_per_partition: Some(500),
                    payload_size: 100,
                    ..Default::default()
                })
                .unwrap(),
            )
            .sink(sink.clone())
            .settings(RuntimeSettings {
                batch: BatchSettings {
                    max_records,
                    max_bytes,
                    ..Default::default()
                },
                ..Default::default()
            })
            .build()
            .unwrap();
        pipeline.run(Shutdown::never()).await.unwrap();
        let sizes = sink.0.lock().unwrap().clone();
        assert_eq!(sizes.iter().map(|(n, _)| n).sum::<usize>(), 1_500);
        for (n, bytes) in &sizes {
            assert!(
                *n >= 1 && *n <= max_records,
                "{n} records (limit {max_records})"
            );
            assert!(*bytes <= max_bytes, "{bytes} bytes (limit {max_bytes})");
        }
        // The limit that binds is reached: batches are not needlessly small.
        let fullest = sizes.iter().map(|(n, b)| (*n, *b)).max().unwrap();
        if max_records == 7 {
            assert_eq!(fullest.0, 7);
        } else {
            assert!(fullest.1 > max_bytes / 2, "{fullest:?}");
        }
    }
}

/// However fast records are acknowledged, checkpoint writes start at least
/// `commit.min_interval` apart (the final one on shutdown excepted), the cadence still
/// follows `every_records` above that floor, and the final checkpoint is the last record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_writes_start_at_least_min_interval_apart() {
    let min_interval = Duration::from_millis(20);
    let store = Arc::new(MemoryStore::new());
    let sink = MemorySink::new();
    let (trigger, shutdown) = Shutdown::manual();
    let pipeline = Pipeline::builder("floor")
        .source(generator(2, 200_000, Some(200_000.0)))
        .sink(sink.clone())
        .checkpoint_store(store.clone())
        .settings(RuntimeSettings {
            commit: CommitSettings {
                every_records: 10,
                min_interval,
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let run = tokio::spawn(pipeline.run(shutdown));
    tokio::time::sleep(Duration::from_millis(600)).await;
    trigger.trigger();
    run.await.unwrap().unwrap();
    let calls = store.commit_calls.lock().unwrap().clone();
    // Without the floor, 10 records per checkpoint at this rate would ask for thousands.
    assert!(
        calls.len() >= 5 && calls.len() <= 600 / 20 + 3,
        "{} checkpoint writes in 600 ms",
        calls.len()
    );
    // The floor applies to when the runtime starts a write; the store sees each call once
    // its task runs, behind the batches queued on the busy workers, which shifts single gaps
    // by a few milliseconds either way. Their mean holds the floor.
    let before_shutdown = &calls[..calls.len() - 1];
    let gaps: Vec<Duration> = before_shutdown.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    // The mean is (last − first) / gaps: only the first and the last call's scheduling delay
    // move it, by at most a worker's turn (2 ms here) spread over all the gaps.
    let ends = Duration::from_millis(2) / gaps.len() as u32;
    assert!(
        mean + ends >= min_interval,
        "writes {mean:?} apart on average"
    );
    for gap in &gaps {
        assert!(*gap >= min_interval / 2, "writes {gap:?} apart");
    }
    assert_final_checkpoints(&store, "floor", &sink).await;
}

/// `commit.min_interval` above `commit.every` is refused, naming the key.
#[test]
fn a_commit_floor_above_the_interval_is_refused() {
    let settings = RuntimeSettings {
        commit: CommitSettings {
            min_interval: Duration::from_secs(10),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = settings.validate().unwrap_err();
    assert!(e.to_string().contains("commit.min_interval"), "{e}");
}

/// A source that counts the calls of `next`: a loop spinning on a past deadline calls it
/// over and over.
struct CountingSource<S> {
    inner: S,
    calls: Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait]
impl<S: Source> Source for CountingSource<S> {
    fn capabilities(&self) -> SourceCapabilities {
        self.inner.capabilities()
    }
    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        self.inner.open(ctx).await
    }
    async fn next(&mut self) -> Result<SourceEvent, Error> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.next().await
    }
    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        self.inner.start(starts).await
    }
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        self.inner.commit(checkpoints).await
    }
    async fn close(&mut self) -> Result<(), Error> {
        self.inner.close().await
    }
}

/// A checkpoint write slower than `commit.min_interval` does not make the loop spin while it
/// is in flight (a due checkpoint cannot start before it ends), and checkpoints still follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_checkpoint_write_does_not_spin_the_loop() {
    let store = Arc::new(MemoryStore::with_commit_delay(Duration::from_millis(200)));
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink = MemorySink::new();
    let (trigger, shutdown) = Shutdown::manual();
    let pipeline = Pipeline::builder("slow-store")
        .source(CountingSource {
            inner: generator(2, 100_000, Some(200.0)),
            calls: calls.clone(),
        })
        .sink(sink.clone())
        .checkpoint_store(store.clone())
        .settings(RuntimeSettings {
            commit: CommitSettings {
                every_records: 10,
                min_interval: Duration::from_millis(1),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let run = tokio::spawn(pipeline.run(shutdown));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    trigger.trigger();
    run.await.unwrap().unwrap();
    let writes = store.commit_calls.lock().unwrap().len();
    assert!(writes >= 5, "{writes} checkpoint writes");
    // 200 records arrive in the second. The loop asked the source ~375 times; spinning on
    // the past deadline of a due checkpoint while the write was in flight (every 1 ms: the
    // timer's resolution), it asked ~910 times.
    let n = calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n < 600, "the source was asked {n} times");
    assert_final_checkpoints(&store, "slow-store", &sink).await;
}

/// A source whose broker goes away `down_at` after the open and, unless `up_at` is `None`,
/// comes back then; records flow only while it is up.
struct OutageSource<S> {
    inner: S,
    opened: Option<Instant>,
    down_at: Duration,
    up_at: Option<Duration>,
    reported: (bool, bool),
}

#[async_trait]
impl<S: Source> Source for OutageSource<S> {
    fn capabilities(&self) -> SourceCapabilities {
        self.inner.capabilities()
    }
    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        self.opened = Some(Instant::now());
        self.inner.open(ctx).await
    }
    async fn next(&mut self) -> Result<SourceEvent, Error> {
        let since = self.opened.map_or(Duration::ZERO, |t| t.elapsed());
        if since >= self.down_at && !self.reported.0 {
            self.reported.0 = true;
            return Ok(SourceEvent::Connection(flowgate_core::Connection::Down {
                endpoint: "broker.test:9092".into(),
                cause: "connection refused".into(),
            }));
        }
        let up = self.up_at.is_some_and(|u| since >= u);
        if up && !self.reported.1 {
            self.reported.1 = true;
            return Ok(SourceEvent::Connection(flowgate_core::Connection::Up));
        }
        if self.reported.0 && !up {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Ok(SourceEvent::Lag(Vec::new()));
        }
        self.inner.next().await
    }
    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        self.inner.start(starts).await
    }
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        self.inner.commit(checkpoints).await
    }
    async fn close(&mut self) -> Result<(), Error> {
        self.inner.close().await
    }
}

fn outage_pipeline(up_at: Option<Duration>, timeout: Duration) -> (Pipeline, MemorySink) {
    let sink = MemorySink::new();
    let mut settings = RuntimeSettings::default();
    settings.health.disconnect_timeout = timeout;
    let pipeline = Pipeline::builder("outage")
        .source(OutageSource {
            inner: generator(2, 1_000_000, Some(2_000.0)),
            opened: None,
            down_at: Duration::from_millis(300),
            up_at,
            reported: (false, false),
        })
        .sink(sink.clone())
        .settings(settings)
        .build()
        .unwrap();
    (pipeline, sink)
}

/// A broker lost mid-run reads as "disconnected" (never "healthy") while it is away, and the
/// pipeline carries on once it is back within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_reads_as_disconnected_until_it_is_back() {
    let (pipeline, sink) =
        outage_pipeline(Some(Duration::from_millis(1500)), Duration::from_secs(30));
    let stats = pipeline.stats();
    let (trigger, shutdown) = Shutdown::manual();
    let handle = tokio::spawn(pipeline.run(shutdown));
    let mut seen = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        let h = stats.health();
        if seen.last() != Some(&h) {
            seen.push(h);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_stop = sink.len();
    trigger.trigger();
    handle.await.unwrap().unwrap();
    let i = seen
        .iter()
        .position(|h| *h == Health::Disconnected)
        .unwrap_or_else(|| panic!("never disconnected: {seen:?}"));
    assert!(seen[..i].contains(&Health::Healthy), "{seen:?}");
    assert!(
        seen[i..].contains(&Health::Healthy),
        "healthy once back: {seen:?}"
    );
    assert!(!seen.contains(&Health::Unhealthy), "{seen:?}");
    assert!(before_stop > 0);
}

/// A broker that stays away stops the pipeline after `health.disconnect_timeout` with a fatal
/// error that names the endpoint and the cause, and says how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_away_past_the_timeout_is_a_fatal_error_naming_the_endpoint() {
    let (pipeline, _sink) = outage_pipeline(None, Duration::from_millis(1200));
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), pipeline.run(Shutdown::manual().1))
        .await
        .expect("the pipeline must stop by itself")
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Fatal, "{err}");
    let text = err.to_string();
    assert!(text.contains("broker.test:9092"), "{text}");
    assert!(text.contains("connection refused"), "{text}");
    assert!(text.contains("disconnect_timeout"), "{text}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

/// A checkpoint store whose commits fail with a temporary error while `down` is set.
struct FlakyStore {
    inner: MemoryStore,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl CheckpointStore for FlakyStore {
    fn describe(&self) -> String {
        "flaky test store".into()
    }
    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        self.inner.load(pipeline).await
    }
    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        if self.down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::transient("store.test:5432: connection refused"));
        }
        self.inner.commit(pipeline, checkpoints).await
    }
    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        self.inner.reset(pipeline, partitions).await
    }
}

/// A checkpoint store that cannot be reached mid-run reads as "disconnected" (with the cause
/// in the stats) while it is away, and the pipeline recovers without loss once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_reads_as_disconnected_until_it_answers() {
    let store = Arc::new(FlakyStore {
        inner: MemoryStore::default(),
        down: std::sync::atomic::AtomicBool::new(false),
    });
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder("flaky-store")
        .source(generator(2, 1_000_000, Some(2_000.0)))
        .sink(sink.clone())
        .checkpoint_store(store.clone())
        .settings(RuntimeSettings {
            commit: CommitSettings {
                every_records: 50,
                every: Duration::from_millis(100),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let stats = pipeline.stats();
    let (trigger, shutdown) = Shutdown::manual();
    let handle = tokio::spawn(pipeline.run(shutdown));
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.down.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = vec![stats.health()];
    let mut cause = None;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let h = stats.health();
        if seen.last() != Some(&h) {
            seen.push(h);
        }
        cause = cause.or_else(|| stats.store_failure());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store
        .down
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let back = Instant::now();
    while stats.health() != Health::Healthy {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "never healthy again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    trigger.trigger();
    handle.await.unwrap().unwrap();
    assert!(seen.contains(&Health::Disconnected), "{seen:?}");
    assert!(
        cause.unwrap_or_default().contains("store.test:5432"),
        "the cause is kept"
    );
    assert_eq!(
        stats.store_failure(),
        None,
        "cleared once the store answers"
    );
    assert_final_checkpoints(&store.inner, "flaky-store", &sink).await;
}

/// A source whose broker keeps positions of its own (`broker_positions`), reporting `broker`
/// as every partition's committed position.
struct BrokerPositions {
    inner: MemorySource,
    broker: Option<Position>,
}

#[async_trait]
impl Source for BrokerPositions {
    fn capabilities(&self) -> SourceCapabilities {
        self.inner.capabilities().with_broker_positions(true)
    }
    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        self.inner.open(ctx).await
    }
    async fn next(&mut self) -> Result<SourceEvent, Error> {
        match self.inner.next().await? {
            SourceEvent::Assigned(mut a) => {
                for x in &mut a {
                    x.broker_position = self.broker.clone();
                }
                Ok(SourceEvent::Assigned(a))
            }
            other => Ok(other),
        }
    }
    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        self.inner.start(starts).await
    }
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        self.inner.commit(checkpoints).await
    }
    async fn close(&mut self) -> Result<(), Error> {
        self.inner.close().await
    }
}

/// The checkpoint store is the source of truth: a stored position the broker does not have
/// (behind it, ahead of it, or none at all) is committed to the broker right after the start,
/// before any new record; one the broker already has is not committed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_positions_the_broker_lacks_are_committed_to_it_at_once() {
    let p = PartitionId::new("p0");
    for (broker, expect_align) in [
        (None, true),
        (Some(Position::from(10u64)), true),
        (Some(Position::from(90u64)), true),
        (Some(Position::from(49u64)), false),
    ] {
        let store = Arc::new(MemoryStore::default());
        store
            .commit(
                "align",
                &[Checkpoint::new(p.clone(), Position::from(49u64))],
            )
            .await
            .unwrap();
        // Nothing new after the checkpoint: only the alignment can commit.
        let records: Vec<Record> = (0..50u64)
            .map(|i| Record::new(p.clone(), Position::from(i), Bytes::from("x")))
            .collect();
        let inner = MemorySource::new(records).endless();
        let commits = inner.commits();
        let pipeline = Pipeline::builder("align")
            .source(BrokerPositions {
                inner,
                broker: broker.clone(),
            })
            .sink(MemorySink::new())
            .checkpoint_store(store.clone())
            .build()
            .unwrap();
        let (trigger, shutdown) = Shutdown::manual();
        let run = tokio::spawn(pipeline.run(shutdown));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let early: Vec<Checkpoint> = commits.lock().unwrap().clone();
        trigger.trigger();
        run.await.unwrap().unwrap();
        if expect_align {
            assert_eq!(
                early.first().map(|c| c.position.clone()),
                Some(Position::from(49u64)),
                "broker at {broker:?}: {early:?}"
            );
        } else {
            assert!(
                early.is_empty(),
                "broker already at the checkpoint: {early:?}"
            );
        }
    }
}
