//! The RabbitMQ sink: publisher confirms, mandatory publishes, persistent messages.

use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use flowgate_core::{Error, Record, Sink, SinkCapabilities, WriteError};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::config::RabbitSinkConfig;
use crate::error::map;

/// RabbitMQ sink: every publish is `mandatory` (an unroutable record comes back and is
/// poison, never dropped), persistent, and confirmed by the broker before the write returns;
/// a nacked publish is retried. The idempotency key travels as the AMQP `message_id`. A lost
/// connection is a transient error: the next write reconnects.
pub struct RabbitSink {
    cfg: RabbitSinkConfig,
    link: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl RabbitSink {
    /// A sink; it connects on the first write.
    pub fn new(cfg: RabbitSinkConfig) -> Result<Self, Error> {
        crate::client::check_tls(&cfg.url, cfg.tls.as_ref(), "sink")?;
        if cfg.exchange.is_empty() && cfg.routing_key.is_none() && cfg.routing_key_header.is_none()
        {
            tracing::debug!(
                "rabbitmq sink: no routing key configured; each record's key names the queue"
            );
        }
        Ok(RabbitSink {
            cfg,
            link: tokio::sync::Mutex::new(None),
        })
    }

    /// The confirm-mode channel, (re)connecting if needed.
    async fn channel(&self) -> Result<Channel, Error> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        *link = None;
        let conn = crate::client::connect(&self.cfg.url, self.cfg.tls.as_ref(), "sink").await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| map(e, "opening a channel"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| map(e, "enabling publisher confirms"))?;
        if let Some(q) = &self.cfg.declare_queue {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map(e, "declaring the queue").with_context("queue", q))?;
            if !self.cfg.exchange.is_empty() {
                ch.queue_bind(
                    q.as_str().into(),
                    self.cfg.exchange.as_str().into(),
                    self.cfg.routing_key.as_deref().unwrap_or("").into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| map(e, "binding the queue").with_context("queue", q))?;
            }
        }
        *link = Some((conn, ch.clone()));
        Ok(ch)
    }

    fn routing_key(&self, r: &Record) -> Option<String> {
        if let Some(h) = &self.cfg.routing_key_header {
            if let Some(v) = r.headers.get(h).and_then(|v| std::str::from_utf8(v).ok()) {
                return Some(v.to_string());
            }
        }
        if let Some(k) = &self.cfg.routing_key {
            return Some(k.clone());
        }
        r.key
            .as_ref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_string)
    }

    fn properties(&self, r: &Record) -> BasicProperties {
        let mut table = FieldTable::default();
        for h in r.headers.iter() {
            table.insert(
                ShortString::from(&*h.name),
                AMQPValue::LongString(LongString::from(h.value.to_vec())),
            );
        }
        if let Some(k) = &r.key {
            table.insert(
                crate::KEY_HEADER.into(),
                AMQPValue::LongString(LongString::from(k.to_vec())),
            );
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(if self.cfg.persistent { 2 } else { 1 })
            .with_headers(table);
        if let Some(k) = &r.idempotency_key {
            props = props.with_message_id(String::from_utf8_lossy(k.as_bytes()).as_ref().into());
        }
        if let Some(secs) = r
            .timestamp
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
        {
            props = props.with_timestamp(secs);
        }
        props
    }

    /// Forget the connection (the next write reconnects).
    async fn reset(&self) {
        *self.link.lock().await = None;
    }
}

#[async_trait]
impl Sink for RabbitSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic()
            .with_forwards_idempotency_key(true)
            .with_max_record_bytes(Some(self.cfg.max_record_bytes))
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        let ch = self.channel().await?;
        let mut failed: Vec<(usize, Error)> = Vec::new();
        let mut pending = Vec::with_capacity(batch.len());
        let mut broken = false;
        for (i, r) in batch.iter().enumerate() {
            if r.payload.len() > self.cfg.max_record_bytes {
                failed.push((
                    i,
                    Error::poison("record larger than the sink's max_record_bytes")
                        .with_context("bytes", r.payload.len()),
                ));
                continue;
            }
            let Some(rk) = self.routing_key(r) else {
                failed.push((
                    i,
                    Error::poison("record has no routing key and the sink names none")
                        .with_hint("set `routing_key` or `routing_key_header`"),
                ));
                continue;
            };
            match ch
                .basic_publish(
                    self.cfg.exchange.as_str().into(),
                    rk.as_str().into(),
                    BasicPublishOptions {
                        mandatory: self.cfg.mandatory,
                        ..Default::default()
                    },
                    &r.payload,
                    self.properties(r),
                )
                .await
            {
                Ok(confirm) => pending.push((i, rk, confirm)),
                Err(e) => {
                    broken = true;
                    failed.push((i, map(e, "publishing")));
                }
            }
        }
        for (i, rk, confirm) in pending {
            let res = tokio::time::timeout(self.cfg.confirm_timeout, confirm).await;
            let err = match res {
                Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => continue,
                Ok(Ok(Confirmation::Ack(Some(ret)))) => Error::poison(format!(
                    "rabbitmq: unroutable record returned by the broker: {} {}",
                    ret.reply_code, ret.reply_text
                ))
                .with_context("exchange", &self.cfg.exchange)
                .with_context("routing_key", &rk)
                .with_hint("bind a queue to the exchange for this routing key"),
                Ok(Ok(Confirmation::Nack(_))) => {
                    Error::transient("rabbitmq: the broker refused (nacked) the publish")
                }
                Ok(Err(e)) => {
                    broken = true;
                    map(e, "waiting for the publish confirm")
                }
                Err(_) => {
                    broken = true;
                    Error::transient(format!(
                        "rabbitmq: no publish confirm within {:?}",
                        self.cfg.confirm_timeout
                    ))
                }
            };
            failed.push((i, err));
        }
        if broken {
            self.reset().await;
        }
        if failed.is_empty() {
            Ok(())
        } else {
            failed.sort_by_key(|(i, _)| *i);
            Err(WriteError::Partial(failed))
        }
    }

    async fn check(&self) -> Result<bool, Error> {
        self.channel().await.map(|_| true)
    }

    async fn close(&self) -> Result<(), Error> {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let close = conn.close(200, "flowgate closing".into());
            if tokio::time::timeout(Duration::from_secs(10), close)
                .await
                .is_err()
            {
                tracing::warn!("rabbitmq sink: the connection did not close within 10 s");
            }
        }
        Ok(())
    }
}
