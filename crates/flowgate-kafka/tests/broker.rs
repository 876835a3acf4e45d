//! The Kafka adapter against the real broker of `cargo xtask brokers up`: the core
//! conformance suite for the source and the sink, and the slow-sink scenario.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_core::testkit::{sink::SinkHarness, source::SourceHarness};
use flowgate_core::{Error, PartitionId, Position, Record};
use flowgate_kafka::{KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig, partition_id};
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

mod common;
use common::{bootstrap, create_topic, produce, unique};

/// Produces `per_sec` records a second for `duration` in the background; keys cycle over
/// `key_modulo` values (or are all distinct). Returns how many were sent.
fn produce_paced(
    topic: String,
    per_sec: f64,
    duration: Duration,
    key_modulo: Option<u64>,
    payload: Vec<u8>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("linger.ms", "20")
            .create()
            .unwrap();
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < duration {
            let due = (started.elapsed().as_secs_f64() * per_sec) as u64;
            let mut futs = Vec::new();
            while sent < due {
                let key = format!("k{}", key_modulo.map_or(sent, |m| sent % m));
                futs.push(
                    producer
                        .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
                        .expect("enqueue"),
                );
                sent += 1;
            }
            for f in futs {
                f.await.unwrap().map_err(|(e, _)| e).expect("delivered");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    })
}

fn source_config(topic: &str, group: &str) -> KafkaSourceConfig {
    KafkaSourceConfig {
        bootstrap_servers: bootstrap(),
        topics: vec![topic.to_string()],
        group_id: Some(group.to_string()),
        session_timeout: Duration::from_secs(6),
        max_poll_interval: Duration::from_secs(10),
        rebalance_timeout: Duration::from_secs(8),
        ..Default::default()
    }
}

struct SourceH {
    topic: Mutex<String>,
    group: Mutex<String>,
}

#[async_trait]
impl SourceHarness for SourceH {
    type Source = KafkaSource;
    async fn prepare(&self, per_partition: usize) -> Result<Vec<PartitionId>, Error> {
        let topic = unique("conf-src");
        create_topic(&topic, 2).await;
        produce(&topic, 2, per_partition).await;
        *self.topic.lock().unwrap() = topic.clone();
        *self.group.lock().unwrap() = unique("conf-group");
        Ok((0..2).map(|p| partition_id(&topic, p)).collect())
    }
    async fn open_source(&self) -> Result<KafkaSource, Error> {
        KafkaSource::new(source_config(
            &self.topic.lock().unwrap(),
            &self.group.lock().unwrap(),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_conforms() {
    let h = SourceH {
        topic: Mutex::new(String::new()),
        group: Mutex::new(String::new()),
    };
    flowgate_core::testkit::source::run_all(&h).await;
}

struct SinkH {
    topic: String,
}

#[async_trait]
impl SinkHarness for SinkH {
    type Sink = KafkaSink;
    async fn open_sink(&self) -> Result<KafkaSink, Error> {
        KafkaSink::new(KafkaSinkConfig {
            bootstrap_servers: bootstrap(),
            topic: Some(self.topic.clone()),
            ..Default::default()
        })
    }
    async fn read_back(&self) -> Result<Vec<Record>, Error> {
        Ok(common::read_back(&self.topic).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_conforms() {
    let topic = unique("conf-sink");
    create_topic(&topic, 1).await;
    flowgate_core::testkit::sink::run_all(&SinkH { topic }).await;
}

/// Where a partition starts without a checkpoint: at the group's committed offset, else at
/// `auto_offset_reset`. With `latest`, records produced before the member joined are skipped;
/// the next member of the group starts at the offset the first one committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_checkpoint_a_partition_starts_at_the_committed_offset_else_at_the_reset() {
    use flowgate_core::testkit::source::Driver;
    use flowgate_core::{Checkpoint, Source};
    let topic = unique("reset");
    create_topic(&topic, 1).await;
    produce(&topic, 1, 5).await;
    let group = unique("reset-group");
    let config = || KafkaSourceConfig {
        auto_offset_reset: "latest".into(),
        ..source_config(&topic, &group)
    };
    let part = partition_id(&topic, 0);

    let mut d = Driver::open(KafkaSource::new(config()).unwrap(), 100).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.assigned.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the partition was never assigned"
        );
        assert!(d.poll(Duration::from_millis(200)).await.unwrap().is_empty());
    }
    // Let the reset resolve to the end of the partition before producing more.
    let settle = Instant::now() + Duration::from_secs(1);
    while Instant::now() < settle {
        let got = d.poll(Duration::from_millis(200)).await.unwrap();
        assert!(
            got.is_empty(),
            "records produced before the join were read: {got:?}"
        );
    }
    produce(&topic, 1, 3).await;
    let got = d.read_until(std::slice::from_ref(&part), 3).await;
    let offsets: Vec<u64> = got[&part]
        .iter()
        .map(|r| r.position.as_offset().unwrap() as u64)
        .collect();
    assert_eq!(
        offsets,
        vec![5, 6, 7],
        "latest: only the records after the join"
    );
    // Done through offset 6: the group's committed offset becomes 7.
    d.source
        .commit(&[Checkpoint::new(part.clone(), Position::from(6u64))])
        .await
        .unwrap();
    d.close().await;

    let mut d = Driver::open(KafkaSource::new(config()).unwrap(), 100).await;
    let got = d.read_until(std::slice::from_ref(&part), 1).await;
    assert_eq!(
        got[&part][0].position.as_offset(),
        Some(7),
        "the committed offset wins over auto_offset_reset"
    );
    d.close().await;
}

/// A sink 10× slower than the producer for longer than twice `max.poll.interval.ms`: the
/// member is never kicked out (the only rebalance is the initial assignment), memory stays
/// within the runtime's budget, and the lag is reported growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_never_gets_the_member_kicked_out() {
    use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink, NullSink};
    use flowgate_runtime::{Pipeline, RuntimeSettings, Shutdown};

    let topic = unique("slow-sink");
    create_topic(&topic, 4).await;
    // Producer: 2,000 records/s for the whole test.
    let producing = produce_paced(
        topic.clone(),
        2_000.0,
        Duration::from_secs(26),
        Some(64),
        vec![b'x'; 100],
    );
    // Sink: 200 records/s, whatever the concurrency.
    let sink = FaultInjectingSink::new(
        NullSink::default(),
        FaultConfig {
            capacity_per_sec: Some(200.0),
            ..Default::default()
        },
    );
    let budget = 1024 * 1024;
    let settings = RuntimeSettings {
        max_in_flight_per_partition: 200,
        max_buffer_bytes: budget,
        ..Default::default()
    };
    let pipeline = Pipeline::builder(unique("slow-group"))
        .source(KafkaSource::new(source_config(&topic, &unique("slow-group"))).unwrap())
        .sink(sink)
        .settings(settings)
        .build()
        .unwrap();
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run(Shutdown::after(Duration::from_secs(25))));
    let mut lag_samples = Vec::new();
    for _ in 0..24 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        lag_samples.push(stats.snapshot().lag);
    }
    let summary = run.await.unwrap().unwrap();
    let sent = producing.await.unwrap();
    let s = summary.stats;
    assert_eq!(
        s.rebalances, 1,
        "only the initial assignment: the slow member was never kicked out of its group"
    );
    assert!(
        s.records_out > 1_000 && s.records_out < sent / 3,
        "the sink was slow: {} of {sent}",
        s.records_out
    );
    assert!(
        s.peak_partition_in_flight <= 200,
        "credit exceeded: {}",
        s.peak_partition_in_flight
    );
    assert!(
        s.peak_buffer_bytes <= budget as u64 + 200 * 1024,
        "byte budget exceeded: {}",
        s.peak_buffer_bytes
    );
    let (first, last) = (lag_samples[4], *lag_samples.last().unwrap());
    assert!(
        last > first + 10_000,
        "lag must be reported growing: {lag_samples:?}"
    );
    eprintln!(
        "kafka/slow-sink: sent {sent}, written {}, rebalances {}, peak buffer {} KiB, lag {first} -> {last}",
        s.records_out,
        s.rebalances,
        s.peak_buffer_bytes / 1024
    );
}

/// Cooperative rebalance while records are in flight: a second member joins (partitions move
/// to it, drained and committed first) and leaves again (they move back). Both members share
/// one checkpoint store, which refuses any write moving a checkpoint backwards, so a commit
/// for a partition no longer owned would stop a pipeline. Afterwards every record was written
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_join_and_leave_lose_nothing_and_commit_nothing_stale() {
    use std::collections::HashMap;
    use std::sync::Arc;

    use flowgate_checkpoint::MemoryStore;
    use flowgate_core::CheckpointStore;
    use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink, MemorySink};
    use flowgate_runtime::{Pipeline, Shutdown};

    let topic = unique("coop");
    create_topic(&topic, 4).await;
    produce(&topic, 4, 5_000).await;
    let group = unique("coop-group");
    let store = Arc::new(MemoryStore::new());
    let member = |sink: MemorySink| {
        Pipeline::builder(group.clone())
            .source(KafkaSource::new(source_config(&topic, &group)).unwrap())
            .sink(FaultInjectingSink::new(
                sink,
                FaultConfig {
                    capacity_per_sec: Some(2_000.0),
                    ..Default::default()
                },
            ))
            .checkpoint_store(store.clone())
            .build()
            .unwrap()
    };
    let (out_a, out_b) = (MemorySink::new(), MemorySink::new());
    let a = member(out_a.clone());
    let stats_a = a.stats();
    let (stop_a, shutdown_a) = Shutdown::manual();
    let run_a = tokio::spawn(a.run(shutdown_a));
    let wait = |what: &'static str, f: Box<dyn Fn() -> bool + Send>| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let oa = out_a.clone();
    wait("member A to start", Box::new(move || oa.len() > 2_000)).await;

    let b = member(out_b.clone());
    let stats_b = b.stats();
    let (stop_b, shutdown_b) = Shutdown::manual();
    let run_b = tokio::spawn(b.run(shutdown_b));
    let ob = out_b.clone();
    wait(
        "member B to receive partitions",
        Box::new(move || ob.len() > 1_500),
    )
    .await;
    stop_b.trigger();
    let summary_b = run_b
        .await
        .unwrap()
        .expect("member B ran without a stale commit");

    let (oa, ob) = (out_a.clone(), out_b.clone());
    wait(
        "every record",
        Box::new(move || oa.len() + ob.len() >= 20_000),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_a.trigger();
    let summary_a = run_a
        .await
        .unwrap()
        .expect("member A ran without a stale commit");

    let mut seen: HashMap<(PartitionId, Position), usize> = HashMap::new();
    for r in out_a.records().into_iter().chain(out_b.records()) {
        *seen.entry((r.partition, r.position)).or_default() += 1;
    }
    assert_eq!(seen.len(), 20_000, "no record lost");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "kafka/cooperative: A wrote {}, B wrote {}, duplicates {duplicates}, rebalances A {} B {}",
        out_a.len(),
        out_b.len(),
        stats_a.snapshot().rebalances,
        stats_b.snapshot().rebalances
    );
    assert_eq!(
        duplicates, 0,
        "revocations drain and commit before release: nothing is written twice"
    );
    assert!(
        summary_a.stats.rebalances >= 3,
        "A saw its partitions revoked and given back"
    );
    assert!(summary_b.stats.rebalances >= 1);
    let cps = store.load(&group).await.unwrap();
    assert_eq!(cps.len(), 4);
    // Every checkpoint is fenced with the generation that handed its partition out: A's first
    // join, B's join and B's leave make at least three, and the partitions B held came back to
    // A in the last one. A member of an older generation (a zombie that missed the rebalance)
    // can no longer write them.
    let fences: Vec<u64> = cps.iter().map(|c| c.fence.expect("fenced")).collect();
    eprintln!("kafka/cooperative: checkpoint fences (group generations) {fences:?}");
    let newest = cps.iter().max_by_key(|c| c.fence).unwrap();
    assert!(newest.fence >= Some(3), "{fences:?}");
    let zombie = flowgate_core::Checkpoint::new(
        newest.partition.clone(),
        Position::from(newest.position.as_u64().unwrap() + 100),
    )
    .with_fence(newest.fence.map(|g| g - 1));
    let refused = store.commit(&group, &[zombie]).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        flowgate_core::ErrorKind::Fenced,
        "{refused}"
    );
}

/// Three members of one group, one of them very slow: nobody is kicked out (no rebalance once
/// all three have joined, although the slow one holds its records far longer than
/// `max.poll.interval.ms`), and the two others keep their partitions and keep progressing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_member_of_three_does_not_stall_the_others() {
    use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink, NullSink};
    use flowgate_runtime::{Pipeline, RuntimeSettings, Shutdown};

    let topic = unique("three");
    create_topic(&topic, 6).await;
    let producing = produce_paced(
        topic.clone(),
        1_500.0,
        Duration::from_secs(40),
        None,
        b"x".to_vec(),
    );
    let group = unique("three-group");
    let mut runs = Vec::new();
    let mut stats = Vec::new();
    let mut triggers = Vec::new();
    for capacity in [5_000.0, 5_000.0, 10.0] {
        let p = Pipeline::builder(group.clone())
            .source(KafkaSource::new(source_config(&topic, &group)).unwrap())
            .sink(FaultInjectingSink::new(
                NullSink::default(),
                FaultConfig {
                    capacity_per_sec: Some(capacity),
                    ..Default::default()
                },
            ))
            .settings(RuntimeSettings {
                max_in_flight_per_partition: 100,
                ..Default::default()
            })
            .build()
            .unwrap();
        stats.push(p.stats());
        let (t, s) = Shutdown::manual();
        triggers.push(t);
        runs.push(tokio::spawn(p.run(s)));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let the group settle (cooperative rebalancing takes two rounds per join): the rebalance
    // counts unchanged for 3 s and every member writing. Then watch for twice
    // max.poll.interval.ms.
    let counts = || {
        stats
            .iter()
            .map(|s| s.snapshot().rebalances)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = counts();
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(3)
        || stats.iter().any(|s| s.snapshot().records_out == 0)
    {
        assert!(
            Instant::now() < deadline,
            "the group did not settle: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = counts();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    let settled: Vec<_> = stats.iter().map(|s| s.snapshot()).collect();
    tokio::time::sleep(Duration::from_secs(21)).await;
    let end: Vec<_> = stats.iter().map(|s| s.snapshot()).collect();
    for t in &triggers {
        t.trigger();
    }
    for r in runs {
        r.await.unwrap().expect("member ran");
    }
    producing.abort();
    for i in 0..3 {
        eprintln!(
            "kafka/three: member {i}: rebalances {} -> {}, written {} -> {}",
            settled[i].rebalances, end[i].rebalances, settled[i].records_out, end[i].records_out
        );
    }
    for i in 0..3 {
        assert_eq!(
            settled[i].rebalances, end[i].rebalances,
            "member {i}: no rebalance after the group settled"
        );
    }
    for i in 0..2 {
        assert!(
            end[i].records_out > settled[i].records_out + 5_000,
            "member {i} kept progressing"
        );
    }
}

/// The group's committed offset per partition (an unsubscribed reader).
fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .collect()
}

/// Every payload of a topic read from the start with the given isolation level, counted.
fn read_payloads(topic: &str, isolation: &str) -> std::collections::HashMap<String, u32> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("bridge-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    reader.subscribe(&[topic]).unwrap();
    let mut seen = std::collections::HashMap::new();
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(4) {
        if let Some(m) = reader.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            *seen.entry(payload).or_insert(0) += 1;
            idle = Instant::now();
        }
    }
    seen
}

/// Kafka→Kafka with the transactional sink: three runs are cut short (the task aborted
/// mid-stream: no drain, no close, a transaction left open), a fourth runs to the end. A
/// read_committed reader of the output sees every input record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_kafka_bridge_with_transactions_is_exactly_once() {
    use flowgate_runtime::{Pipeline, Shutdown};
    let (input, output) = (unique("bridge-in"), unique("bridge-out"));
    let (partitions, per_partition) = (4, 5_000);
    create_topic(&input, partitions).await;
    create_topic(&output, partitions).await;
    produce(&input, partitions, per_partition).await;
    let group = unique("bridge-group");
    let transactional_id = unique("bridge-tx");
    let build = || {
        let source = KafkaSource::new(source_config(&input, &group)).unwrap();
        let link = source.offsets_link();
        let sink = KafkaSink::new(KafkaSinkConfig {
            bootstrap_servers: bootstrap(),
            topic: Some(output.clone()),
            transactional_id: Some(transactional_id.clone()),
            ..Default::default()
        })
        .unwrap()
        .with_offsets_of(link)
        .unwrap();
        Pipeline::builder(group.clone())
            .source(source)
            .sink(sink)
            .build()
            .unwrap()
    };
    let total = (partitions as usize * per_partition) as u64;
    for cut in [2_000u64, 3_500, 5_000] {
        let pipeline = build();
        let stats = pipeline.stats();
        let (_trigger, shutdown) = Shutdown::manual();
        let run = tokio::spawn(pipeline.run(shutdown));
        let started = Instant::now();
        while stats.snapshot().records_out < cut {
            assert!(
                !run.is_finished(),
                "the run stopped by itself: {:?}",
                run.await
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no progress: {:?}",
                stats.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        run.abort();
        let _ = run.await;
        eprintln!(
            "kafka/bridge: run cut after {} records written; committed {:?}",
            stats.snapshot().records_out,
            committed(&group, &input, partitions)
        );
    }
    let pipeline = build();
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipeline.run(shutdown));
    let started = Instant::now();
    while committed(&group, &input, partitions)
        .iter()
        .any(|o| *o < per_partition as i64)
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the last run did not finish: committed {:?}",
            committed(&group, &input, partitions)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    trigger.trigger();
    run.await.unwrap().unwrap();

    let seen = tokio::task::spawn_blocking({
        let output = output.clone();
        move || read_payloads(&output, "read_committed")
    })
    .await
    .unwrap();
    let uncommitted: u32 = tokio::task::spawn_blocking({
        let output = output.clone();
        move || read_payloads(&output, "read_uncommitted").values().sum()
    })
    .await
    .unwrap();
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicates in the output: {dups:?}");
    for p in 0..partitions {
        for i in 0..per_partition {
            assert!(seen.contains_key(&format!("p{p}-{i}")), "p{p}-{i} lost");
        }
    }
    assert_eq!(seen.len() as u64, total);
    eprintln!(
        "kafka/bridge: {total} records in, {total} out exactly once (read_committed); a read_uncommitted reader sees {uncommitted} (aborted writes of the cut runs included)"
    );
}
