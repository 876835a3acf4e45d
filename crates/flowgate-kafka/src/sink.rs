//! The Kafka sink: an idempotent producer; a record is confirmed by its delivery report.
//! Optionally transactional: one transaction per batch, with the consumed offsets of a linked
//! Kafka source committed inside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flowgate_core::{Error, ErrorKind, Record, Sink, SinkCapabilities, WriteError, headers};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

use crate::client::{Brokers, auth_error, is_auth_failure};
use crate::config::KafkaSinkConfig;
use crate::error::map;
use crate::source::OffsetsLink;

/// Apache Kafka sink: `enable.idempotence=true`, `acks=all`; `write` returns once every
/// record's delivery report arrived. The idempotency key travels as the
/// `flowgate-idempotency-key` header. `QueueFull` is throttling; a record over
/// `max_record_bytes` is poison.
pub struct KafkaSink {
    cfg: KafkaSinkConfig,
    producer: FutureProducer<SinkContext>,
    /// The producer's context, for its authentication failures.
    auth: SinkContext,
    /// Transactional mode: one transaction at a time; `true` once `init_transactions` ran.
    tx: Option<tokio::sync::Mutex<bool>>,
    link: Option<OffsetsLink>,
}

/// Catches librdkafka's authentication and TLS failures, which it otherwise only logs while
/// deliveries wait for their timeout: the sink stops with a configuration error instead.
#[derive(Clone, Default)]
struct SinkContext {
    /// The endpoint as errors name it (servers, protocol, mechanism).
    endpoint: String,
    auth: Arc<(Mutex<Option<String>>, tokio::sync::Notify)>,
}

impl ClientContext for SinkContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_auth_failure(&error, reason) {
            let mut slot = self
                .auth
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if slot.is_none() {
                *slot = Some(format!("{error}: {reason}"));
            }
            self.auth.1.notify_waiters();
        } else {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl SinkContext {
    fn failure(&self) -> Option<Error> {
        let slot = self
            .auth
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref()
            .map(|cause| auth_error(&self.endpoint, "sink", cause))
    }

    /// Resolves once an authentication or TLS failure is seen.
    async fn failed(&self) -> Error {
        loop {
            let notified = self.auth.1.notified();
            if let Some(e) = self.failure() {
                return e;
            }
            notified.await;
        }
    }
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
        // librdkafka refuses a transactional producer whose deliveries may outlive its
        // transactions: a shorter transaction timeout shortens the delivery timeout too.
        let delivery_timeout = match &cfg.transactional_id {
            Some(_) if cfg.transaction_timeout < cfg.delivery_timeout => {
                tracing::info!(
                    delivery_timeout = ?cfg.delivery_timeout,
                    transaction_timeout = ?cfg.transaction_timeout,
                    "kafka sink: delivery_timeout lowered to transaction_timeout"
                );
                cfg.transaction_timeout
            }
            _ => cfg.delivery_timeout,
        };
        let conn = Brokers {
            bootstrap_servers: &cfg.bootstrap_servers,
            security_protocol: cfg.security_protocol,
            tls: cfg.tls.as_ref(),
            sasl: cfg.sasl.as_ref(),
            side: "sink",
        };
        let mut cc = ClientConfig::new();
        conn.apply(&mut cc)?;
        cc.set("enable.idempotence", "true")
            .set("compression.type", cfg.compression.as_str())
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                delivery_timeout.as_millis().to_string(),
            )
            .set("linger.ms", cfg.linger.as_millis().to_string())
            .set(
                "message.max.bytes",
                (cfg.max_record_bytes + 1024).to_string(),
            );
        if let Some(id) = &cfg.transactional_id {
            cc.set("transactional.id", id).set(
                "transaction.timeout.ms",
                cfg.transaction_timeout.as_millis().to_string(),
            );
        }
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        let ctx = SinkContext {
            endpoint: conn.describe(),
            auth: Arc::default(),
        };
        let producer: FutureProducer<SinkContext> = cc
            .create_with_context(ctx.clone())
            .map_err(|e| map(e, "creating the producer"))?;
        let tx = cfg
            .transactional_id
            .as_ref()
            .map(|_| tokio::sync::Mutex::new(false));
        Ok(KafkaSink {
            cfg,
            producer,
            auth: ctx,
            tx,
            link: None,
        })
    }

    /// Commits the consumed offsets of a Kafka source inside each transaction: the bridge's
    /// output and its input position move together or not at all (Kafka→Kafka
    /// exactly-once). Needs `transactional_id`.
    pub fn with_offsets_of(mut self, link: OffsetsLink) -> Result<Self, Error> {
        if self.tx.is_none() {
            return Err(Error::config(
                "kafka sink: committing a source's offsets needs `transactional_id`",
            )
            .with_context("key", "sink.transactional_id"));
        }
        self.link = Some(link);
        Ok(self)
    }

    /// Enqueues the batch without waiting for room (a full local queue is throttling):
    /// the delivery futures, and the records refused up front (poison, no topic).
    fn enqueue(&self, batch: &[Record]) -> (Vec<(usize, DeliveryFuture)>, Refused) {
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
            match self.producer.send_result(rec) {
                Ok(fut) => pending.push((i, fut)),
                Err((e, _)) => failed.push((i, map(e, "enqueueing a record"))),
            }
        }
        (pending, failed)
    }

    /// One transaction: the batch's records (poison ones left out and reported), then the
    /// linked source's offsets, then the commit. Any failure aborts it all: the batch is
    /// retried as a whole (read_committed readers never see the aborted records).
    async fn write_in_transaction(&self, batch: &[Record]) -> Result<(), WriteError> {
        let Some(tx) = &self.tx else {
            return Err(WriteError::Batch(Error::fatal(
                "kafka sink: not transactional",
            )));
        };
        let mut ready = tx.lock().await;
        let timeout = self.cfg.transaction_timeout;
        if !*ready {
            self.blocking(
                move |p| p.init_transactions(timeout),
                "initializing transactions",
            )
            .await?;
            *ready = true;
        }
        self.producer
            .begin_transaction()
            .map_err(|e| tx_error(e, "beginning a transaction"))?;
        let (pending, poison) = self.enqueue(batch);
        let written: Vec<usize> = pending.iter().map(|(i, _)| *i).collect();
        if let Some(e) = self.auth.failure() {
            // Nothing delivered can commit: abort before returning.
            if let Err(abort) = self
                .blocking(
                    move |p| p.abort_transaction(timeout),
                    "aborting a transaction",
                )
                .await
            {
                tracing::warn!(error = %abort, "kafka sink: abort failed");
            }
            return Err(WriteError::Batch(e));
        }
        // Only poison may be left out: a record refused for another reason (a full queue)
        // must not be skipped by the offsets this transaction commits.
        let mut failure = poison
            .iter()
            .find(|(_, e)| e.kind() != ErrorKind::Poison)
            .map(|(_, e)| Error::new(e.kind(), e.to_string()));
        let deliveries = async {
            let mut first = None;
            for (_, fut) in pending {
                if let Err(e) = delivered(fut).await {
                    first.get_or_insert(e);
                }
            }
            first
        };
        // A cluster that refused the credentials would hold the deliveries until their timeout.
        let undelivered = tokio::select! {
            e = deliveries => e,
            e = self.auth.failed() => Some(e),
        };
        if let Some(e) = undelivered {
            failure.get_or_insert(e);
        }
        if failure.is_none() {
            if let Some(link) = &self.link {
                failure = self.send_offsets(link, batch, &written).await.err();
            }
        }
        if failure.is_none() {
            failure = self
                .blocking(
                    move |p| p.commit_transaction(timeout),
                    "committing a transaction",
                )
                .await
                .err();
        }
        if let Some(e) = failure {
            if e.kind() != ErrorKind::Fenced && e.kind() != ErrorKind::Fatal {
                if let Err(abort) = self
                    .blocking(
                        move |p| p.abort_transaction(timeout),
                        "aborting a transaction",
                    )
                    .await
                {
                    tracing::warn!(error = %abort, "kafka sink: abort failed");
                }
            }
            return Err(WriteError::Batch(e));
        }
        partial(poison)
    }

    /// The next offset of every source partition in the batch, committed in the transaction.
    async fn send_offsets(
        &self,
        link: &OffsetsLink,
        batch: &[Record],
        written: &[usize],
    ) -> Result<(), Error> {
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        for &i in written {
            let r = &batch[i];
            let (Some((topic, part)), Some(o)) = (
                r.partition.as_str().rsplit_once('/'),
                r.position.as_offset(),
            ) else {
                continue;
            };
            let Ok(part) = part.parse::<i32>() else {
                continue;
            };
            let e = next.entry((topic.to_string(), part)).or_insert(o + 1);
            *e = (*e).max(o + 1);
        }
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in next {
            tpl.add_partition_offset(&t, p, Offset::Offset(o))
                .map_err(|e| map(e, "listing the consumed offsets"))?;
        }
        let Some(cgm) = link.group_metadata() else {
            return Err(Error::transient(
                "kafka sink: the linked source is not in its group (yet); offsets cannot be committed",
            ));
        };
        let timeout = self.cfg.transaction_timeout;
        self.blocking(
            move |p| p.send_offsets_to_transaction(&tpl, &cgm, timeout),
            "committing the consumed offsets in the transaction",
        )
        .await
    }

    /// A blocking producer call (transactions wait for the broker) off the async threads.
    async fn blocking(
        &self,
        f: impl FnOnce(&FutureProducer<SinkContext>) -> Result<(), KafkaError> + Send + 'static,
        what: &'static str,
    ) -> Result<(), Error> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || f(&p))
            .await
            .map_err(|e| Error::fatal("kafka producer task failed").with_source(e))?
            .map_err(|e| tx_error(e, what))
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
        if self.tx.is_some() {
            return self.write_in_transaction(batch).await;
        }
        let ctx = &self.auth;
        if let Some(e) = ctx.failure() {
            return Err(WriteError::Batch(e));
        }
        let (pending, failed) = self.enqueue(batch);
        let deliveries = async move {
            let mut failed = failed;
            for (i, fut) in pending {
                if let Err(e) = delivered(fut).await {
                    failed.push((i, e));
                }
            }
            failed
        };
        // Deliveries to a cluster that refused the credentials would wait for their timeout.
        let failed = tokio::select! {
            failed = deliveries => failed,
            e = ctx.failed() => return Err(WriteError::Batch(e)),
        };
        partial(failed)
    }

    async fn flush(&self) -> Result<(), Error> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.flush(Timeout::After(Duration::from_secs(30))))
            .await
            .map_err(|e| Error::fatal("kafka flush task failed").with_source(e))?
            .map_err(|e| map(e, "flushing the producer"))
    }

    async fn check(&self) -> Result<bool, Error> {
        let p = self.producer.clone();
        let topic = self.cfg.topic.clone();
        let auth = self.auth.clone();
        tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(topic.as_deref(), Duration::from_secs(10))
                .map(|_| ())
        })
        .await
        .map_err(|e| Error::fatal("kafka metadata task failed").with_source(e))?
        .map_err(|e| match auth.failure() {
            Some(refused) => refused,
            None => map(e, "reading the topic's metadata"),
        })?;
        match self.auth.failure() {
            Some(refused) => Err(refused),
            None => Ok(true),
        }
    }

    async fn close(&self) -> Result<(), Error> {
        self.flush().await
    }
}

/// Records refused before they reached the producer, by index in the batch.
type Refused = Vec<(usize, Error)>;

async fn delivered(fut: DeliveryFuture) -> Result<(), Error> {
    match fut.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(delivery_error(e)),
        Err(_) => Err(Error::transient(
            "kafka: delivery report lost (producer closed)",
        )),
    }
}

fn partial(mut failed: Vec<(usize, Error)>) -> Result<(), WriteError> {
    if failed.is_empty() {
        Ok(())
    } else {
        failed.sort_by_key(|(i, _)| *i);
        Err(WriteError::Partial(failed))
    }
}

/// A transaction error: fatal ones (a newer producer with the same `transactional.id`
/// fenced this one) stop the pipeline; the rest abort and retry.
fn tx_error(e: KafkaError, what: &'static str) -> Error {
    let fatal = match &e {
        KafkaError::Transaction(r) => r.is_fatal(),
        _ => false,
    };
    let err = map(e, what);
    if fatal && err.kind() != ErrorKind::Fenced {
        return Error::new(ErrorKind::Fatal, err.to_string())
            .with_hint("another producer with the same transactional_id took over");
    }
    err
}

fn delivery_error(e: KafkaError) -> Error {
    let err = map(e, "delivering a record");
    if err.kind() == ErrorKind::Config {
        // A topic that does not exist is an operator problem, not a poison record.
        return Error::fatal(err.to_string());
    }
    err
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A transaction timeout below the delivery timeout is a valid setting: the delivery
    /// timeout follows it instead of librdkafka refusing the producer.
    #[test]
    fn a_short_transaction_timeout_shortens_the_delivery_timeout() {
        let sink = KafkaSink::new(KafkaSinkConfig {
            topic: Some("t".into()),
            transactional_id: Some("tx".into()),
            transaction_timeout: std::time::Duration::from_secs(10),
            ..Default::default()
        });
        assert!(sink.is_ok(), "{:?}", sink.err());
    }
}
