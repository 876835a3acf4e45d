//! RabbitMQ: declare a queue, publish 10,000 messages with publisher confirms, consume them
//! with manual acks.
#![cfg(feature = "brokers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use flowgate_rig_tests::{endpoint, unique};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const MESSAGES: usize = 10_000;

#[tokio::test]
async fn publish_with_confirms_and_consume_with_manual_acks() {
    let url = endpoint("FLOWGATE_TEST_RABBITMQ_URL");
    let queue = unique("rig-rabbitmq");
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("AMQP connection");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue_declare");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");

    let started = Instant::now();
    let mut confirms = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let payload = format!("message-{i}");
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("basic_publish");
        confirms.push(confirm);
    }
    for c in confirms {
        let confirmation = c.await.expect("publisher confirm");
        assert!(
            confirmation.is_ack(),
            "the broker must ack every publish: {confirmation:?}"
        );
    }
    eprintln!(
        "rabbitmq: published {MESSAGES} with confirms in {:?}",
        started.elapsed()
    );

    let consumer_channel = conn.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(200, BasicQosOptions::default())
        .await
        .expect("basic_qos");
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "rig".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("basic_consume");
    let mut got = vec![false; MESSAGES];
    let mut count = 0;
    let started = Instant::now();
    while count < MESSAGES {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a delivery within 30 s")
            .expect("consumer stream ended")
            .expect("delivery");
        let text = String::from_utf8(delivery.data.clone()).unwrap();
        let i: usize = text.trim_start_matches("message-").parse().unwrap();
        assert!(!got[i], "message {i} delivered twice");
        got[i] = true;
        count += 1;
        // Manual acks, batched: every 100th acknowledges everything up to it.
        if count % 100 == 0 {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    }
    eprintln!(
        "rabbitmq: consumed {MESSAGES} with manual acks in {:?}",
        started.elapsed()
    );
    consumer_channel
        .close(200, "done".into())
        .await
        .expect("close channel");

    let check = conn.create_channel().await.expect("channel");
    let q = check
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(q.message_count(), 0, "every message was acknowledged");
    check
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("queue_delete");
    conn.close(200, "done".into()).await.expect("close");
}
