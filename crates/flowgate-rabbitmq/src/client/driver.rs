//! The source's connection task: it connects (with backoff), declares what flowgate
//! declares, sets the `basic.qos` prefetch, consumes, and pushes the deliveries as records
//! into the buffer `next()` reads; a lost connection is revoked, reconnected and assigned
//! again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flowgate_core::retry::BackoffPolicy;
use flowgate_core::{
    Assignment, Connection as BrokerConnection, Error, ErrorKind, Headers, IdempotencyKey,
    PartitionId, Position, Record, Revocation, SourceEvent, SourceInbox,
};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, Consumer, ExchangeKind};
use tokio::sync::{mpsc, watch};

use crate::config::{QueueType, RabbitSourceConfig, StreamStart, redact};
use crate::delivery::{DeliveryBuffer, Live, stream_offset, value_bytes};
use crate::error::map;
use crate::lag::{AbortOnDrop, LagProbe, PROBE_MAX};

/// How a consuming session ended.
pub(crate) enum Ended {
    Closing,
    Lost(Error),
    Fatal(Error),
}

impl Ended {
    /// A failure: fatal if it is a configuration error, a lost connection otherwise.
    fn by(e: Error) -> Ended {
        if e.kind() == ErrorKind::Config {
            Ended::Fatal(e)
        } else {
            Ended::Lost(e)
        }
    }
}

/// The task that owns the source's connection: connects, consumes, and reconnects.
pub(crate) struct Driver {
    pub(crate) cfg: RabbitSourceConfig,
    pub(crate) partition: PartitionId,
    pub(crate) inbox: Arc<SourceInbox<DeliveryBuffer>>,
    pub(crate) starts: mpsc::UnboundedReceiver<Option<Position>>,
    pub(crate) closing: watch::Receiver<bool>,
    pub(crate) tag: String,
}

impl Driver {
    pub(crate) async fn connect_once(&self) -> Result<Connection, Error> {
        super::connect(&self.cfg.url, self.cfg.tls.as_ref(), "source").await
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

    pub(crate) fn push(&self, ev: SourceEvent) {
        self.inbox.push_event(ev);
    }

    pub(crate) async fn run(mut self, first: Option<Connection>) {
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
        let ch = match self.open_channel(conn).await {
            Ok(ch) => ch,
            Err(e) => return Ended::by(e),
        };
        let after = match self.assign().await {
            Ok(after) => after,
            Err(ended) => return ended,
        };
        let consumer = match self.consume(&ch, epoch, after).await {
            Ok(c) => c,
            Err(e) => return Ended::by(e.with_context("queue", &self.cfg.queue)),
        };
        self.inbox.buffered().live = Some(Live {
            epoch,
            channel: ch.clone(),
        });
        let lag = self.spawn_lag_probe(conn).await;
        self.receive(conn, &ch, consumer, lag, epoch).await
    }

    /// A channel with the prefetch set, and what flowgate declares declared.
    async fn open_channel(&self, conn: &Connection) -> Result<Channel, Error> {
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
        Ok(ch)
    }

    /// Announces the queue's partition and waits for the position to start after.
    async fn assign(&mut self) -> Result<Option<Position>, Ended> {
        // The runtime decides where a stream resumes (its checkpoint); queues just resume.
        self.push(SourceEvent::Assigned(vec![Assignment::new(
            self.partition.clone(),
        )]));
        tokio::select! {
            _ = self.closing.changed() => Err(Ended::Closing),
            s = self.starts.recv() => s.ok_or(Ended::Closing),
        }
    }

    /// Starts consuming; a stream after `after`, or at `stream_start` without it.
    async fn consume(
        &self,
        ch: &Channel,
        epoch: u64,
        after: Option<Position>,
    ) -> Result<Consumer, Error> {
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
        ch.basic_consume(
            self.cfg.queue.as_str().into(),
            format!("{}-{epoch}", self.tag).as_str().into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(|e| map(e, "consuming"))
    }

    /// The lag probe on a channel of its own; `None` (lag not reported) without one.
    async fn spawn_lag_probe(&self, conn: &Connection) -> Option<AbortOnDrop> {
        match conn.create_channel().await {
            Ok(lc) => Some(AbortOnDrop(tokio::spawn(self.lag_probe().run(lc)))),
            Err(e) => {
                tracing::warn!(error = %e, queue = %self.cfg.queue, "rabbitmq: no channel for lag readings; lag is not reported");
                None
            }
        }
    }

    /// Buffers deliveries until closing, or until the channel or the consumer is gone.
    async fn receive(
        &mut self,
        conn: &Connection,
        ch: &Channel,
        mut consumer: Consumer,
        lag: Option<AbortOnDrop>,
        epoch: u64,
    ) -> Ended {
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
                    None => return self.consumer_gone(conn, ch),
                },
            }
        }
    }

    /// The consumer stream ended: the broker cancelled it if the connection is still up.
    fn consumer_gone(&self, conn: &Connection, ch: &Channel) -> Ended {
        if conn.status().connected() && ch.status().connected() {
            Ended::Fatal(Error::fatal(format!(
                "rabbitmq: the broker cancelled the consumer of queue `{}` (was the queue deleted?)",
                self.cfg.queue
            )).with_hint("re-create the queue (or set `declare = true`) and restart"))
        } else {
            Ended::Lost(Error::transient("rabbitmq: the connection closed"))
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
