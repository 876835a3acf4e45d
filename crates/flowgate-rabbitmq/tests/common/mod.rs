//! Helpers shared by the broker test files.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unused_imports)]

use flowgate_rabbitmq::QueueType;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

pub(crate) use flowgate_rig_tests::{rig, unique};

pub(crate) mod harness;

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

/// `GET` on the broker's management API (`FLOWGATE_TEST_RABBITMQ_MANAGEMENT`), with the
/// credentials of the AMQP URL; the response body.
pub(crate) async fn management_get(path: &str) -> String {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let base = flowgate_rig_tests::endpoint("FLOWGATE_TEST_RABBITMQ_MANAGEMENT");
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let amqp = url();
    let creds = amqp
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map_or("guest:guest", |(userinfo, _)| userinfo);
    let auth = base64::engine::general_purpose::STANDARD.encode(creds);
    let mut conn = tokio::net::TcpStream::connect(host)
        .await
        .expect("management API reachable");
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\nAccept: application/json\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "management API: {head}");
    body.to_string()
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
