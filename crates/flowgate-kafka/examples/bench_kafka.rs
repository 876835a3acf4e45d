//! Harness of `cargo xtask bench kafka`: a raw rdkafka consumer loop against the flowgate
//! Kafka source, on the same pre-filled topic.
//!
//! ```text
//! bench_kafka fill TOPIC RECORDS            create a 4-partition topic, produce 100-byte records
//! bench_kafka raw TOPIC RECORDS             BaseConsumer loop: count, commit at the end
//! bench_kafka flowgate TOPIC RECORDS        KafkaSource -> null sink, checkpoints every 1000
//! bench_kafka flowgate-dedup TOPIC RECORDS  the same with dedup by source position
//! ```
//! Prints `mode records seconds records_per_second`, seconds from the client's creation to the last
//! record (group join included, close excluded). Bootstrap: FLOWGATE_TEST_KAFKA_BOOTSTRAP.
//!
//! Knobs for investigating (environment): `BENCH_PROPS=k=v,…` librdkafka properties of the
//! flowgate source, `BENCH_RAW_PROPS=k=v,…` of the raw loop, `BENCH_QKB` the source's
//! `queued_max_messages_kbytes`, `BENCH_COMMIT_EVERY` the runtime's commit cadence,
//! `BENCH_TRACE=1` a stats line per second. Mode `flowgate-nostore` runs without a store;
//! mode `source-only` drives `KafkaSource::next` alone with unlimited credit (no runtime).
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

async fn fill(topic: &str, records: u64) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin");
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic")
    {
        r.expect("topic created");
    }
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

fn raw(started: Instant, topic: &str, records: u64) -> (u64, Duration) {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap())
        .set("group.id", group("raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    if let Ok(list) = std::env::var("BENCH_RAW_PROPS") {
        for kv in list.split(',') {
            if let Some((k, v)) = kv.split_once('=') {
                cc.set(k, v);
            }
        }
    }
    let consumer: BaseConsumer = cc.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut n = 0;
    while n < records {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m.expect("message");
            n += 1;
        }
    }
    let done = started.elapsed();
    // With `enable.auto.offset.store=false` in BENCH_RAW_PROPS nothing is stored to commit.
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        eprintln!("raw: final commit: {e}");
    }
    (n, done)
}

/// The source's configuration, with the investigation knobs applied.
fn source_config(topic: &str) -> KafkaSourceConfig {
    let mut cfg = KafkaSourceConfig {
        bootstrap_servers: bootstrap(),
        topics: vec![topic.to_string()],
        properties: std::env::var("BENCH_PROPS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    if let Some(kb) = std::env::var("BENCH_QKB").ok().and_then(|v| v.parse().ok()) {
        cfg.queued_max_messages_kbytes = kb;
    }
    cfg
}

async fn flowgate(
    started: Instant,
    topic: &str,
    records: u64,
    dedup: bool,
    store_on: bool,
) -> (u64, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open_dir(dir.path()).await.expect("store"));
    let sink = NullSink::default();
    let mut b = Pipeline::builder(group("flowgate"))
        .source(KafkaSource::new(source_config(topic)).expect("source"))
        .sink(sink.clone())
        .settings(flowgate_runtime::RuntimeSettings {
            commit: flowgate_runtime::CommitSettings {
                every_records: std::env::var("BENCH_COMMIT_EVERY")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000),
                ..Default::default()
            },
            ..Default::default()
        });
    if store_on {
        b = b.checkpoint_store(store.clone());
    }
    if dedup {
        b = b.dedup(store, KeyExtractor::SourcePosition);
    }
    let pipeline = b.build().expect("pipeline");
    let (trigger, shutdown) = Shutdown::manual();
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run(shutdown));
    if std::env::var_os("BENCH_TRACE").is_some() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let s = stats.snapshot();
                eprintln!(
                    "in {} out {} in_flight {} peak/part {} conc {} lag {}",
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
    while sink.records() < records {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let done = started.elapsed();
    let t0 = Instant::now();
    trigger.trigger();
    run.await.expect("join").expect("run");
    eprintln!("shutdown took {:?}", t0.elapsed());
    (sink.records(), done)
}

/// The source alone, driven like the runtime would with unlimited credit.
async fn source_only(started: Instant, topic: &str, records: u64) -> (u64, Duration) {
    use flowgate_core::{Credits, Source, SourceContext, SourceEvent, StartPosition};
    let mut source = KafkaSource::new(source_config(topic)).expect("source");
    let credits = Credits::new();
    source
        .open(SourceContext {
            pipeline: group("source-only"),
            credits: credits.clone(),
        })
        .await
        .expect("open");
    let mut n = 0;
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
            SourceEvent::Records(rs) => n += rs.len() as u64,
            _ => {}
        }
    }
    let done = started.elapsed();
    source.close().await.expect("close");
    (n, done)
}

fn main() {
    // RUST_LOG=… shows the source's and librdkafka's logs (with `debug=…` in BENCH_PROPS).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, topic, records) = match args.as_slice() {
        [m, t, n] => (m.as_str(), t.as_str(), n.parse::<u64>().expect("RECORDS")),
        _ => panic!("usage: bench_kafka fill|raw|flowgate|flowgate-dedup TOPIC RECORDS"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // From the client's creation to the last record (group join included, close excluded:
    // the same for every mode).
    let started = Instant::now();
    let (n, took) = rt.block_on(async {
        match mode {
            "fill" => {
                fill(topic, records).await;
                (records, started.elapsed())
            }
            "raw" => raw(started, topic, records),
            "flowgate" => flowgate(started, topic, records, false, true).await,
            "flowgate-dedup" => flowgate(started, topic, records, true, true).await,
            "flowgate-nostore" => flowgate(started, topic, records, false, false).await,
            "source-only" => source_only(started, topic, records).await,
            other => panic!("unknown mode {other}"),
        }
    });
    let secs = took.as_secs_f64();
    println!("{mode} {n} {secs:.3} {:.0}", n as f64 / secs);
}
