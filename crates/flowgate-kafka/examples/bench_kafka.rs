//! Harness of `cargo xtask bench kafka`: a raw rdkafka consumer loop against the flowgate
//! Kafka source, on the same pre-filled topic.
//!
//! ```text
//! bench_kafka fill TOPIC RECORDS            create a 4-partition topic, produce 100-byte records
//! bench_kafka raw TOPIC RECORDS             BaseConsumer loop: count, commit at the end
//! bench_kafka raw-tuned TOPIC RECORDS       the same with the source's fetch settings
//! bench_kafka raw-stream TOPIC RECORDS      the same with a StreamConsumer (async stream)
//! bench_kafka flowgate TOPIC RECORDS        KafkaSource -> null sink, checkpoints every 1000
//! bench_kafka flowgate-dedup TOPIC RECORDS  the same with dedup by source position
//! bench_kafka flowgate-endpoint TOPIC RECORDS  `flowgate` with the metrics endpoint on and
//!                                           its /metrics and /status read every second
//! bench_kafka produce TOPIC RECORDS RATE [stamp]  paced producer (stamp: send time in payload)
//! bench_kafka slow-rss TOPIC RECORDS RATE   peak RSS while a producer at RATE outruns a sink
//!                                           at RATE/10 (backlog grows to RECORDS)
//! bench_kafka latency TOPIC RATE SECONDS    end-to-end latency at RATE records/s
//! bench_kafka latency-raw TOPIC RATE SECONDS  the same through a raw BaseConsumer loop
//! bench_kafka capacity TOPIC RECORDS        the latency pipeline behind an unpaced producer:
//!                                           the rate the whole machine delivers end to end
//! bench_kafka drop PREFIX 0                 delete every topic whose name starts with PREFIX
//! ```
//! A flowgate mode (and `slow-rss`) may end in `@N`: the source's `prefetch_records` set to N.
//!
//! Prints `mode records seconds records_per_second steady_records_per_second
//! seconds_to_first_record cpu_us_per_record`: seconds from the client's creation to the last
//! record (group join included, close excluded), the rate from the first record to the last,
//! and the process's CPU time (user + system) per record. Bootstrap:
//! FLOWGATE_TEST_KAFKA_BOOTSTRAP.
//!
//! Knobs for investigating (environment): `BENCH_PROPS=k=v;…` librdkafka properties of the
//! flowgate source, `BENCH_RAW_PROPS=k=v;…` of the raw loop, `BENCH_PRODUCER_PROPS=k=v;…` of
//! the producer, `BENCH_WORKERS` the tokio worker threads (2), `BENCH_QKB` the source's
//! `queued_max_messages_kbytes`, `BENCH_COMMIT_EVERY` the runtime's commit cadence,
//! `BENCH_TRACE=MS` a stats line every MS milliseconds, `BENCH_DEDUP_STORE=memory` dedup marks
//! in memory (no fsync), `=separate` in an embedded store of their own, `BENCH_MARK_INTERVAL_US`
//! the runtime's `dedup_mark_interval`. Mode `flowgate-nostore` runs without a store;
//! `BENCH_COMMIT_MIN_US` the runtime's `commit.min_interval` (throughput modes: 0, latency
//! runs: the default), `BENCH_NO_STORE=1` latency runs without a checkpoint store (Kafka commits only);
//! mode `source-only` drives `KafkaSource::next` alone with unlimited credit (no runtime);
//! `BENCH_PACE_US` how often the paced producer wakes to send what fell due (1000),
//! `BENCH_LINGER_US` the runtime's batch linger in latency runs (5000).
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_checkpoint::EmbeddedStore;
use flowgate_kafka::{KafkaSource, KafkaSourceConfig};
use flowgate_runtime::adapters::NullSink;
use flowgate_runtime::{KeyExtractor, Pipeline, Shutdown};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

fn bootstrap() -> String {
    std::env::var("FLOWGATE_TEST_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn group(mode: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("bench-{mode}-{nanos}")
}

/// Deletes every topic whose name starts with `prefix` (the bench's topics hold gigabytes).
async fn drop_topics(prefix: &str) -> u64 {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin");
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let names: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    if !refs.is_empty() {
        for r in admin
            .delete_topics(&refs, &AdminOptions::new())
            .await
            .expect("delete topics")
        {
            if let Err((name, e)) = r {
                eprintln!("cannot delete {name}: {e}");
            }
        }
    }
    refs.len() as u64
}

async fn create_topic(topic: &str) {
    create_topic_with(topic, &[]).await;
}

/// A 4-partition topic with the given topic configuration.
async fn create_topic_with(topic: &str, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin");
    let mut new = NewTopic::new(topic, 4, TopicReplication::Fixed(1));
    for (k, v) in config {
        new = new.set(k, v);
    }
    for r in admin
        .create_topics(&[new], &AdminOptions::new())
        .await
        .expect("create topic")
    {
        r.expect("topic created");
    }
}

async fn fill(topic: &str, records: u64) {
    create_topic(topic).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let payload = vec![b'x'; 100];
    let mut pending = Vec::new();
    for i in 0..records {
        let key = format!("k{}", i % 1024);
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err(_) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        if pending.len() >= 100_000 {
            for f in pending.drain(..) {
                let _ = f.await;
            }
        }
    }
    for f in pending {
        let _ = f.await;
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

fn raw(started: Instant, topic: &str, records: u64, tuned: bool) -> Run {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap())
        .set("group.id", group("raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    if tuned {
        // The source's own fetch settings (KafkaSourceConfig's defaults), so the ratio to this
        // loop is what the runtime costs: librdkafka's defaults (a 1 s backoff for a full
        // prefetch, a 500 ms long poll) make the default loop's rate erratic.
        cc.set("fetch.queue.backoff.ms", "1")
            .set("fetch.wait.max.ms", "100")
            .set("queued.min.messages", "5000")
            .set("queued.max.messages.kbytes", "4096")
            .set("fetch.max.bytes", "8388608");
    }
    for (k, v) in env_props("BENCH_RAW_PROPS") {
        cc.set(k, v);
    }
    let consumer: BaseConsumer = cc.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut n = 0;
    let mut first = None;
    while n < records {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m.expect("message");
            n += 1;
            first.get_or_insert_with(|| started.elapsed());
        }
    }
    let done = started.elapsed();
    // With `enable.auto.offset.store=false` in BENCH_RAW_PROPS nothing is stored to commit.
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        eprintln!("raw: final commit: {e}");
    }
    Run::new(n, first, done)
}

/// The raw loop with rust-rdkafka's `StreamConsumer` (messages as an async stream), to
/// compare with `BaseConsumer`'s poll loop.
async fn raw_stream(started: Instant, topic: &str, records: u64) -> Run {
    use futures_util::StreamExt;
    use rdkafka::consumer::StreamConsumer;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group("raw-stream"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut n = 0;
    let mut first = None;
    {
        let mut stream = consumer.stream();
        while n < records {
            match stream.next().await {
                Some(m) => {
                    m.expect("message");
                    n += 1;
                    first.get_or_insert_with(|| started.elapsed());
                }
                None => break,
            }
        }
    }
    let done = started.elapsed();
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        eprintln!("raw-stream: final commit: {e}");
    }
    Run::new(n, first, done)
}

/// A measured run: records, when the first arrived, when the last did (from the client's
/// creation).
struct Run {
    records: u64,
    first: Duration,
    last: Duration,
}

impl Run {
    fn new(records: u64, first: Option<Duration>, last: Duration) -> Self {
        Run {
            records,
            first: first.unwrap_or(last),
            last,
        }
    }
}

/// A number from the environment (an investigation knob), else `default`.
/// librdkafka properties from an environment variable holding `k=v;k=v`.
fn env_props(name: &str) -> Vec<(String, String)> {
    std::env::var(name)
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `prefetch_records` of the source, from a mode's `@N` suffix.
static PREFETCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// The source's configuration, with the investigation knobs applied.
fn source_config(topic: &str) -> KafkaSourceConfig {
    let mut cfg = KafkaSourceConfig {
        bootstrap_servers: bootstrap(),
        topics: vec![topic.to_string()],
        properties: env_props("BENCH_PROPS").into_iter().collect(),
        ..Default::default()
    };
    if let Some(kb) = std::env::var("BENCH_QKB").ok().and_then(|v| v.parse().ok()) {
        cfg.queued_max_messages_kbytes = kb;
    }
    if let Some(n) = PREFETCH.get() {
        cfg.prefetch_records = *n;
    }
    cfg
}

/// The endpoint on (its Prometheus recorder records every metric) and a scraper reading
/// `/metrics` and `/status` every second until the returned guard drops.
async fn observed() -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let settings = flowgate_runtime::EndpointSettings {
        listen: Some("127.0.0.1:0".parse().expect("address")),
        ..Default::default()
    };
    let endpoint = flowgate_runtime::Endpoint::start(&settings, "bench")
        .await
        .expect("endpoint");
    let addr = endpoint.local_addr();
    tokio::spawn(async move {
        let _endpoint = endpoint;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for path in ["/metrics", "/status"] {
                let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let request =
                    format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
                conn.write_all(request.as_bytes()).await.expect("request");
                let mut body = Vec::new();
                conn.read_to_end(&mut body).await.expect("response");
            }
        }
    })
}

async fn flowgate(started: Instant, topic: &str, records: u64, dedup: bool, store_on: bool) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.expect("store"));
    let sink = NullSink::default();
    let mut b = Pipeline::builder(group("flowgate"))
        .source(KafkaSource::new(source_config(topic)).expect("source"))
        .sink(sink.clone())
        .settings(flowgate_runtime::RuntimeSettings {
            // The issue's (b): a checkpoint every 1000 records, no time floor.
            commit: flowgate_runtime::CommitSettings {
                every_records: env_or("BENCH_COMMIT_EVERY", 1000),
                min_interval: Duration::from_micros(env_or("BENCH_COMMIT_MIN_US", 0)),
                ..Default::default()
            },
            batch: flowgate_runtime::BatchSettings {
                max_records: env_or("BENCH_BATCH", 500),
                linger: Duration::from_micros(env_or(
                    "BENCH_LINGER_US",
                    flowgate_runtime::BatchSettings::default()
                        .linger
                        .as_micros() as u64,
                )),
                ..Default::default()
            },
            max_in_flight_per_partition: env_or("BENCH_INFLIGHT", 10_000),
            dedup_mark_interval: Duration::from_micros(env_or(
                "BENCH_MARK_INTERVAL_US",
                flowgate_runtime::RuntimeSettings::default()
                    .dedup_mark_interval
                    .as_micros() as u64,
            )),
            ..Default::default()
        });
    if store_on {
        b = b.checkpoint_store(store.clone());
    }
    if dedup {
        // BENCH_DEDUP_STORE=memory: marks in memory (no fsync), to tell the store's cost from
        // the runtime's.
        let which = std::env::var("BENCH_DEDUP_STORE").unwrap_or_default();
        if which == "memory" {
            b = b.dedup(
                Arc::new(flowgate_checkpoint::MemoryStore::default()),
                KeyExtractor::SourcePosition,
            );
        } else if which == "separate" {
            let d = dir.path().join("dedup");
            let other = Arc::new(EmbeddedStore::open_dir(&d).await.expect("store"));
            b = b.dedup(other, KeyExtractor::SourcePosition);
        } else {
            b = b.dedup(store, KeyExtractor::SourcePosition);
        }
    }
    let pipeline = b.build().expect("pipeline");
    let (trigger, shutdown) = Shutdown::manual();
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run(shutdown));
    if let Some(every) = std::env::var("BENCH_TRACE")
        .ok()
        .map(|v| Duration::from_millis(v.parse().unwrap_or(1000)))
    {
        // A thread of its own: a task waking the runtime would change what is measured.
        let t0 = Instant::now();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(every);
                let s = stats.snapshot();
                eprintln!(
                    "{:>5}ms in {} out {} in_flight {} peak/part {} conc {} lag {}",
                    t0.elapsed().as_millis(),
                    s.records_in,
                    s.records_out,
                    s.in_flight,
                    s.peak_partition_in_flight,
                    s.concurrency,
                    s.lag
                );
            }
        });
    }
    let mut first = None;
    while sink.records() < records {
        if first.is_none() && sink.records() > 0 {
            first = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let done = started.elapsed();
    let t0 = Instant::now();
    trigger.trigger();
    run.await.expect("join").expect("run");
    eprintln!("shutdown took {:?}", t0.elapsed());
    Run::new(sink.records(), first, done)
}

/// The source alone, driven like the runtime would with unlimited credit.
async fn source_only(started: Instant, topic: &str, records: u64) -> Run {
    use flowgate_core::{Credits, Source, SourceContext, SourceEvent, StartPosition};
    let mut source = KafkaSource::new(source_config(topic)).expect("source");
    let credits = Credits::new();
    source
        .open(SourceContext::new(group("source-only"), credits.clone()))
        .await
        .expect("open");
    let mut n = 0;
    let mut first = None;
    while n < records {
        match source.next().await.expect("next") {
            SourceEvent::Assigned(a) => {
                for x in &a {
                    credits.set(&x.partition, usize::MAX / 2);
                }
                source
                    .start(
                        a.into_iter()
                            .map(|x| StartPosition {
                                partition: x.partition,
                                after: None,
                            })
                            .collect(),
                    )
                    .await
                    .expect("start");
            }
            SourceEvent::Records(rs) => {
                first.get_or_insert_with(|| started.elapsed());
                n += rs.len() as u64;
            }
            _ => {}
        }
    }
    let done = started.elapsed();
    source.close().await.expect("close");
    Run::new(n, first, done)
}

/// CPU time (user + system) this process used so far, from `/proc/self/stat` (clock ticks
/// of 10 ms: the runs are long enough for that to be noise).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The machine's CPU time so far, from the `cpu` line of `/proc/stat` (clock ticks): busy
/// (user, nice, system, irq, softirq), I/O wait, stolen by the hypervisor, and the total.
#[derive(Clone, Copy)]
struct MachineTicks {
    busy: u64,
    iowait: u64,
    steal: u64,
    total: u64,
}

impl MachineTicks {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        MachineTicks {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            iowait: at(4),
            steal: at(7),
            total: (0..8).map(at).sum(),
        }
    }

    /// Shares (%) of the machine's CPU time between `self` and `later`: busy, I/O wait,
    /// stolen. A run whose tail is the host's or the disk's shows it here.
    fn shares(self, later: MachineTicks) -> (f64, f64, f64) {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let pct = |a: u64, b: u64| b.saturating_sub(a) as f64 * 100.0 / total;
        (
            pct(self.busy, later.busy),
            pct(self.iowait, later.iowait),
            pct(self.steal, later.steal),
        )
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// A producer paced at `rate` records/s (100-byte payloads; with `stamp`, the first 8 bytes
/// are the send time in nanoseconds). Prints the rate it achieved.
fn produce(topic: &str, records: u64, rate: f64, stamp: bool) {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
    // Latency runs: 2 ms linger. At 450,000 records/s, 1 ms doubles the produce requests the
    // broker handles on the shared cores and its p99 (raw loop, alternate runs: 14–59 ms with
    // 1 ms, 8–14 ms with 2 ms); 0 overloads the broker.
    //
    // A paced producer is the load, not the system under test, yet it shares the two cores
    // with the broker and the consumer: at 440,000 records/s it used more CPU than either. So
    // it asks for delivery reports of failed records only (the others would cross to its poll
    // thread one by one), and wakes every millisecond rather than every 200 µs to send what
    // fell due. Each record is still stamped when it is handed to librdkafka, and the 2 ms
    // linger batches across the bursts anyway. Measured, four alternating pairs of raw-loop
    // runs at 440,000/s: producer 384–508 ms of CPU a second against 468–528, broker 484–512
    // against 548–580, cores 63–65 % busy against 68–71 %. The unpaced producer of capacity
    // runs keeps every delivery report, as before: six alternating pairs measured
    // 543,000–737,000 records/s with failed reports only against 619,000–775,000 with all,
    // too close to call, and "half capacity" must not move because the load generator
    // changed.
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap())
        .set("linger.ms", if stamp { "2" } else { "20" })
        .set("queue.buffering.max.messages", "1000000");
    if rate.is_finite() {
        cc.set("delivery.report.only.error", "true");
    }
    for (k, v) in env_props("BENCH_PRODUCER_PROPS") {
        cc.set(k, v);
    }
    let producer: ThreadedProducer<DefaultProducerContext> = cc.create().expect("producer");
    let started = Instant::now();
    let mut payload = vec![b'x'; 100];
    // Keys made once: the producer shares the machine's two cores with the broker and the
    // consumer under test, so it should spend as little as it can per record.
    let keys: Vec<String> = (0..1024).map(|i| format!("k{i}")).collect();
    let mut sent = 0u64;
    let pace = Duration::from_micros(env_or("BENCH_PACE_US", 1000));
    while sent < records {
        let due = ((started.elapsed().as_secs_f64() * rate) as u64).min(records);
        if sent >= due {
            std::thread::sleep(pace);
            continue;
        }
        while sent < due {
            if stamp {
                payload[..8].copy_from_slice(&now_nanos().to_le_bytes());
            }
            let key = &keys[(sent % 1024) as usize];
            match producer.send(BaseRecord::to(topic).key(key).payload(&payload)) {
                Ok(()) => sent += 1,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(1));
                    break;
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "producer: {sent} records in {secs:.1} s ({:.0}/s)",
        sent as f64 / secs
    );
}

/// This harness again, as a separate producer process (its memory is not the consumer's).
fn spawn_producer(topic: &str, records: u64, rate: f64, stamp: bool) -> std::process::Child {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["produce", topic, &records.to_string(), &rate.to_string()]);
    if stamp {
        cmd.arg("stamp");
    }
    cmd.spawn().expect("spawn the producer")
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Peak RSS of source -> (sink at rate/10) while a producer at `rate` builds a backlog.
async fn slow_rss(topic: &str, records: u64, rate: f64) {
    use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink};
    create_topic(topic).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.expect("store"));
    let sink = FaultInjectingSink::new(
        NullSink::default(),
        FaultConfig {
            capacity_per_sec: Some(rate / 10.0),
            ..Default::default()
        },
    );
    let pipeline = Pipeline::builder(group("slow-rss"))
        .source(KafkaSource::new(source_config(topic)).expect("source"))
        .sink(sink)
        .checkpoint_store(store)
        .settings(flowgate_runtime::RuntimeSettings {
            max_in_flight_per_partition: std::env::var("BENCH_INFLIGHT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10_000),
            ..Default::default()
        })
        .build()
        .expect("pipeline");
    let (trigger, shutdown) = Shutdown::manual();
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run(shutdown));
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "slow-rss: RSS before the producer starts {:.1} MiB",
        rss_mib()
    );
    let mut child = spawn_producer(topic, records, rate, false);
    let started = Instant::now();
    let cpu0 = cpu_seconds();
    let mut samples: Vec<(f64, f64)> = Vec::new();
    while child.try_wait().expect("producer").is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push((started.elapsed().as_secs_f64(), rss_mib()));
    }
    // One more lag sample after the producer finished.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = stats.snapshot();
    let cpu = cpu_seconds() - cpu0;
    let peak = samples.iter().map(|x| x.1).fold(0.0, f64::max);
    let quarter = |q: usize| {
        samples
            .get((samples.len() * q / 4).min(samples.len().saturating_sub(1)))
            .map_or(0.0, |x| x.1)
    };
    println!(
        "slow-rss produced={records} seconds={:.1} consumed={} lag={} peak_rss_mib={peak:.1} rss_mib_at_25_50_75_100={:.1},{:.1},{:.1},{:.1} peak_buffer_kib={} cpu_percent={:.0}",
        started.elapsed().as_secs_f64(),
        s.records_out,
        s.lag,
        quarter(1),
        quarter(2),
        quarter(3),
        quarter(4),
        s.peak_buffer_bytes / 1024,
        100.0 * cpu / started.elapsed().as_secs_f64(),
    );
    trigger.trigger();
    let _ = run.await;
}

/// Records how long each record took from the producer's send to the sink's write.
#[derive(Default)]
struct LatencySink {
    micros: std::sync::Mutex<Vec<u32>>,
    /// From the broker's append time (millisecond clock) to the sink, µs.
    from_broker: std::sync::Mutex<Vec<u32>>,
    records: std::sync::atomic::AtomicU64,
    /// Writes (batches) the sink received; the raw loop counts each record as one.
    writes: std::sync::atomic::AtomicU64,
    /// Records sent before this (nanoseconds) are warm-up, not sampled.
    from: std::sync::atomic::AtomicU64,
    /// When the first and the latest record arrived (nanoseconds; 0: none yet).
    first_ns: std::sync::atomic::AtomicU64,
    last_ns: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl flowgate_core::Sink for LatencySink {
    fn capabilities(&self) -> flowgate_core::SinkCapabilities {
        flowgate_core::SinkCapabilities::basic()
    }

    async fn write(
        &self,
        batch: &[flowgate_core::Record],
    ) -> Result<(), flowgate_core::WriteError> {
        let now = now_nanos();
        let mut micros = self.micros.lock().expect("lock");
        let mut broker = self.from_broker.lock().expect("lock");
        for r in batch {
            let appended = r
                .timestamp
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64);
            self.sample(&mut micros, &mut broker, &r.payload, appended, now);
        }
        drop((micros, broker));
        self.arrived(batch.len() as u64, now);
        Ok(())
    }
}

impl LatencySink {
    /// One record seen now (the raw loop's path).
    fn observe(&self, payload: &[u8], appended_ms: Option<i64>) {
        let now = now_nanos();
        let mut micros = self.micros.lock().expect("lock");
        let mut broker = self.from_broker.lock().expect("lock");
        self.sample(&mut micros, &mut broker, payload, appended_ms, now);
        drop((micros, broker));
        self.arrived(1, now);
    }

    fn arrived(&self, n: u64, now: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self.first_ns.compare_exchange(0, now, Relaxed, Relaxed);
        self.last_ns.store(now, Relaxed);
        self.records.fetch_add(n, Relaxed);
        self.writes.fetch_add(1, Relaxed);
    }

    /// Records per second from the first arrival to the last.
    fn delivered_per_s(&self) -> f64 {
        use std::sync::atomic::Ordering::Relaxed;
        let span = self
            .last_ns
            .load(Relaxed)
            .saturating_sub(self.first_ns.load(Relaxed));
        self.records.load(Relaxed).saturating_sub(1) as f64 / (span.max(1) as f64 / 1e9)
    }

    /// Samples a stamped payload received at `now`, unless it was sent during the warm-up.
    fn sample(
        &self,
        micros: &mut Vec<u32>,
        broker: &mut Vec<u32>,
        payload: &[u8],
        appended_ms: Option<i64>,
        now: u64,
    ) {
        let from = self.from.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(ts) = payload.get(..8) {
            let ts = u64::from_le_bytes(ts.try_into().expect("8 bytes"));
            if ts >= from {
                micros.push((now.saturating_sub(ts) / 1000) as u32);
                if let Some(ms) = appended_ms {
                    let at = (ms.max(0) as u64).saturating_mul(1_000_000);
                    broker.push((now.saturating_sub(at) / 1000) as u32);
                }
            }
        }
    }
}

/// End-to-end latency (producer send -> sink write) at `rate` records/s for `seconds`, the
/// first second excluded as warm-up.
/// A latency topic: its records carry the broker's append time, which splits the latency into
/// producer → broker and broker → sink (the part the consumer is responsible for).
async fn create_latency_topic(topic: &str) {
    create_topic_with(topic, &[("message.timestamp.type", "LogAppendTime")]).await;
}

/// End-to-end latency at `rate` records/s for `seconds`.
async fn latency(topic: &str, rate: f64, seconds: f64) {
    latency_pipeline("latency", topic, rate, (rate * seconds) as u64).await;
}

/// The latency pipeline behind a producer sending `records` as fast as it can: the rate the
/// machine delivers end to end (producer, broker and consumer share its cores).
async fn capacity(topic: &str, records: u64) {
    latency_pipeline("capacity", topic, f64::INFINITY, records).await;
}

async fn latency_pipeline(mode: &str, topic: &str, rate: f64, records: u64) {
    create_latency_topic(topic).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.expect("store"));
    let sink = Arc::new(LatencySink::default());
    let mut builder = Pipeline::builder(group("latency"))
        .source(
            KafkaSource::new(KafkaSourceConfig {
                auto_offset_reset: "latest".into(),
                ..source_config(topic)
            })
            .expect("source"),
        )
        .sink(sink.clone());
    // BENCH_NO_STORE=1: offsets committed to Kafka only, to tell the store's cost.
    if std::env::var_os("BENCH_NO_STORE").is_none() {
        builder = builder.checkpoint_store(store);
    }
    let pipeline = builder
        .settings(flowgate_runtime::RuntimeSettings {
            batch: flowgate_runtime::BatchSettings {
                linger: Duration::from_micros(env_or("BENCH_LINGER_US", 5000)),
                ..Default::default()
            },
            commit: flowgate_runtime::CommitSettings {
                every_records: env_or("BENCH_COMMIT_EVERY", 1000),
                min_interval: Duration::from_micros(env_or(
                    "BENCH_COMMIT_MIN_US",
                    flowgate_runtime::CommitSettings::default()
                        .min_interval
                        .as_micros() as u64,
                )),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .expect("pipeline");
    let (trigger, shutdown) = Shutdown::manual();
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run(shutdown));
    // Joined and assigned before the producer starts.
    let joined = Instant::now();
    while stats.snapshot().rebalances == 0 && joined.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (v, machine) = produce_and_wait(topic, rate, records, &sink).await;
    trigger.trigger();
    let _ = run.await;
    print_latency(mode, rate, &sink, v, machine);
}

/// The same measurement with a raw `BaseConsumer` loop (librdkafka defaults) in place of the
/// pipeline: the latency the client alone adds on this machine, for comparison.
async fn latency_raw(topic: &str, rate: f64, seconds: f64) {
    create_latency_topic(topic).await;
    let sink = Arc::new(LatencySink::default());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group("latency-raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, st) = (sink.clone(), stop.clone());
    let poller = std::thread::spawn(move || {
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(10)) {
                use rdkafka::Message;
                s.observe(m.payload().unwrap_or_default(), m.timestamp().to_millis());
            }
        }
    });
    let (v, machine) = produce_and_wait(topic, rate, (rate * seconds) as u64, &sink).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.join();
    print_latency("latency-raw", rate, &sink, v, machine);
}

/// Starts the stamped producer once the consumer had time to join, waits until every record
/// arrived (at most 30 s more), and returns the sampled latencies, sorted.
async fn produce_and_wait(
    topic: &str,
    rate: f64,
    records: u64,
    sink: &LatencySink,
) -> (Vec<u32>, (f64, f64, f64)) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = MachineTicks::now();
    sink.from.store(
        now_nanos() + 1_000_000_000,
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut child = spawn_producer(topic, records, rate, true);
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("producer");
    let machine = before.shares(MachineTicks::now());
    let waited = Instant::now();
    while sink.records.load(std::sync::atomic::Ordering::Relaxed) < records
        && waited.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut v = std::mem::take(&mut *sink.micros.lock().expect("lock"));
    v.sort_unstable();
    (v, machine)
}

/// The `p`-quantile of sorted samples.
fn quantile(v: &[u32], p: f64) -> u32 {
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Send → sink percentiles, and broker append → sink ones (`broker_…`: the consumer's part,
/// on the broker's millisecond clock), then the machine's shares of CPU time while the
/// producer ran (`machine_busy_pct`, `iowait_pct`, `steal_pct`, of both cores).
fn print_latency(
    mode: &str,
    rate: f64,
    sink: &LatencySink,
    v: Vec<u32>,
    (busy, iowait, steal): (f64, f64, f64),
) {
    let mut b = std::mem::take(&mut *sink.from_broker.lock().expect("lock"));
    b.sort_unstable();
    println!(
        "{mode} rate={rate:.0} delivered_per_s={:.0} sampled={} p50_us={} p99_us={} p999_us={} max_us={} broker_p50_us={} broker_p99_us={} cpu_us_per_record={:.2} records_per_write={:.1} machine_busy_pct={busy:.0} iowait_pct={iowait:.1} steal_pct={steal:.1}",
        sink.delivered_per_s(),
        v.len(),
        quantile(&v, 0.50),
        quantile(&v, 0.99),
        quantile(&v, 0.999),
        v.last().copied().unwrap_or_default(),
        quantile(&b, 0.50),
        quantile(&b, 0.99),
        cpu_seconds() * 1e6
            / sink
                .records
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1) as f64,
        sink.records.load(std::sync::atomic::Ordering::Relaxed) as f64
            / sink
                .writes
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1) as f64,
    );
}

fn main() {
    // RUST_LOG=… shows the source's and librdkafka's logs (with `debug=…` in BENCH_PROPS).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some((mode, prefetch)) = args.first().and_then(|m| m.split_once('@')) {
        let _ = PREFETCH.set(prefetch.parse().expect("a prefetch after @"));
        args[0] = mode.to_string();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_or("BENCH_WORKERS", 2))
        .enable_all()
        .build()
        .expect("runtime");
    let num = |s: &str| s.parse::<f64>().expect("a number");
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["produce", t, n, rate, rest @ ..] => {
            return produce(t, num(n) as u64, num(rate), rest.first() == Some(&"stamp"));
        }
        ["slow-rss", t, n, rate] => return rt.block_on(slow_rss(t, num(n) as u64, num(rate))),
        ["latency", t, rate, secs] => return rt.block_on(latency(t, num(rate), num(secs))),
        ["capacity", t, n] => return rt.block_on(capacity(t, num(n) as u64)),
        ["latency-raw", t, rate, secs] => {
            return rt.block_on(latency_raw(t, num(rate), num(secs)));
        }
        _ => {}
    }
    let (mode, topic, records) = match args.as_slice() {
        [m, t, n] => (m.as_str(), t.as_str(), n.parse::<u64>().expect("RECORDS")),
        _ => panic!("usage: see the module documentation of bench_kafka"),
    };

    // From the client's creation to the last record (group join included, close excluded:
    // the same for every mode); and from the first record to the last (the steady rate).
    let started = Instant::now();
    let run = rt.block_on(async {
        match mode {
            "fill" => {
                fill(topic, records).await;
                Run::new(records, None, started.elapsed())
            }
            "drop" => Run::new(drop_topics(topic).await, None, started.elapsed()),
            "raw" => raw(started, topic, records, false),
            "raw-tuned" => raw(started, topic, records, true),
            "raw-stream" => raw_stream(started, topic, records).await,
            "flowgate" => flowgate(started, topic, records, false, true).await,
            "flowgate-dedup" => flowgate(started, topic, records, true, true).await,
            "flowgate-nostore" => flowgate(started, topic, records, false, false).await,
            "flowgate-endpoint" => {
                let _scraped = observed().await;
                flowgate(started, topic, records, false, true).await
            }
            "source-only" => source_only(started, topic, records).await,
            other => panic!("unknown mode {other}"),
        }
    });
    let secs = run.last.as_secs_f64();
    let steady = (run.last - run.first).as_secs_f64().max(1e-3);
    // `mode records seconds rate steady-rate seconds-to-first-record cpu-µs-per-record`
    println!(
        "{mode} {} {secs:.3} {:.0} {:.0} {:.3} {:.3}",
        run.records,
        run.records as f64 / secs,
        run.records.saturating_sub(1) as f64 / steady,
        run.first.as_secs_f64(),
        cpu_seconds() * 1e6 / run.records.max(1) as f64
    );
}
