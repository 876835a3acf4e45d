//! The RabbitMQ source: one queue, consumed with manual acknowledgements.
//!
//! - A driver task owns the connection: it connects (with backoff), declares what flowgate
//!   declares, sets the `basic.qos` prefetch, consumes, and pushes deliveries into a buffer
//!   that the prefetch bounds. `next()` hands the runtime at most its credit from that buffer.
//!   The prefetch is at most the runtime's in-flight limit per partition, so the broker's
//!   window (prefetch − unacknowledged) is the runtime's credit.
//! - Acknowledgements are the commits: `commit` acks everything up to the checkpointed
//!   delivery with `multiple=true`. Nothing is acked on its own.
//! - A lost connection or channel is a *lost* revocation of the queue's partition (its
//!   unacknowledged messages come back, marked redelivered), then a reconnect, a re-declare
//!   and a new assignment. A consumer cancelled by the broker while the connection is fine
//!   (the queue was deleted) is a fatal error, not a hang.
//! - Positions: classic and quorum queues use `(channel epoch << 64) | delivery tag`, so they
//!   only grow across reconnects; streams use the stream offset, and a new consumer starts
//!   with `x-stream-offset` after the checkpoint.
//! - Lag is read on a channel of its own, so a slow reading never holds deliveries up:
//!   classic and quorum queues report their depth (ready messages, from a passive declare);
//!   streams report the distance from the newest offset delivered to the stream's end, found by
//!   a short-lived consumer attached at `last` (the stream's last chunk) that reads to the end
//!   of that chunk.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::retry::BackoffPolicy;
use flowgate_core::{
    Assignment, Checkpoint, Connection as BrokerConnection, Credits, Error, ErrorKind, Headers,
    IdempotencyKey, LagUnit, PartitionId, Position, Record, Revocation, Source, SourceCapabilities,
    SourceContext, SourceEvent, SourceInbox, StartPosition,
};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};
use tokio::sync::{mpsc, watch};

use crate::config::{QueueType, RabbitSourceConfig, StreamStart, redact};
use crate::delivery::{Live, Shared, stream_offset, value_bytes};
use crate::error::map;
use crate::lag::{AbortOnDrop, LagProbe, PROBE_MAX};

/// RabbitMQ source over one queue (classic, quorum or stream). See the module docs.
pub struct RabbitSource {
    cfg: RabbitSourceConfig,
    partition: PartitionId,
    inbox: Arc<SourceInbox<Shared>>,
    credits: Option<Credits>,
    starts: Option<mpsc::UnboundedSender<Option<Position>>>,
    closing: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RabbitSource {
    /// A source; nothing connects before `open`.
    pub fn new(cfg: RabbitSourceConfig) -> Result<Self, Error> {
        if cfg.queue.is_empty() {
            return Err(Error::config("rabbitmq source: no queue to consume")
                .with_context("key", "source.queue"));
        }
        if cfg.prefetch == 0 {
            return Err(Error::config(
                "rabbitmq source: prefetch must be at least 1 (0 means unlimited in AMQP)",
            )
            .with_context("key", "source.prefetch"));
        }
        if cfg.max_batch == 0 {
            return Err(
                Error::config("rabbitmq source: max_batch must be at least 1")
                    .with_context("key", "source.max_batch"),
            );
        }
        crate::client::check_tls(&cfg.url, cfg.tls.as_ref(), "source")?;
        if cfg.queue_type == QueueType::Stream && cfg.native_dead_letter == Some(true) {
            return Err(Error::config(
                "rabbitmq source: streams cannot dead-letter on the broker; use a dead-letter sink",
            )
            .with_context("key", "source.native_dead_letter"));
        }
        Ok(RabbitSource {
            partition: PartitionId::new(&cfg.queue),
            cfg,
            inbox: Arc::default(),
            credits: None,
            starts: None,
            closing: watch::channel(false).0,
            task: None,
        })
    }

    fn stream(&self) -> bool {
        self.cfg.queue_type == QueueType::Stream
    }

    fn native_dead_letter(&self) -> bool {
        !self.stream()
            && self
                .cfg
                .native_dead_letter
                .unwrap_or(self.cfg.dead_letter_exchange.is_some())
    }

    /// The delivery tag behind a position, if it belongs to the live channel.
    fn tag_of(&self, position: &Position, live: &Live) -> Option<u64> {
        if self.stream() {
            let offset = position.as_u64()?;
            let (epoch, tag) = *self.inbox.buffered().tags.get(&offset)?;
            (epoch == live.epoch).then_some(tag)
        } else {
            let v = position.as_u128()?;
            ((v >> 64) as u64 == live.epoch).then_some(v as u64)
        }
    }
}

#[async_trait]
impl Source for RabbitSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::replayable_ordered()
            .with_replayable(self.stream())
            .with_eager_commit(true)
            .with_native_dead_letter(self.native_dead_letter())
            .with_dynamic_assignment(true)
            .with_lag_unit(Some(LagUnit::Records))
    }

    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        let (start_tx, start_rx) = mpsc::unbounded_channel();
        // The broker's window is the runtime's: it never pushes more unacknowledged messages
        // than the runtime holds in flight for the queue, so the broker's remaining window
        // (prefetch − unacknowledged) follows the runtime's credit as acks flow.
        let mut cfg = self.cfg.clone();
        let limit = u16::try_from(ctx.max_in_flight_per_partition).unwrap_or(u16::MAX);
        if limit < cfg.prefetch {
            tracing::info!(queue = %cfg.queue, prefetch = cfg.prefetch, max_in_flight_per_partition = limit,
                "rabbitmq: prefetch lowered to the runtime's in-flight limit");
            cfg.prefetch = limit.max(1);
        }
        let driver = Driver {
            cfg,
            partition: self.partition.clone(),
            inbox: self.inbox.clone(),
            starts: start_rx,
            closing: self.closing.subscribe(),
            tag: format!("flowgate-{}", ctx.pipeline),
        };
        // The first connection is tried here, so a wrong URL or password fails `open`; a
        // broker that is down is reported as a disconnection and retried by the driver.
        let conn = match driver.connect_once().await {
            Ok(c) => {
                tracing::info!(queue = %self.cfg.queue, url = %redact(&self.cfg.url), "rabbitmq: source connected");
                Some(c)
            }
            Err(e) if e.kind() == ErrorKind::Config => return Err(e),
            Err(e) => {
                driver.push(SourceEvent::Connection(BrokerConnection::Down {
                    endpoint: redact(&self.cfg.url),
                    cause: e.to_string(),
                }));
                None
            }
        };
        self.task = Some(tokio::spawn(driver.run(conn)));
        self.starts = Some(start_tx);
        self.credits = Some(ctx.credits);
        Ok(())
    }

    async fn next(&mut self) -> Result<SourceEvent, Error> {
        let Some(credits) = self.credits.clone() else {
            return Err(Error::fatal("RabbitSource::next called before open"));
        };
        let (partition, max_batch) = (self.partition.clone(), self.cfg.max_batch);
        self.inbox
            .next(&credits, Duration::from_millis(200), |sh, credits| {
                let take = credits
                    .available(&partition)
                    .min(max_batch)
                    .min(sh.buf.len());
                (take > 0).then(|| sh.buf.drain(..take).collect())
            })
            .await
    }

    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        let after = starts
            .into_iter()
            .find(|s| s.partition == self.partition)
            .and_then(|s| s.after);
        match &self.starts {
            Some(tx) => tx
                .send(after)
                .map_err(|_| Error::fatal("the RabbitMQ driver task stopped")),
            None => Err(Error::fatal("RabbitSource::start called before open")),
        }
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        let Some(cp) = checkpoints.iter().find(|c| c.partition == self.partition) else {
            return Ok(());
        };
        let Some(live) = self.inbox.buffered().live.clone() else {
            // The channel is gone: its unacknowledged messages are redelivered anyway.
            return Ok(());
        };
        let tag = if self.stream() {
            let Some(offset) = cp.position.as_u64() else {
                return Ok(());
            };
            let mut sh = self.inbox.buffered();
            let rest = sh.tags.split_off(&(offset + 1));
            let done = std::mem::replace(&mut sh.tags, rest);
            done.values()
                .filter(|(epoch, _)| *epoch == live.epoch)
                .map(|(_, tag)| *tag)
                .max()
        } else {
            self.tag_of(&cp.position, &live)
                .and_then(|tag| self.inbox.buffered().settled.ack_through(live.epoch, tag))
        };
        let Some(tag) = tag else {
            return Ok(());
        };
        if let Err(e) = live
            .channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
        {
            // The driver sees the same failure and reconnects; the messages come back.
            tracing::warn!(error = %e, "rabbitmq: ack failed; the messages will be redelivered");
        }
        Ok(())
    }

    async fn reject(&mut self, record: &Record, error: &Error) -> Result<(), Error> {
        let Some(live) = self.inbox.buffered().live.clone() else {
            return Ok(());
        };
        let Some(tag) = self.tag_of(&record.position, &live) else {
            return Ok(());
        };
        if !self.inbox.buffered().settled.reject(live.epoch, tag) {
            return Ok(());
        }
        tracing::warn!(queue = %self.cfg.queue, error = %error, "rabbitmq: poison record rejected to the dead-letter exchange");
        live.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: false,
                },
            )
            .await
            .map_err(|e| map(e, "rejecting a poison record"))
    }

    async fn inspect(
        &mut self,
        _pipeline: &str,
        checkpoints: &[Checkpoint],
    ) -> Result<Vec<flowgate_core::PartitionView>, Error> {
        let conn = crate::client::connect(&self.cfg.url, self.cfg.tls.as_ref(), "source").await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| map(e, "opening a channel"))?;
        let q = ch
            .queue_declare(
                self.cfg.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                map(e, "reading the queue")
                    .with_context("queue", &self.cfg.queue)
                    .with_context("key", "source.queue")
            })?;
        let consumers = q.consumer_count();
        let partition = PartitionId::new(&self.cfg.queue);
        // A stream keeps every message: its depth is not what is left to read, the distance
        // from the stored checkpoint to the stream's end is.
        let (end, lag) = if self.stream() {
            let end = crate::lag::stream_end_once(&ch, &self.cfg.queue).await;
            let checkpoint = checkpoints
                .iter()
                .find(|c| c.partition == partition)
                .and_then(|c| c.position.as_u64());
            // Without a checkpoint the source starts at `stream_start`: from the first
            // retained message (all of it is behind, up to retention), or at the end.
            let lag = end.and_then(|end| match (checkpoint, self.cfg.stream_start) {
                (Some(done), _) => Some(end.saturating_sub(done)),
                (None, StreamStart::First) => Some(end + 1),
                (None, _) => None,
            });
            (end.map(Position::from), lag)
        } else {
            (None, Some(u64::from(q.message_count())))
        };
        let _ = conn.close(200, "flowgate lag".into()).await;
        Ok(vec![flowgate_core::PartitionView {
            partition,
            broker_committed: None,
            end,
            lag_records: lag,
            lag_seconds: lag.and_then(|n| (n == 0).then_some(0.0)),
            owner: (consumers > 0).then(|| format!("{consumers} consumer(s)")),
        }])
    }

    async fn close(&mut self) -> Result<(), Error> {
        let _ = self.closing.send(true);
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                tracing::warn!("rabbitmq: the connection did not close within 10 s; abandoned");
            }
        }
        self.starts = None;
        Ok(())
    }
}

impl Drop for RabbitSource {
    fn drop(&mut self) {
        let _ = self.closing.send(true);
    }
}

/// How a consuming session ended.
enum Ended {
    Closing,
    Lost(Error),
    Fatal(Error),
}

struct Driver {
    cfg: RabbitSourceConfig,
    partition: PartitionId,
    inbox: Arc<SourceInbox<Shared>>,
    starts: mpsc::UnboundedReceiver<Option<Position>>,
    closing: watch::Receiver<bool>,
    tag: String,
}

impl Driver {
    async fn connect_once(&self) -> Result<Connection, Error> {
        crate::client::connect(&self.cfg.url, self.cfg.tls.as_ref(), "source").await
    }

    /// Connects with exponential backoff until `give_up_after`.
    async fn connect(&mut self) -> Result<Option<Connection>, Error> {
        let r = &self.cfg.reconnect;
        let mut backoff = BackoffPolicy::new(r.initial_backoff, r.max_backoff)
            .with_give_up_after(r.give_up_after)
            .start();
        loop {
            let wait = match self.connect_once().await {
                Ok(c) => return Ok(Some(c)),
                Err(e) if e.kind() == ErrorKind::Config => return Err(e),
                Err(e) => match backoff.next_delay() {
                    Some(wait) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "rabbitmq: cannot connect; retrying");
                        wait
                    }
                    None => {
                        return Err(Error::fatal(format!(
                            "rabbitmq: broker unreachable for {:?}; giving up",
                            r.give_up_after
                        ))
                        .with_context("url", redact(&self.cfg.url))
                        .with_context("last_error", e)
                        .with_hint("check that RabbitMQ runs and the url is right"));
                    }
                },
            };
            tokio::select! {
                _ = self.closing.changed() => return Ok(None),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn push(&self, ev: SourceEvent) {
        self.inbox.push_event(ev);
    }

    async fn run(mut self, first: Option<Connection>) {
        let mut down = first.is_none();
        let mut conn = first;
        let mut epoch = 0u64;
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => match self.connect().await {
                    Ok(Some(c)) => {
                        if std::mem::take(&mut down) {
                            tracing::info!(queue = %self.cfg.queue, url = %redact(&self.cfg.url), "rabbitmq: source connected");
                            self.push(SourceEvent::Connection(BrokerConnection::Up));
                        }
                        c
                    }
                    Ok(None) => return,
                    Err(e) => {
                        self.inbox.fail(e);
                        return;
                    }
                },
            };
            epoch += 1;
            let ended = self.session(&c, epoch).await;
            {
                let mut sh = self.inbox.buffered();
                sh.live = None;
                // Unacknowledged deliveries come back on the next channel.
                sh.buf.clear();
                sh.tags.clear();
            }
            match ended {
                Ended::Closing => {
                    let _ = c.close(200, "flowgate closing".into()).await;
                    return;
                }
                Ended::Fatal(e) => {
                    let _ = c.close(200, "flowgate stopping".into()).await;
                    self.inbox.fail(e);
                    return;
                }
                Ended::Lost(e) => {
                    tracing::warn!(queue = %self.cfg.queue, error = %e, "rabbitmq: connection lost; reconnecting (unacknowledged messages will be redelivered)");
                    let (rev, _waiter) = Revocation::new(vec![self.partition.clone()], true);
                    self.push(SourceEvent::Revoked(rev));
                    down = true;
                    self.push(SourceEvent::Connection(BrokerConnection::Down {
                        endpoint: redact(&self.cfg.url),
                        cause: e.to_string(),
                    }));
                }
            }
        }
    }

    async fn declare(&self, ch: &Channel) -> Result<(), Error> {
        let q = &self.cfg.queue;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.cfg.queue_type.as_arg().into()),
        );
        if let Some(dlx) = &self.cfg.dead_letter_exchange {
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
            .map_err(|e| {
                map(e, "declaring the dead-letter exchange").with_context("exchange", dlx)
            })?;
            let dlq = format!("{q}.dead-letter");
            ch.queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map(e, "declaring the dead-letter queue").with_context("queue", &dlq))?;
            ch.queue_bind(
                dlq.as_str().into(),
                dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map(e, "binding the dead-letter queue").with_context("queue", &dlq))?;
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.as_str().into()),
            );
        }
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(|e| map(e, "declaring the queue").with_context("queue", q))?;
        Ok(())
    }

    /// One channel's life: declare, assign, consume until closing or failure.
    async fn session(&mut self, conn: &Connection, epoch: u64) -> Ended {
        let setup = async {
            let ch = conn
                .create_channel()
                .await
                .map_err(|e| map(e, "opening a channel"))?;
            ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| map(e, "setting the prefetch"))?;
            if self.cfg.declare {
                self.declare(&ch).await?;
            }
            Ok::<_, Error>(ch)
        };
        let ch = match setup.await {
            Ok(ch) => ch,
            Err(e) if e.kind() == ErrorKind::Config => return Ended::Fatal(e),
            Err(e) => return Ended::Lost(e),
        };
        // The runtime decides where a stream resumes (its checkpoint); queues just resume.
        self.push(SourceEvent::Assigned(vec![Assignment::new(
            self.partition.clone(),
        )]));
        let after = tokio::select! {
            _ = self.closing.changed() => return Ended::Closing,
            s = self.starts.recv() => match s {
                Some(after) => after,
                None => return Ended::Closing,
            },
        };
        let mut args = FieldTable::default();
        if self.cfg.queue_type == QueueType::Stream {
            let offset = match after.as_ref().and_then(Position::as_u64) {
                Some(o) => AMQPValue::LongLongInt(o as i64 + 1),
                None => AMQPValue::LongString(LongString::from(match self.cfg.stream_start {
                    StreamStart::First => "first",
                    StreamStart::Last => "last",
                    StreamStart::Next => "next",
                })),
            };
            tracing::info!(queue = %self.cfg.queue, after = ?after, "rabbitmq: consuming the stream");
            args.insert("x-stream-offset".into(), offset);
        }
        let mut consumer = match ch
            .basic_consume(
                self.cfg.queue.as_str().into(),
                format!("{}-{epoch}", self.tag).as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let e = map(e, "consuming").with_context("queue", &self.cfg.queue);
                return if e.kind() == ErrorKind::Config {
                    Ended::Fatal(e)
                } else {
                    Ended::Lost(e)
                };
            }
        };
        self.inbox.buffered().live = Some(Live {
            epoch,
            channel: ch.clone(),
        });
        let lag = match conn.create_channel().await {
            Ok(lc) => Some(AbortOnDrop(tokio::spawn(self.lag_probe().run(lc)))),
            Err(e) => {
                tracing::warn!(error = %e, queue = %self.cfg.queue, "rabbitmq: no channel for lag readings; lag is not reported");
                None
            }
        };
        loop {
            tokio::select! {
                _ = self.closing.changed() => {
                    // Channels first, then the connection: unacknowledged messages go back
                    // to the queue. The lag probe closes its own channel on `closing`.
                    if let Some(mut probe) = lag {
                        let _ = tokio::time::timeout(PROBE_MAX * 2, &mut probe.0).await;
                    }
                    let _ = ch.close(200, "flowgate closing".into()).await;
                    return Ended::Closing;
                }
                d = consumer.next() => match d {
                    Some(Ok(delivery)) => {
                        let record = self.record(delivery, epoch);
                        if let Some(r) = record {
                            self.inbox.buffered().buf.push_back(r);
                            self.inbox.wake();
                        }
                    }
                    Some(Err(e)) => return Ended::Lost(map(e, "consuming")),
                    None => {
                        return if conn.status().connected() && ch.status().connected() {
                            Ended::Fatal(Error::fatal(format!(
                                "rabbitmq: the broker cancelled the consumer of queue `{}` (was the queue deleted?)",
                                self.cfg.queue
                            )).with_hint("re-create the queue (or set `declare = true`) and restart"))
                        } else {
                            Ended::Lost(Error::transient("rabbitmq: the connection closed"))
                        };
                    }
                },
            }
        }
    }

    fn lag_probe(&self) -> LagProbe {
        LagProbe {
            queue: self.cfg.queue.clone(),
            partition: self.partition.clone(),
            stream: self.cfg.queue_type == QueueType::Stream,
            interval: self.cfg.lag_interval,
            inbox: self.inbox.clone(),
            closing: self.closing.clone(),
            tag: format!("{}-lag", self.tag),
        }
    }

    fn record(&self, d: Delivery, epoch: u64) -> Option<Record> {
        let tag: u64 = d.delivery_tag;
        let mut headers = Headers::new();
        let stream_offset = stream_offset(&d);
        if let Some(table) = d.properties.headers() {
            for (k, v) in table.inner() {
                if let Some(bytes) = value_bytes(v) {
                    headers.push(k.as_str(), bytes);
                }
            }
        }
        let position = if self.cfg.queue_type == QueueType::Stream {
            let Some(offset) = stream_offset else {
                tracing::warn!(queue = %self.cfg.queue, "rabbitmq: stream delivery without x-stream-offset; skipped");
                return None;
            };
            let mut sh = self.inbox.buffered();
            sh.tags.insert(offset, (epoch, tag));
            sh.last_offset = Some(offset);
            Position::from(offset)
        } else {
            Position::new((u128::from(epoch) << 64) | u128::from(tag))
        };
        let timestamp = d
            .properties
            .timestamp()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or_else(SystemTime::now);
        // The record's key: what a flowgate sink stored, else the routing key.
        let key = headers.get(crate::KEY_HEADER).cloned().or_else(|| {
            (!d.routing_key.as_str().is_empty())
                .then(|| Bytes::copy_from_slice(d.routing_key.as_str().as_bytes()))
        });
        Some(Record {
            partition: self.partition.clone(),
            position,
            key,
            idempotency_key: d
                .properties
                .message_id()
                .as_ref()
                .map(|id| IdempotencyKey::new(Bytes::copy_from_slice(id.as_str().as_bytes()))),
            payload: Bytes::from(d.data),
            headers,
            timestamp: Some(timestamp),
            redelivered: d.redelivered,
        })
    }
}
