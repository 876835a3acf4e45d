//! Helpers shared by the broker test files.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unused_imports)]

use flowgate_rabbitmq::QueueType;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

pub(crate) use flowgate_rig_tests::{rig, unique};

pub(crate) fn url() -> String {
    flowgate_rig_tests::endpoint("FLOWGATE_TEST_RABBITMQ_URL")
}

pub(crate) async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("AMQP connection");
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Declares a durable queue of the given type.
pub(crate) async fn declare(ch: &Channel, queue: &str, kind: QueueType) {
    let mut args = FieldTable::default();
    let t = match kind {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
        QueueType::Stream => "stream",
    };
    args.insert("x-queue-type".into(), AMQPValue::LongString(t.into()));
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

/// Publishes `payloads` with confirms to the default exchange (routing key = queue); each
/// payload is also the message id.
pub(crate) async fn publish(queue: &str, payloads: impl IntoIterator<Item = String>) {
    let (conn, ch) = channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for p in payloads {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                p.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(p.as_str().into()),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    conn.close(200, "done".into()).await.unwrap();
}
