//! The Kafka sink: an idempotent producer; a record is confirmed by its delivery report.

use std::time::Duration;

use async_trait::async_trait;
use flowgate_core::{Error, ErrorKind, Record, Sink, SinkCapabilities, WriteError, headers};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::KafkaSinkConfig;
use crate::error::map;

/// Apache Kafka sink: `enable.idempotence=true`, `acks=all`; `write` returns once every
/// record's delivery report arrived. The idempotency key travels as the
/// `flowgate-idempotency-key` header. `QueueFull` is throttling; a record over
/// `max_record_bytes` is poison.
pub struct KafkaSink {
    cfg: KafkaSinkConfig,
    producer: FutureProducer,
}

impl KafkaSink {
    /// Creates the producer (connects lazily).
    pub fn new(cfg: KafkaSinkConfig) -> Result<Self, Error> {
        if cfg.topic.is_none() && cfg.topic_header.is_none() {
            return Err(Error::config(
                "kafka sink: set `topic` (or `topic_header` for routing by record)",
            )
            .with_context("key", "sink.topic"));
        }
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                cfg.delivery_timeout.as_millis().to_string(),
            )
            .set("linger.ms", cfg.linger.as_millis().to_string())
            .set(
                "message.max.bytes",
                (cfg.max_record_bytes + 1024).to_string(),
            );
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        let producer: FutureProducer = cc.create().map_err(|e| map(e, "creating the producer"))?;
        Ok(KafkaSink { cfg, producer })
    }

    fn topic_of<'a>(&'a self, r: &'a Record) -> Option<&'a str> {
        if let Some(h) = &self.cfg.topic_header {
            if let Some(v) = r.headers.get(h).and_then(|v| std::str::from_utf8(v).ok()) {
                return Some(v);
            }
        }
        self.cfg.topic.as_deref()
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic()
            .with_forwards_idempotency_key(true)
            .with_max_record_bytes(Some(self.cfg.max_record_bytes))
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        let mut failed: Vec<(usize, Error)> = Vec::new();
        let mut pending = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            let size = r.payload.len() + r.key.as_ref().map_or(0, |k| k.len());
            if size > self.cfg.max_record_bytes {
                failed.push((
                    i,
                    Error::poison("record larger than the sink's max_record_bytes")
                        .with_context("bytes", size),
                ));
                continue;
            }
            let Some(topic) = self.topic_of(r) else {
                failed.push((
                    i,
                    Error::poison("record names no topic and the sink has none")
                        .with_context("header", self.cfg.topic_header.as_deref().unwrap_or("")),
                ));
                continue;
            };
            let mut hs = OwnedHeaders::new_with_capacity(r.headers.len() + 1);
            for h in r.headers.iter() {
                hs = hs.insert(Header {
                    key: &h.name,
                    value: Some(&h.value[..]),
                });
            }
            if let Some(k) = &r.idempotency_key {
                hs = hs.insert(Header {
                    key: headers::IDEMPOTENCY_KEY,
                    value: Some(k.as_bytes()),
                });
            }
            let mut rec = FutureRecord::to(topic).payload(&r.payload[..]).headers(hs);
            if let Some(k) = &r.key {
                rec = rec.key(&k[..]);
            }
            if let Some(ms) = r
                .timestamp
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            {
                rec = rec.timestamp(ms.as_millis() as i64);
            }
            // Enqueue without waiting for room: a full local queue is throttling.
            match self.producer.send_result(rec) {
                Ok(fut) => pending.push((i, fut)),
                Err((e, _)) => failed.push((i, map(e, "enqueueing a record"))),
            }
        }
        for (i, fut) in pending {
            match fut.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => failed.push((i, delivery_error(e))),
                Err(_) => failed.push((
                    i,
                    Error::transient("kafka: delivery report lost (producer closed)"),
                )),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            failed.sort_by_key(|(i, _)| *i);
            Err(WriteError::Partial(failed))
        }
    }

    async fn flush(&self) -> Result<(), Error> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.flush(Timeout::After(Duration::from_secs(30))))
            .await
            .map_err(|e| Error::fatal("kafka flush task failed").with_source(e))?
            .map_err(|e| map(e, "flushing the producer"))
    }

    async fn close(&self) -> Result<(), Error> {
        self.flush().await
    }
}

fn delivery_error(e: KafkaError) -> Error {
    let err = map(e, "delivering a record");
    if err.kind() == ErrorKind::Config {
        // A topic that does not exist is an operator problem, not a poison record.
        return Error::fatal(err.to_string());
    }
    err
}
