//! Kinesis scenarios against kinesis-mock: resharding mid-stream (split and merge), two
//! workers sharing a stream through leases with one of them crashing, and the `GetRecords`
//! pacing behind a slow sink.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flowgate_checkpoint::MemoryStore;
use flowgate_core::{CheckpointStore, LeaseStore};
use flowgate_kinesis::KinesisSource;
use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink, MemorySink};
use flowgate_runtime::{Pipeline, RuntimeSettings, Shutdown};

fn payload(r: &flowgate_core::Record) -> String {
    String::from_utf8_lossy(&r.payload).into_owned()
}

/// Waits until `sink` holds `want` distinct payloads, failing after `limit`.
async fn wait_for(sinks: &[&MemorySink], want: usize, limit: Duration, what: &str) {
    let started = Instant::now();
    loop {
        let mut seen: Vec<String> = sinks
            .iter()
            .flat_map(|s| s.records())
            .map(|r| payload(&r))
            .collect();
        seen.sort();
        seen.dedup();
        if seen.len() >= want {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: {} of {want} records arrived within {limit:?}",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Split one shard and merge two while a producer keeps writing: every record is read exactly
/// once, and no record of a child shard is processed before the last record of each of its
/// parents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_mid_stream_reads_parents_before_children() {
    let stream = unique("reshard");
    let k = create_stream(&stream, 2).await;
    let store = Arc::new(MemoryStore::new());
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder(unique("reshard-pipeline"))
        .source(KinesisSource::new(source_config(&stream), store.clone()).unwrap())
        .sink(sink.clone())
        .checkpoint_store(store.clone())
        .build()
        .unwrap();
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipeline.run(shutdown));

    let per_shard = 300;
    let mut total = 0;
    let mut phase = |name: &'static str, shards: Vec<(String, String)>| {
        let batches: Vec<(String, Vec<String>)> = shards
            .into_iter()
            .map(|(id, hash)| {
                let payloads = (0..per_shard)
                    .map(|i| format!("{name}-{id}-{i:04}"))
                    .collect();
                (hash, payloads)
            })
            .collect();
        total += batches.len() * per_shard;
        batches
    };
    for (hash, payloads) in phase("a", open_shards(&k, &stream).await) {
        put_to(&k, &stream, &hash, &payloads).await;
    }
    wait_for(
        &[&sink],
        per_shard,
        Duration::from_secs(60),
        "before the split",
    )
    .await;

    // A producer keeps writing (keys spread over whatever shards are open) through the split
    // and the merge.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let live = tokio::spawn({
        let (k, stream, stop) = (k.clone(), stream.clone(), stop.clone());
        async move {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let payloads: Vec<String> = (n..n + 50).map(|i| format!("live-{i:06}")).collect();
                put_keyed(&k, &stream, &payloads).await;
                n += 50;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n
        }
    });

    // Split the first shard in the middle of its hash range.
    let open = open_shards(&k, &stream).await;
    let (first, second) = (&open[0], &open[1]);
    let lo: u128 = first.1.parse().unwrap();
    let hi: u128 = second.1.parse::<u128>().unwrap() - 1;
    k.split_shard()
        .stream_name(&stream)
        .shard_to_split(&first.0)
        .new_starting_hash_key((lo + (hi - lo) / 2 + 1).to_string())
        .send()
        .await
        .expect("SplitShard");
    wait_active(&k, &stream).await;
    for (hash, payloads) in phase("b", open_shards(&k, &stream).await) {
        put_to(&k, &stream, &hash, &payloads).await;
    }

    // Merge the upper child of the split with its neighbour.
    let open = open_shards(&k, &stream).await;
    assert_eq!(open.len(), 3, "{open:?}");
    k.merge_shards()
        .stream_name(&stream)
        .shard_to_merge(&open[1].0)
        .adjacent_shard_to_merge(&open[2].0)
        .send()
        .await
        .expect("MergeShards");
    wait_active(&k, &stream).await;
    for (hash, payloads) in phase("c", open_shards(&k, &stream).await) {
        put_to(&k, &stream, &hash, &payloads).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let produced_live = live.await.unwrap();
    let total = total + produced_live;
    wait_for(&[&sink], total, Duration::from_secs(120), "after the merge").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    trigger.trigger();
    run.await.unwrap().unwrap();

    let records = sink.records();
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *count.entry(payload(r)).or_default() += 1;
    }
    let dups: Vec<_> = count.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dups.is_empty(), "read twice: {dups:?}");
    assert_eq!(count.len(), total, "every record read");

    // Parent before child, in the order the sink received them.
    let listed = k.list_shards().stream_name(&stream).send().await.unwrap();
    let mut first_at: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_at: BTreeMap<String, usize> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        first_at.entry(r.partition.to_string()).or_insert(i);
        last_at.insert(r.partition.to_string(), i);
    }
    let mut checked = 0;
    for s in listed.shards() {
        for parent in s
            .parent_shard_id()
            .into_iter()
            .chain(s.adjacent_parent_shard_id())
        {
            let (Some(child_first), Some(parent_last)) =
                (first_at.get(s.shard_id()), last_at.get(parent))
            else {
                continue;
            };
            assert!(
                child_first > parent_last,
                "child {} processed at {child_first} before parent {parent}'s last record at {parent_last}",
                s.shard_id()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "split (2 children) and merge (2 parents) were checked: {checked}"
    );
    eprintln!(
        "kinesis/reshard: {total} records ({produced_live} by a producer running through the split and the merge) over {} shards, each read once; {checked} parent→child orders held",
        listed.shards().len()
    );
}

/// Two workers split a 4-shard stream through leases (the second takes its share
/// gradually); one crashes; the other takes its shards over from their checkpoints within the
/// lease expiry, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_shards_and_survive_a_crash() {
    let stream = unique("workers");
    let k = create_stream(&stream, 4).await;
    let shards = open_shards(&k, &stream).await;
    let store = Arc::new(MemoryStore::new());
    let name = unique("workers-pipeline");
    let ttl = Duration::from_secs(3);
    let worker = |sink: MemorySink| {
        let source = KinesisSource::new(
            flowgate_kinesis::KinesisSourceConfig {
                lease_ttl: ttl,
                ..source_config(&stream)
            },
            store.clone(),
        )
        .unwrap();
        let stats = source.stats();
        let pipeline = Pipeline::builder(name.clone())
            .source(source)
            .sink(sink)
            .checkpoint_store(store.clone())
            .build()
            .unwrap();
        (pipeline, stats)
    };
    let per_round = shards.len() * 200;
    let produce = |round: usize| {
        let k = k.clone();
        let stream = stream.clone();
        let shards = shards.clone();
        async move {
            for (id, hash) in &shards {
                let payloads: Vec<String> =
                    (0..200).map(|i| format!("r{round}-{id}-{i:03}")).collect();
                put_to(&k, &stream, hash, &payloads).await;
            }
        }
    };

    let (sink_a, sink_b) = (MemorySink::new(), MemorySink::new());
    let (pipeline_a, stats_a) = worker(sink_a.clone());
    let (_trigger_a, shutdown_a) = Shutdown::manual();
    let run_a = tokio::spawn(pipeline_a.run(shutdown_a));
    produce(0).await;
    let started = Instant::now();
    while stats_a.owned().len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "A never took the 4 shards"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (pipeline_b, stats_b) = worker(sink_b.clone());
    let (trigger_b, shutdown_b) = Shutdown::manual();
    let run_b = tokio::spawn(pipeline_b.run(shutdown_b));
    let started = Instant::now();
    while !(stats_a.owned().len() == 2 && stats_b.owned().len() == 2) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the workers never balanced: A {:?}, B {:?}",
            stats_a.owned(),
            stats_b.owned()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let balanced_in = started.elapsed();
    produce(1).await;
    wait_for(
        &[&sink_a, &sink_b],
        2 * per_round,
        Duration::from_secs(60),
        "while shared",
    )
    .await;
    assert!(
        !run_a.is_finished(),
        "A keeps running after losing leases: {:?}",
        run_a.await
    );

    // Crash A: its leases stay held until they expire.
    run_a.abort();
    let _ = run_a.await;
    let crashed = Instant::now();
    produce(2).await;
    while stats_b.owned().len() < 4 {
        assert!(
            crashed.elapsed() < ttl * 3,
            "B did not take A's shards over within 3× the lease ttl: {:?}",
            stats_b.owned()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let taken_over_in = crashed.elapsed();
    let total = 3 * per_round;
    wait_for(
        &[&sink_a, &sink_b],
        total,
        Duration::from_secs(60),
        "after the crash",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    trigger_b.trigger();
    run_b.await.unwrap().unwrap();

    let mut count: HashMap<String, usize> = HashMap::new();
    for r in sink_a.records().iter().chain(sink_b.records().iter()) {
        *count.entry(payload(r)).or_default() += 1;
    }
    assert_eq!(count.len(), total, "nothing lost");
    let dups = count.values().filter(|n| **n > 1).count();
    // Every checkpoint now carries B's lease epoch: A's late writes would be refused.
    let leases = store.leases(&name).await.unwrap();
    let cps = store.load(&name).await.unwrap();
    for cp in &cps {
        let lease = leases.iter().find(|l| l.partition == cp.partition).unwrap();
        assert!(cp.fence <= Some(lease.epoch));
    }
    eprintln!(
        "kinesis/workers: {total} records on 4 shards; balanced 2+2 in {balanced_in:?}; after A's crash B held all 4 in {taken_over_in:?} (lease ttl {ttl:?}); {dups} records delivered twice (A's uncommitted window), 0 lost"
    );
}

/// A sink far slower than the stream: shards without credit are not read, every record
/// arrives, and no shard sees more than 5 `GetRecords` calls in any second (counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_paces_reads_within_the_shard_limits() {
    let stream = unique("slow");
    let k = create_stream(&stream, 2).await;
    let per_shard = 2_000;
    for (id, hash) in open_shards(&k, &stream).await {
        let payloads: Vec<String> = (0..per_shard).map(|i| format!("{id}-{i:05}")).collect();
        put_to(&k, &stream, &hash, &payloads).await;
    }
    let store = Arc::new(MemoryStore::new());
    let source = KinesisSource::new(
        flowgate_kinesis::KinesisSourceConfig {
            min_call_interval: Duration::from_millis(200),
            ..source_config(&stream)
        },
        store.clone(),
    )
    .unwrap();
    let stats = source.stats();
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder(unique("slow-pipeline"))
        .source(source)
        .sink(FaultInjectingSink::new(
            sink.clone(),
            FaultConfig {
                capacity_per_sec: Some(800.0),
                ..Default::default()
            },
        ))
        .checkpoint_store(store)
        .settings(RuntimeSettings {
            max_in_flight_per_partition: 100,
            ..Default::default()
        })
        .build()
        .unwrap();
    let run_stats = pipeline.stats();
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipeline.run(shutdown));
    let mut peak_in_flight = 0;
    let started = Instant::now();
    while sink.len() < 2 * per_shard {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "only {} arrived",
            sink.len()
        );
        peak_in_flight = peak_in_flight.max(run_stats.snapshot().peak_partition_in_flight);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    trigger.trigger();
    run.await.unwrap().unwrap();
    let shards = stats.shards();
    for (shard, s) in &shards {
        assert!(
            s.max_calls_per_second <= 5,
            "{shard}: {} GetRecords calls within one second",
            s.max_calls_per_second
        );
        assert_eq!(
            s.throttles, 0,
            "{shard}: flowgate's own pacing caused throttling"
        );
    }
    assert!(
        peak_in_flight <= 100,
        "in flight per shard {peak_in_flight} > 100"
    );
    let calls: u64 = shards.values().map(|s| s.get_records_calls).sum();
    eprintln!(
        "kinesis/slow: {} records through a sink at 800/s in {elapsed:?}; {calls} GetRecords calls on 2 shards, at most {} per shard per second, 0 throttles; peak in flight per shard {peak_in_flight}",
        2 * per_shard,
        shards
            .values()
            .map(|s| s.max_calls_per_second)
            .max()
            .unwrap_or(0)
    );
}

/// A sink that stalls for longer than a shard iterator lives (300 s in Kinesis and
/// kinesis-mock): the shard is not read meanwhile, its iterator expires, and the reader
/// re-acquires one after the last record it read — every record arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iterator_that_expired_behind_a_stalled_sink_is_reacquired() {
    let stream = unique("expiry");
    let k = create_stream(&stream, 1).await;
    let total = 300;
    let (_, hash) = open_shards(&k, &stream).await.remove(0);
    let payloads: Vec<String> = (0..total).map(|i| format!("e-{i:04}")).collect();
    put_to(&k, &stream, &hash, &payloads).await;
    let store = Arc::new(MemoryStore::new());
    let source = KinesisSource::new(
        flowgate_kinesis::KinesisSourceConfig {
            lease_ttl: Duration::from_secs(10),
            ..source_config(&stream)
        },
        store.clone(),
    )
    .unwrap();
    let stats = source.stats();
    let sink = MemorySink::new();
    let stall = Duration::from_secs(310);
    let pipeline = Pipeline::builder(unique("expiry-pipeline"))
        .source(source)
        .sink(FaultInjectingSink::new(
            sink.clone(),
            FaultConfig {
                stall_after: Some(Duration::ZERO),
                stall_for: stall,
                ..Default::default()
            },
        ))
        .checkpoint_store(store)
        .settings(RuntimeSettings {
            max_in_flight_per_partition: 50,
            ..Default::default()
        })
        .build()
        .unwrap();
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipeline.run(shutdown));
    let started = Instant::now();
    while sink.len() < total {
        assert!(
            started.elapsed() < stall + Duration::from_secs(60),
            "only {} of {total} arrived",
            sink.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    trigger.trigger();
    run.await.unwrap().unwrap();
    let shard = stats.shards().into_values().next().unwrap();
    assert!(
        shard.expired_iterators >= 1,
        "the iterator must have expired during the {stall:?} stall: {shard:?}"
    );
    let mut seen: Vec<String> = sink.records().iter().map(payload).collect();
    let n = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "nothing lost");
    assert_eq!(n, total, "nothing read twice");
    eprintln!(
        "kinesis/expiry: sink stalled {stall:?}; {} expired iterator(s) re-acquired; {total} records once each; {} GetRecords calls",
        shard.expired_iterators, shard.get_records_calls
    );
}
