//! Harness of `cargo xtask bench rabbitmq`: raw lapin loops against the flowgate RabbitMQ
//! source and sink, on the same broker.
//!
//! ```text
//! bench_rabbitmq publish-raw QUEUE N        lapin publisher, confirms, a window of 2000
//! bench_rabbitmq publish-flowgate QUEUE N   generator (4 partitions) -> RabbitSink
//! bench_rabbitmq consume-raw QUEUE N        lapin consumer, prefetch 300, acks each message
//! bench_rabbitmq consume-raw-batched QUEUE N  the same, one `multiple` ack per 100 messages
//! bench_rabbitmq consume-flowgate QUEUE N   RabbitSource (prefetch 300) -> null sink
//! ```
//! Prints `mode records seconds records_per_second`. Messages are 100 bytes. URL:
//! FLOWGATE_TEST_RABBITMQ_URL.
#![allow(clippy::expect_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use flowgate_rabbitmq::{RabbitSink, RabbitSinkConfig, RabbitSource, RabbitSourceConfig};
use flowgate_runtime::adapters::{GeneratorConfig, GeneratorSource, NullSink};
use flowgate_runtime::{Pipeline, Shutdown};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const PREFETCH: u16 = 300;
const WINDOW: usize = 2000;

fn url() -> String {
    std::env::var("FLOWGATE_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn channel(queue: &str) -> (Connection, Channel) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    (conn, ch)
}

async fn publish_raw(queue: &str, n: u64) -> u64 {
    let (conn, ch) = channel(queue).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let payload = vec![b'x'; 100];
    let mut window = VecDeque::with_capacity(WINDOW);
    for _ in 0..n {
        if window.len() >= WINDOW {
            let c: lapin::PublisherConfirm = window.pop_front().expect("window");
            assert!(c.await.expect("confirm").is_ack());
        }
        window.push_back(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    for c in window {
        assert!(c.await.expect("confirm").is_ack());
    }
    conn.close(200, "done".into()).await.expect("close");
    n
}

async fn publish_flowgate(queue: &str, n: u64) -> u64 {
    // Declare first so the mandatory publishes are routable.
    let (conn, _ch) = channel(queue).await;
    conn.close(200, "done".into()).await.expect("close");
    let sink = RabbitSink::new(RabbitSinkConfig {
        url: url(),
        routing_key: Some(queue.to_string()),
        ..Default::default()
    })
    .expect("sink");
    let summary = Pipeline::builder(format!("bench-pub-{queue}"))
        .source(
            GeneratorSource::new(GeneratorConfig {
                partitions: 4,
                records_per_partition: Some(n / 4),
                payload_size: 100,
                ..Default::default()
            })
            .expect("generator"),
        )
        .sink(sink)
        .build()
        .expect("pipeline")
        .run(Shutdown::manual().1)
        .await
        .expect("run");
    summary.stats.records_out
}

async fn consume_raw(queue: &str, n: u64, ack_every: u64) -> u64 {
    let (conn, ch) = channel(queue).await;
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut got = 0;
    while got < n {
        let d = consumer
            .next()
            .await
            .expect("stream ended")
            .expect("delivery");
        got += 1;
        if got % ack_every == 0 || got == n {
            d.acker
                .ack(BasicAckOptions {
                    multiple: ack_every > 1,
                })
                .await
                .expect("ack");
        }
    }
    conn.close(200, "done".into()).await.expect("close");
    got
}

async fn consume_flowgate(queue: &str, n: u64) -> u64 {
    let sink = NullSink::default();
    let pipeline = Pipeline::builder(format!("bench-consume-{queue}"))
        .source(
            RabbitSource::new(RabbitSourceConfig {
                url: url(),
                queue: queue.to_string(),
                prefetch: PREFETCH,
                ..Default::default()
            })
            .expect("source"),
        )
        .sink(sink.clone())
        .build()
        .expect("pipeline");
    let (trigger, shutdown) = Shutdown::manual();
    let run = tokio::spawn(pipeline.run(shutdown));
    while sink.records() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    trigger.trigger();
    run.await.expect("join").expect("run");
    n
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, queue, n) = match args.as_slice() {
        [m, q, n] => (m.as_str(), q.as_str(), n.parse::<u64>().expect("N")),
        _ => panic!("usage: see the module documentation of bench_rabbitmq"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let done = rt.block_on(async {
        match mode {
            "publish-raw" => publish_raw(queue, n).await,
            "publish-flowgate" => publish_flowgate(queue, n).await,
            "consume-raw" => consume_raw(queue, n, 1).await,
            "consume-raw-batched" => consume_raw(queue, n, 100).await,
            "consume-flowgate" => consume_flowgate(queue, n).await,
            other => panic!("unknown mode {other}"),
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!("{mode} {done} {secs:.3} {:.0}", done as f64 / secs);
}
