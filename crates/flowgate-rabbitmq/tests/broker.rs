//! The RabbitMQ adapter against the real broker of `cargo xtask brokers up`: the core
//! conformance suite for the source (classic queue and stream) and the sink, the slow sink,
//! unroutable publishes, a deleted queue, and a
//! stream resumed from its checkpoint.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::testkit::{sink::SinkHarness, source::SourceHarness};
use flowgate_core::{
    Error, ErrorKind, IdempotencyKey, PartitionId, Position, Record, Sink, WriteError,
};
use flowgate_rabbitmq::{
    QueueType, RabbitSink, RabbitSinkConfig, RabbitSource, RabbitSourceConfig, RabbitTls,
};
use flowgate_runtime::adapters::{FaultConfig, FaultInjectingSink, MemorySink};
use flowgate_runtime::{Pipeline, RuntimeSettings, Shutdown};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};

mod common;
use common::{channel, declare, publish, unique, url};

/// Ready messages in the queue.
async fn depth(queue: &str) -> u32 {
    let (conn, ch) = channel().await;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    conn.close(200, "done".into()).await.unwrap();
    q.message_count()
}

/// The broker's own count of the queue's unacknowledged messages (management API).
async fn unacknowledged(queue: &str) -> u64 {
    let body = common::management_get(&format!("/api/queues/%2f/{queue}")).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("management API answers JSON");
    v["messages_unacknowledged"].as_u64().unwrap_or(0)
}

fn source_config(queue: &str, kind: QueueType) -> RabbitSourceConfig {
    RabbitSourceConfig {
        url: url(),
        queue: queue.to_string(),
        queue_type: kind,
        ..Default::default()
    }
}

struct SourceH {
    kind: QueueType,
    queue: Mutex<String>,
}

#[async_trait]
impl SourceHarness for SourceH {
    type Source = RabbitSource;
    async fn prepare(&self, per_partition: usize) -> Result<Vec<PartitionId>, Error> {
        let queue = unique("conf-src");
        let (conn, ch) = channel().await;
        declare(&ch, &queue, self.kind).await;
        conn.close(200, "done".into()).await.unwrap();
        publish(&queue, (0..per_partition).map(|i| format!("m{i}"))).await;
        *self.queue.lock().unwrap() = queue.clone();
        Ok(vec![PartitionId::new(queue)])
    }
    async fn open_source(&self) -> Result<RabbitSource, Error> {
        RabbitSource::new(source_config(&self.queue.lock().unwrap(), self.kind))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_source_conforms_on_a_classic_queue() {
    flowgate_core::testkit::source::run_all(&SourceH {
        kind: QueueType::Classic,
        queue: Mutex::default(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_source_conforms_on_a_stream() {
    flowgate_core::testkit::source::run_all(&SourceH {
        kind: QueueType::Stream,
        queue: Mutex::default(),
    })
    .await;
}

struct SinkH {
    queue: String,
}

#[async_trait]
impl SinkHarness for SinkH {
    type Sink = RabbitSink;
    async fn open_sink(&self) -> Result<RabbitSink, Error> {
        RabbitSink::new(RabbitSinkConfig {
            url: url(),
            routing_key: Some(self.queue.clone()),
            declare_queue: Some(self.queue.clone()),
            ..Default::default()
        })
    }
    async fn read_back(&self) -> Result<Vec<Record>, Error> {
        let (conn, ch) = channel().await;
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                "read-back".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
        {
            let d = d.unwrap();
            let mut r = Record::new(
                PartitionId::new("read"),
                Position::from(d.delivery_tag),
                Bytes::from(d.data.clone()),
            );
            if let Some(h) = d.properties.headers() {
                if let Some(AMQPValue::LongString(k)) = h.inner().get(flowgate_rabbitmq::KEY_HEADER)
                {
                    r.key = Some(Bytes::copy_from_slice(k.as_bytes()));
                }
            }
            r.idempotency_key = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| IdempotencyKey::new(m.as_str().to_string()));
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
            out.push(r);
        }
        conn.close(200, "done".into()).await.unwrap();
        Ok(out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_sink_conforms() {
    flowgate_core::testkit::sink::run_all(&SinkH {
        queue: unique("conf-sink"),
    })
    .await;
}

/// A publish nothing is bound for comes back and is an error, never silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_is_an_error() {
    let sink = RabbitSink::new(RabbitSinkConfig {
        url: url(),
        routing_key: Some(unique("nowhere")),
        ..Default::default()
    })
    .unwrap();
    let r = Record::new(PartitionId::new("p"), Position::ZERO, Bytes::from("x"));
    match sink.write(&[r]).await {
        Err(WriteError::Partial(errs)) => {
            assert_eq!(errs.len(), 1);
            assert_eq!(errs[0].1.kind(), ErrorKind::Poison, "{}", errs[0].1);
            assert!(
                errs[0].1.to_string().contains("unroutable"),
                "{}",
                errs[0].1
            );
        }
        other => panic!("an unroutable publish must fail: {other:?}"),
    }
    sink.close().await.unwrap();
}

/// TLS: the sink publishes and the source consumes over the rig's `amqps` listener (port
/// 5671 speaks nothing but TLS), verifying the broker's certificate against the rig's CA.
/// Without that CA the certificate is refused as a configuration error that names the cause,
/// and TLS settings with a plain `amqp://` URL are refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_publish_and_consume_with_the_rigs_ca() {
    let tls_url = flowgate_rig_tests::endpoint("FLOWGATE_TEST_RABBITMQ_TLS_URL");
    let ca = std::path::PathBuf::from(flowgate_rig_tests::endpoint("FLOWGATE_TEST_RABBITMQ_CA"));
    // The rig's listener asks for a client certificate of its CA (mutual TLS).
    let tls = Some(RabbitTls {
        ca_file: Some(ca.clone()),
        cert_file: Some(ca.with_file_name("client.pem")),
        key_file: Some(ca.with_file_name("client.key")),
    });
    let queue = unique("tls");
    let sink = RabbitSink::new(RabbitSinkConfig {
        url: tls_url.clone(),
        routing_key: Some(queue.clone()),
        declare_queue: Some(queue.clone()),
        tls: tls.clone(),
        ..Default::default()
    })
    .unwrap();
    let records: Vec<Record> = (0..100u64)
        .map(|i| Record::new(PartitionId::new("p"), Position::from(i), format!("m{i}")))
        .collect();
    sink.write(&records).await.expect("published over TLS");
    sink.close().await.unwrap();

    let out = MemorySink::new();
    let pipeline = Pipeline::builder(unique("tls-pipeline"))
        .source(
            RabbitSource::new(RabbitSourceConfig {
                url: tls_url.clone(),
                tls: tls.clone(),
                ..source_config(&queue, QueueType::Classic)
            })
            .unwrap(),
        )
        .sink(out.clone())
        .build()
        .unwrap();
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipeline.run(shutdown));
    let started = Instant::now();
    while out.len() < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} of 100 consumed over TLS",
            out.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trigger.trigger();
    run.await.unwrap().unwrap();
    assert_eq!(depth(&queue).await, 0, "everything acknowledged over TLS");

    // The system's roots do not know the rig's CA.
    let mut untrusted = RabbitSource::new(RabbitSourceConfig {
        url: tls_url.clone(),
        tls: Some(RabbitTls::default()),
        ..source_config(&queue, QueueType::Classic)
    })
    .unwrap();
    let err = flowgate_core::Source::open(
        &mut untrusted,
        flowgate_core::SourceContext::new("tls", flowgate_core::Credits::new()),
    )
    .await
    .expect_err("an unverifiable certificate must be refused");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    eprintln!("rabbitmq/tls: 100 published and consumed over amqps; without the CA: {err}");

    // Without a client certificate the broker refuses the connection: a clear error.
    let mut anonymous = RabbitSource::new(RabbitSourceConfig {
        url: tls_url.clone(),
        tls: Some(RabbitTls {
            ca_file: Some(ca.clone()),
            ..Default::default()
        }),
        ..source_config(&queue, QueueType::Classic)
    })
    .unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), async {
        match flowgate_core::Source::open(
            &mut anonymous,
            flowgate_core::SourceContext::new("tls", flowgate_core::Credits::new()),
        )
        .await
        {
            Err(e) => e,
            Ok(()) => loop {
                // Reported as a connection failure with the broker's reason.
                match flowgate_core::Source::next(&mut anonymous).await {
                    Err(e) => break e,
                    Ok(flowgate_core::SourceEvent::Connection(
                        flowgate_core::Connection::Down { cause, .. },
                    )) => break Error::config(cause),
                    Ok(_) => {}
                }
            },
        }
    })
    .await
    .expect("a missing client certificate must be reported");
    let text = err.to_string();
    assert!(text.contains("client certificate"), "{text}");
    assert!(text.contains("source.tls.cert_file"), "{text}");
    assert_eq!(err.kind(), ErrorKind::Config, "{text}");
    eprintln!(
        "rabbitmq/tls: without a client certificate, after {:?}: {err}",
        started.elapsed()
    );

    // A certificate of another CA is refused the same way.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = flowgate_rig_tests::foreign_client_certificate(dir.path());
    let foreign = RabbitSink::new(RabbitSinkConfig {
        url: tls_url.clone(),
        routing_key: Some(queue.clone()),
        tls: Some(RabbitTls {
            ca_file: Some(ca.clone()),
            cert_file: Some(cert),
            key_file: Some(key),
        }),
        ..Default::default()
    })
    .unwrap();
    let one = Record::new(PartitionId::new("p"), Position::from(0u64), "x");
    let err = match foreign.write(&[one]).await {
        Err(flowgate_core::WriteError::Batch(e)) => e,
        Err(flowgate_core::WriteError::Partial(mut v)) => v.remove(0).1,
        Ok(()) => panic!("a foreign client certificate must be refused"),
    };
    eprintln!("rabbitmq/tls: a client certificate of another CA: {err}");
    // The broker sends its `UnknownCA` alert and closes at once; under load the close can
    // overtake the alert and the client sees only a reset. Either way nothing connects; when
    // the alert is seen, it is reported as the client-certificate error.
    if err.kind() == ErrorKind::Config {
        assert!(err.to_string().contains("client certificate"), "{err}");
    } else {
        assert!(err.to_string().contains("reset"), "{err}");
    }

    let plain = RabbitSinkConfig {
        url: url(),
        tls,
        ..Default::default()
    };
    let Err(err) = RabbitSink::new(plain) else {
        panic!("TLS settings need amqps://");
    };
    assert!(err.to_string().contains("sink.tls"), "{err}");
}

/// A sink 10× slower than the producer: the broker never has more unacknowledged messages
/// (read from the broker's management API) than the runtime's in-flight limit, which lowers
/// the configured prefetch (300 → 100); the runtime stays within its budget; the queue depth
/// is the lag, reported growing while the producer runs; everything arrives in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_holds_no_more_than_the_prefetch() {
    slow_sink(QueueType::Classic, 300, 100).await;
}

/// The same on a stream (prefetch 100 under an in-flight limit of 500): the lag is the
/// distance to the stream's end; it grows, then shrinks to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_on_a_stream_reports_the_distance_to_its_end() {
    slow_sink(QueueType::Stream, 100, 500).await;
}

async fn slow_sink(kind: QueueType, prefetch: u16, max_in_flight: usize) {
    let queue = unique("slow");
    let (conn, ch) = channel().await;
    declare(&ch, &queue, kind).await;
    conn.close(200, "done".into()).await.unwrap();
    let total = 8_000usize;
    // 1,000 now, the rest at ~10,000/s while the sink takes 1,000/s: the lag grows.
    publish(&queue, (0..1_000).map(|i| format!("m{i}"))).await;
    // How many are published (confirmed) so far: the true backlog is that minus what arrived.
    let published = Arc::new(std::sync::atomic::AtomicUsize::new(1_000));
    let producer = {
        let queue = queue.clone();
        let published = published.clone();
        tokio::spawn(async move {
            for chunk in 1..total / 1_000 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                publish(
                    &queue,
                    (chunk * 1_000..(chunk + 1) * 1_000).map(|i| format!("m{i}")),
                )
                .await;
                published.fetch_add(1_000, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder(unique("slow-pipeline"))
        .source(
            RabbitSource::new(RabbitSourceConfig {
                prefetch,
                lag_interval: Duration::from_millis(250),
                ..source_config(&queue, kind)
            })
            .unwrap(),
        )
        .sink(FaultInjectingSink::new(
            sink.clone(),
            FaultConfig {
                capacity_per_sec: Some(1_000.0),
                ..Default::default()
            },
        ))
        .settings(RuntimeSettings {
            max_in_flight_per_partition: max_in_flight,
            ..Default::default()
        })
        .build()
        .unwrap();
    let window = u64::from(prefetch).min(max_in_flight as u64);
    let (trigger, shutdown) = Shutdown::manual();
    let stats = pipeline.stats();
    let run = tokio::spawn(pipeline.run(shutdown));
    let started = Instant::now();
    let mut lags = Vec::new();
    let mut backlog = 0u64;
    let mut peak_in_flight = 0;
    let mut unacked = Vec::new();
    while sink.len() < total {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {} of {total} arrived",
            sink.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = stats.snapshot();
        lags.push(s.lag);
        let waiting = published
            .load(std::sync::atomic::Ordering::SeqCst)
            .saturating_sub(sink.len());
        backlog = backlog.max(waiting as u64);
        peak_in_flight = peak_in_flight.max(s.in_flight);
        if kind == QueueType::Classic {
            unacked.push(unacknowledged(&queue).await);
        }
    }
    // The last lag readings come once everything was delivered: the lag is back to 0.
    let settled = Instant::now();
    while stats.snapshot().lag != 0 {
        assert!(
            settled.elapsed() < Duration::from_secs(10),
            "lag stays at {} once everything arrived",
            stats.snapshot().lag
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    trigger.trigger();
    let summary = run.await.unwrap().unwrap();
    // A stream delivers whole chunks once it has credit, so it can overshoot the prefetch by
    // up to a chunk; the runtime's own limit holds either way.
    let bound = match kind {
        QueueType::Stream => max_in_flight as u64,
        _ => window,
    };
    assert!(
        peak_in_flight <= bound,
        "in flight {peak_in_flight} > {bound}"
    );
    producer.await.unwrap();
    let max_lag = lags.iter().copied().max().unwrap_or(0);
    let first_lag = lags.iter().copied().find(|l| *l > 0).unwrap_or(0);
    // How far the producer outruns the sink depends on how fast the broker confirms on a
    // loaded machine: the lag is held to the backlog actually built.
    assert!(
        backlog >= (total as u64) / 4,
        "the producer must outrun the sink (largest backlog {backlog})"
    );
    assert!(
        max_lag >= backlog * 2 / 3 && max_lag >= first_lag + (total as u64) / 4,
        "the backlog (at most {backlog}) must be reported as lag, growing while the producer outruns the sink: {lags:?}"
    );
    if kind == QueueType::Classic {
        // The management API's figures are refreshed every `collect_statistics_interval`
        // (500 ms in the rig) and appear a few seconds after a queue is created: hence a
        // backlog of several seconds.
        let peak_unacked = unacked.iter().copied().max().unwrap_or(0);
        assert!(
            peak_unacked > 0 && peak_unacked <= window,
            "the broker's unacknowledged count stays within the prefetch: {unacked:?}"
        );
        assert_eq!(depth(&queue).await, 0, "everything acknowledged");
    }
    let mut seen: Vec<String> = sink
        .records()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "nothing lost");
    eprintln!(
        "rabbitmq/slow ({kind:?}): {total} messages, sink at 1000/s, prefetch {prefetch}, in-flight limit {max_in_flight}: peak in flight {peak_in_flight}, broker's unacknowledged {unacked:?}, lag reported from {first_lag} up to {max_lag}, peak buffer {} KiB; {:?}",
        summary.stats.peak_buffer_bytes / 1024,
        summary.elapsed
    );
}

/// A queue deleted under a running consumer stops the pipeline with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_queue_is_a_clear_error() {
    let queue = unique("deleted");
    let (conn, ch) = channel().await;
    declare(&ch, &queue, QueueType::Classic).await;
    publish(&queue, (0..10).map(|i| format!("m{i}"))).await;
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder(unique("deleted-pipeline"))
        .source(RabbitSource::new(source_config(&queue, QueueType::Classic)).unwrap())
        .sink(sink.clone())
        .build()
        .unwrap();
    let (_trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipeline.run(shutdown));
    let started = Instant::now();
    while sink.len() < 10 {
        assert!(started.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the pipeline must stop, not hang")
        .unwrap();
    let err = res.expect_err("a deleted queue is an error");
    assert!(
        err.to_string().contains("cancelled the consumer"),
        "the error must say what happened: {err}"
    );
    conn.close(200, "done".into()).await.unwrap();
}

/// A stream consumed, the pipeline killed part way, then a new one with the same checkpoint
/// store: it resumes exactly after the checkpoint, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_resumes_from_the_checkpoint() {
    let queue = unique("stream");
    let (conn, ch) = channel().await;
    declare(&ch, &queue, QueueType::Stream).await;
    conn.close(200, "done".into()).await.unwrap();
    publish(&queue, (0..1_000).map(|i| format!("s{i}"))).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        flowgate_checkpoint::EmbeddedStore::open_dir(dir.path())
            .await
            .unwrap(),
    );
    let name = unique("stream-pipeline");
    let sink = MemorySink::new();
    let run_once = |capacity: Option<f64>| {
        Pipeline::builder(name.clone())
            .source(RabbitSource::new(source_config(&queue, QueueType::Stream)).unwrap())
            .sink(FaultInjectingSink::new(
                sink.clone(),
                FaultConfig {
                    capacity_per_sec: capacity,
                    ..Default::default()
                },
            ))
            .checkpoint_store(store.clone())
            .build()
            .unwrap()
    };
    // First run: slow, killed part way (the task aborted: no drain, no final checkpoint).
    let (_trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(run_once(Some(500.0)).run(shutdown));
    let started = Instant::now();
    while sink.len() < 300 {
        assert!(started.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.abort();
    let _ = run.await;
    // In-process, sink writes already in flight on worker tasks can still land; a killed
    // process would not have them. Wait until the sink is quiet before counting.
    let mut last = sink.len();
    let quiet = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let now = sink.len();
        if now == last || quiet.elapsed() > Duration::from_secs(20) {
            break;
        }
        last = now;
    }
    let first = sink.len();
    assert!(first < 1_000, "the first run must stop part way ({first})");
    let checkpoint = flowgate_core::CheckpointStore::load(&*store, &name)
        .await
        .unwrap()
        .first()
        .and_then(|c| c.position.as_u64())
        .expect("a checkpoint from the first run");
    assert!(
        checkpoint < first as u64,
        "the checkpoint ({checkpoint}) trails what was written ({first})"
    );
    let expected = first + 1_200 - (checkpoint as usize + 1);
    // Second run: the rest, from the checkpoint.
    publish(&queue, (1_000..1_200).map(|i| format!("s{i}"))).await;
    // From outside (`flowgate lag`): the stream's end, and the distance to it from the
    // stored checkpoint.
    let lag_from_outside = || async {
        let stored = flowgate_core::CheckpointStore::load(&*store, &name)
            .await
            .unwrap();
        let mut probe = RabbitSource::new(source_config(&queue, QueueType::Stream)).unwrap();
        let views = flowgate_core::Source::inspect(&mut probe, &name, &stored)
            .await
            .unwrap();
        (views[0].end.clone(), views[0].lag_records)
    };
    assert_eq!(
        lag_from_outside().await,
        (Some(Position::from(1_199u64)), Some(1_199 - checkpoint)),
        "flowgate lag on a stream: end 1199, behind by what follows the checkpoint"
    );
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(run_once(None).run(shutdown));
    let started = Instant::now();
    while sink.len() < expected {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} of 1200",
            sink.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    trigger.trigger();
    run.await.unwrap().unwrap();
    assert_eq!(
        lag_from_outside().await,
        (Some(Position::from(1_199u64)), Some(0)),
        "read to the end: nothing behind"
    );
    let payloads: Vec<String> = sink
        .records()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    // The second run starts exactly after the checkpoint: what the first run wrote after it
    // is written again (at-least-once), nothing is skipped.
    assert_eq!(payloads.len(), expected);
    let resumed = &payloads[first..];
    for (i, p) in resumed.iter().enumerate() {
        assert_eq!(
            p,
            &format!("s{}", checkpoint as usize + 1 + i),
            "resumed right after the checkpoint, in order, no gap"
        );
    }
    eprintln!(
        "rabbitmq/stream: first run killed after {first} records (checkpoint at offset {checkpoint}); the second resumed at {} and reached 1200 ({} written again)",
        checkpoint + 1,
        first - (checkpoint as usize + 1)
    );
}
