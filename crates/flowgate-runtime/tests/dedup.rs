//! Dedup: check before sink, mark after confirm, marks always before the checkpoint.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use flowgate_core::{IdempotencyKey, PartitionId, Position};
use flowgate_runtime::adapters::{
    FaultConfig, FaultInjectingSink, GeneratorConfig, GeneratorSource, MemorySink,
};
use flowgate_runtime::{
    BatchSettings, CommitSettings, ConcurrencyMode, ConcurrencySettings, KeyExtractor, Pipeline,
    RuntimeSettings, Shutdown, SinkOrdering,
};
use proptest::prelude::*;

mod common;
use common::{MemoryStore, Op};

fn run_pipeline(
    positional: bool,
    seed: u64,
    latency_ms: u64,
    mark_delay_ms: u64,
    ordering: SinkOrdering,
    commit_every: u64,
    mark_interval_ms: u64,
) -> Arc<MemoryStore> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = Arc::new(
            MemoryStore::with_mark_delay(Duration::from_millis(mark_delay_ms))
                .positional(positional),
        );
        let sink = FaultInjectingSink::new(
            MemorySink::new(),
            FaultConfig {
                latency: Duration::from_millis(latency_ms),
                transient_failure_rate: 0.1,
                seed,
                ..Default::default()
            },
        );
        let mut settings = RuntimeSettings {
            ordering,
            dedup_mark_interval: Duration::from_millis(mark_interval_ms),
            batch: BatchSettings {
                max_records: 1 + (seed % 40) as usize,
                ..Default::default()
            },
            concurrency: ConcurrencySettings {
                initial: 1 + (seed % 8) as usize,
                ..Default::default()
            },
            commit: CommitSettings {
                every_records: commit_every,
                every: Duration::from_millis(20),
                min_interval: Duration::ZERO,
            },
            ..Default::default()
        };
        settings.retry.initial_backoff = Duration::from_millis(1);
        settings.retry.max_backoff = Duration::from_millis(5);
        Pipeline::builder("dedup-order")
            .source(
                GeneratorSource::new(GeneratorConfig {
                    partitions: 3,
                    records_per_partition: Some(400),
                    ..Default::default()
                })
                .expect("gen"),
            )
            .sink(sink)
            .checkpoint_store(store.clone())
            .dedup(store.clone(), KeyExtractor::SourcePosition)
            .settings(settings)
            .build()
            .expect("build")
            .run(Shutdown::never())
            .await
            .expect("run");
        store
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Whatever the batch sizes, concurrency, latencies and commit cadence: at every point of
    /// the store's history (a crash can happen at any of them), every record at or before a
    /// partition's checkpoint already has its dedup mark.
    #[test]
    fn marks_never_lag_behind_the_checkpoint(
        seed in any::<u64>(),
        latency in 0u64..3,
        mark_delay in 0u64..4,
        unordered in any::<bool>(),
        commit_every in 1u64..200,
        positional in any::<bool>(),
        mark_interval in 0u64..6,
    ) {
        let ordering = if unordered { SinkOrdering::Unordered } else { SinkOrdering::Partition };
        let store = run_pipeline(
            positional, seed, latency, mark_delay, ordering, commit_every, mark_interval,
        );
        let ops = store.ops.lock().unwrap().clone();
        let mut marked: HashSet<IdempotencyKey> = HashSet::new();
        let mut checkpoints: HashMap<PartitionId, Position> = HashMap::new();
        let mut commits = 0;
        for op in ops {
            match op {
                Op::Mark(keys) => {
                    prop_assert!(!positional, "positional dedup must not write per-record keys");
                    marked.extend(keys)
                }
                Op::MarkRanges(ranges) => {
                    prop_assert!(positional);
                    for r in ranges {
                        for pos in r.first.as_u64().unwrap()..=r.last.as_u64().unwrap() {
                            marked.insert(IdempotencyKey::from_position(&r.partition, &Position::from(pos)));
                        }
                    }
                }
                Op::Lookup(_) => {}
                Op::Commit(cps) => {
                    commits += 1;
                    for c in cps {
                        let upto = c.position.as_u64().unwrap();
                        for pos in 0..=upto {
                            let key = IdempotencyKey::from_position(&c.partition, &Position::from(pos));
                            prop_assert!(marked.contains(&key), "checkpoint {}@{} committed before the mark of position {pos}", c.partition, upto);
                        }
                        checkpoints.insert(c.partition, c.position);
                    }
                }
            }
        }
        prop_assert!(commits > 0);
        prop_assert!(checkpoints.values().all(|p| *p == Position::from(399u64)));
    }
}

/// Runs a generator of 2 partitions × 1,000 records to its end, deduplicated by position.
async fn two_partitions_of_1000(
    name: &str,
    store: &Arc<MemoryStore>,
    sink: &MemorySink,
) -> flowgate_runtime::RunSummary {
    Pipeline::builder(name)
        .source(
            GeneratorSource::new(GeneratorConfig {
                partitions: 2,
                records_per_partition: Some(1_000),
                ..Default::default()
            })
            .unwrap(),
        )
        .sink(sink.clone())
        .dedup(store.clone(), KeyExtractor::SourcePosition)
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .unwrap()
}

/// A replay after a restart skips everything already applied: run, then rerun the same finite
/// generator from scratch (no checkpoint store) — every record is a dedup hit. Both with
/// per-record keys and with positional ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_skips_records_already_applied() {
    for positional in [false, true] {
        let store = Arc::new(MemoryStore::new().positional(positional));
        let sink = MemorySink::new();
        for run in 0..2 {
            let summary = two_partitions_of_1000("replay", &store, &sink).await;
            let ops = std::mem::take(&mut *store.ops.lock().unwrap());
            if run == 0 {
                assert_eq!(
                    ops.iter().any(|op| matches!(op, Op::MarkRanges(_))),
                    positional,
                    "the store's capability decides the kind of marks"
                );
            }
            let looked_up: usize = ops
                .into_iter()
                .map(|op| match op {
                    Op::Lookup(p) => p.len(),
                    _ => 0,
                })
                .sum();
            if run == 1 {
                assert_eq!(
                    summary.stats.dedup_hits, 2_000,
                    "positional={positional}: the replay is entirely skipped"
                );
                assert_eq!(summary.stats.records_out, 0);
                if positional {
                    assert_eq!(looked_up, 2_000, "every replayed record is looked up");
                }
            } else if positional {
                assert_eq!(
                    looked_up, 0,
                    "nothing was marked before the first run: no record is looked up"
                );
            }
        }
        assert_eq!(
            sink.len(),
            2_000,
            "positional={positional}: each record reached the sink once"
        );
    }
}

/// Positional dedup looks a record up only if an earlier owner could have marked it: at or
/// below the store's last mark for its partition when the partition was assigned. A crash
/// window marked up to position 499 of one partition: exactly those 500 records are looked up
/// (and skipped), the other 1,500 go straight to the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_records_at_or_below_the_last_mark_are_looked_up() {
    use flowgate_core::{DedupStore, PositionRange};
    let store = Arc::new(MemoryStore::new().positional(true));
    let p0 = PartitionId::new("gen-0");
    store
        .mark_ranges(
            "window",
            &[PositionRange {
                partition: p0.clone(),
                first: Position::from(0u64),
                last: Position::from(499u64),
            }],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    store.ops.lock().unwrap().clear();
    let sink = MemorySink::new();
    let summary = two_partitions_of_1000("window", &store, &sink).await;
    assert_eq!(summary.stats.dedup_hits, 500);
    assert_eq!(sink.len(), 1_500);
    let looked_up: Vec<Position> = store
        .ops
        .lock()
        .unwrap()
        .iter()
        .flat_map(|op| match op {
            Op::Lookup(p) => p.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(looked_up.len(), 500, "only the marked window is looked up");
    assert!(looked_up.iter().all(|p| p.as_u64().unwrap() <= 499));
}

/// A source that loses its only partition while a batch is at the sink, gets it back at
/// once, and replays it from the start once the lost batch has been written and marked.
struct LostAndBack {
    step: usize,
    at: Option<tokio::time::Instant>,
    records: Vec<flowgate_core::Record>,
}

#[async_trait::async_trait]
impl flowgate_core::Source for LostAndBack {
    fn capabilities(&self) -> flowgate_core::SourceCapabilities {
        flowgate_core::SourceCapabilities::replayable_ordered().with_dynamic_assignment(true)
    }
    async fn open(&mut self, _: flowgate_core::SourceContext) -> Result<(), flowgate_core::Error> {
        Ok(())
    }
    async fn next(&mut self) -> Result<flowgate_core::SourceEvent, flowgate_core::Error> {
        use flowgate_core::{Assignment, Revocation, SourceEvent};
        let p = PartitionId::new("lost-0");
        // The runtime drops a pending `next()` when something else is ready: wait until a
        // deadline set beforehand, so a dropped wait resumes instead of skipping the step.
        let wait = match self.step {
            // The batch is at the sink (50 ms per write).
            2 => 20,
            // The first ownership's batch is written and marked by then.
            4 => 300,
            _ => 0,
        };
        let at = *self
            .at
            .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(wait));
        tokio::time::sleep_until(at).await;
        self.at = None;
        self.step += 1;
        Ok(match self.step {
            1 | 4 => SourceEvent::Assigned(vec![Assignment::new(p)]),
            2 | 5 => SourceEvent::Records(self.records.clone()),
            3 => SourceEvent::Revoked(Revocation::new(vec![p], true).0),
            _ => SourceEvent::End,
        })
    }
    async fn start(
        &mut self,
        _: Vec<flowgate_core::StartPosition>,
    ) -> Result<(), flowgate_core::Error> {
        Ok(())
    }
    async fn commit(
        &mut self,
        _: &[flowgate_core::Checkpoint],
    ) -> Result<(), flowgate_core::Error> {
        Ok(())
    }
    async fn close(&mut self) -> Result<(), flowgate_core::Error> {
        Ok(())
    }
}

/// A partition owned anew while a batch of its lost ownership is still at the sink: that
/// batch's marks land after the new ownership read the last mark, so the new ownership looks
/// every record up, and the replay is skipped instead of written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_owned_anew_while_its_lost_batch_runs_looks_every_record_up() {
    let p = PartitionId::new("lost-0");
    let records: Vec<flowgate_core::Record> = (0..100u64)
        .map(|i| flowgate_core::Record::new(p.clone(), Position::from(i), "x"))
        .collect();
    let store = Arc::new(MemoryStore::new().positional(true));
    let sink = MemorySink::new();
    let summary = Pipeline::builder("lost")
        .source(LostAndBack {
            step: 0,
            at: None,
            records,
        })
        .sink(FaultInjectingSink::new(
            sink.clone(),
            FaultConfig {
                latency: Duration::from_millis(50),
                ..Default::default()
            },
        ))
        .dedup(store.clone(), KeyExtractor::SourcePosition)
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(sink.len(), 100, "the replay was not written again");
    assert_eq!(summary.stats.dedup_hits, 100);
}

/// Runs `partitions` × `per_partition` generated records (at `rate`, if any) through a
/// pipeline with positional dedup into a memory sink; returns the store and the sink.
async fn run_with_marks(
    name: &str,
    (partitions, per_partition, rate): (u32, u64, Option<f64>),
    settings: RuntimeSettings,
) -> (Arc<MemoryStore>, MemorySink) {
    let store = Arc::new(MemoryStore::new().positional(true));
    let sink = MemorySink::new();
    Pipeline::builder(name)
        .source(
            GeneratorSource::new(GeneratorConfig {
                partitions,
                records_per_partition: Some(per_partition),
                rate,
                ..Default::default()
            })
            .expect("gen"),
        )
        .sink(sink.clone())
        .dedup(store.clone(), KeyExtractor::SourcePosition)
        .settings(settings)
        .build()
        .expect("build")
        .run(Shutdown::never())
        .await
        .expect("run");
    (store, sink)
}

/// Marks are committed at most once per `dedup_mark_interval` (batches confirmed meanwhile
/// share a commit), and every record is still marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_are_committed_at_most_once_per_interval() {
    let interval = Duration::from_millis(40);
    let started = std::time::Instant::now();
    let settings = RuntimeSettings {
        dedup_mark_interval: interval,
        batch: BatchSettings {
            max_records: 10,
            ..Default::default()
        },
        // A quarter of the limit (32) is more than arrive within an interval (~24).
        concurrency: ConcurrencySettings {
            mode: ConcurrencyMode::Fixed,
            initial: 128,
            max: 128,
            ..Default::default()
        },
        ..Default::default()
    };
    let (store, sink) = run_with_marks("mark-interval", (2, 3_000, Some(6_000.0)), settings).await;
    let elapsed = started.elapsed();
    let calls = store.mark_calls.lock().unwrap().clone();
    // ~1 s of records in batches of at most 10: hundreds of batches, a few dozen commits.
    assert!(calls.len() >= 5, "{} mark calls", calls.len());
    let most = (elapsed.as_millis() / interval.as_millis()) as usize + 1;
    assert!(
        calls.len() <= most,
        "{} mark calls in {elapsed:?} at one per {interval:?}",
        calls.len()
    );
    for w in calls.windows(2) {
        let gap = w[1].duration_since(w[0]);
        assert!(
            gap + Duration::from_millis(2) >= interval,
            "two mark commits {gap:?} apart (interval {interval:?})"
        );
    }
    let mut marked = HashSet::new();
    for op in store.ops.lock().unwrap().iter() {
        if let Op::MarkRanges(ranges) = op {
            for r in ranges {
                for pos in r.first.as_u64().unwrap()..=r.last.as_u64().unwrap() {
                    marked.insert((r.partition.clone(), pos));
                }
            }
        }
    }
    assert_eq!(marked.len(), 6_000, "every record marked");
    assert_eq!(sink.records().len(), 6_000);
}

/// Batches waiting for their marks hold credit and concurrency: once a quarter of the current
/// concurrency limit waits, the marks are committed without waiting for the interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_batches_cut_the_mark_interval_short() {
    let started = std::time::Instant::now();
    let settings = RuntimeSettings {
        // Were every commit to wait for it, the ≥ 12 commits below would take ≥ 24 s.
        dedup_mark_interval: Duration::from_secs(2),
        batch: BatchSettings {
            max_records: 10,
            ..Default::default()
        },
        concurrency: ConcurrencySettings {
            initial: 8,
            max: 8,
            ..Default::default()
        },
        ..Default::default()
    };
    let (store, sink) = run_with_marks("mark-interval-cap", (2, 500, None), settings).await;
    // 100 batches, at most 8 in flight: at least 12 commits. A lone batch (the last one,
    // say) may still wait for the interval.
    let calls = store.mark_calls.lock().unwrap().len();
    assert!(calls >= 12, "{calls} mark calls");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "took {:?} for {calls} mark calls: they waited for the interval",
        started.elapsed()
    );
    assert_eq!(sink.records().len(), 1_000);
}

/// A producer that published a message twice puts both copies side by side, often in one
/// batch: the second is skipped like a replay, not written next to the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_twice_in_one_batch_is_written_once() {
    let store = Arc::new(MemoryStore::new());
    let sink = MemorySink::new();
    let keys = [0u64, 1, 2, 2, 3, 4, 4, 4, 5];
    let records = keys.iter().enumerate().map(|(pos, k)| {
        let mut r = flowgate_core::Record::new(
            PartitionId::new("q"),
            Position::from(pos as u64),
            format!("message {k}").into_bytes(),
        );
        r.idempotency_key = Some(IdempotencyKey::new(format!("id-{k}").into_bytes()));
        r
    });
    let summary = Pipeline::builder("twice-in-a-batch")
        .source(flowgate_runtime::adapters::MemorySource::new(records))
        .sink(sink.clone())
        .dedup(store.clone(), KeyExtractor::Key)
        .build()
        .unwrap()
        .run(Shutdown::never())
        .await
        .unwrap();
    let written: Vec<String> = sink
        .records()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(
        written,
        (0..=5).map(|k| format!("message {k}")).collect::<Vec<_>>()
    );
    assert_eq!(summary.stats.dedup_hits, 3);
}
