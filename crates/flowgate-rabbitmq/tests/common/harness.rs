//! The broker harness of the runtime's scenario suites for RabbitMQ: a classic queue with a
//! dead-letter exchange, driven with plain lapin clients and the management API.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use flowgate_core::{Sink, Source};
use flowgate_rabbitmq::{QueueType, RabbitSource, RabbitSourceConfig};
use flowgate_runtime::testkit::{BrokerHarness, Capabilities};
use lapin::ExchangeKind;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use super::{channel, management_get, publish, unique, url};

/// The rig's RabbitMQ. Dead letters read so far, by queue: reading takes them off the
/// dead-letter queue.
#[derive(Default)]
pub(crate) struct Rabbit {
    letters: Mutex<HashMap<String, Vec<String>>>,
}

fn config(queue: &str) -> RabbitSourceConfig {
    RabbitSourceConfig {
        url: url(),
        queue: queue.to_string(),
        queue_type: QueueType::Classic,
        declare: true,
        dead_letter_exchange: Some(format!("{queue}.dlx")),
        ..Default::default()
    }
}

#[async_trait]
impl BrokerHarness for Rabbit {
    fn broker(&self) -> &'static str {
        "rabbitmq"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            replayable: false,
            restartable: true,
            reports_lag: true,
            partitions: 1,
        }
    }

    /// The queue, its dead-letter exchange and queue, declared as the source declares them
    /// (so that records produced before the pipeline starts are kept).
    async fn create(&self) -> String {
        let queue = unique("scenario");
        let dlx = format!("{queue}.dlx");
        let dlq = format!("{queue}.dead-letter");
        let (conn, ch) = channel().await;
        let durable = || QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(dlq.as_str().into(), durable(), FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.as_str().into()),
        );
        ch.queue_declare(queue.as_str().into(), durable(), args)
            .await
            .unwrap();
        conn.close(200, "done".into()).await.unwrap();
        queue
    }

    async fn produce(&self, stream: &str, payloads: &[String]) {
        publish(stream, payloads.iter().cloned()).await;
    }

    fn source(&self, stream: &str, _pipeline: &str) -> Box<dyn Source> {
        Box::new(RabbitSource::new(config(stream)).unwrap())
    }

    /// None: poison is rejected to the queue's dead-letter exchange.
    async fn dead_letter_sink(&self, _stream: &str) -> Option<Box<dyn Sink>> {
        None
    }

    async fn dead_letters(&self, stream: &str) -> Vec<String> {
        let dlq = format!("{stream}.dead-letter");
        let (conn, ch) = channel().await;
        let mut got = Vec::new();
        while let Some(m) = ch
            .basic_get(dlq.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            got.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        conn.close(200, "done".into()).await.unwrap();
        let mut letters = self.letters.lock().unwrap();
        let all = letters.entry(stream.to_string()).or_default();
        all.extend(got);
        all.clone()
    }

    async fn restart(&self, down_for: Duration) -> Duration {
        flowgate_rig_tests::bounce("rabbitmq", down_for).await
    }

    /// Ready plus unacknowledged messages, as `rabbitmqctl list_queues messages` counts them.
    async fn backlog(&self, stream: &str, _pipeline: &str) -> u64 {
        let (conn, ch) = channel().await;
        let ready = ch
            .queue_declare(
                stream.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count();
        conn.close(200, "done".into()).await.unwrap();
        let body = management_get(&format!("/api/queues/%2f/{stream}")).await;
        let v: serde_json::Value =
            serde_json::from_str(&body).expect("management API answers JSON");
        u64::from(ready) + v["messages_unacknowledged"].as_u64().unwrap_or(0)
    }
}
