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
use std::time::Duration;

use async_trait::async_trait;
use flowgate_core::{
    Checkpoint, Connection as BrokerConnection, Credits, Error, ErrorKind, LagUnit, PartitionId,
    Position, Record, Source, SourceCapabilities, SourceContext, SourceEvent, SourceInbox,
    StartPosition,
};
use lapin::options::{BasicAckOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::sync::{mpsc, watch};

use crate::client::driver::Driver;
use crate::config::{QueueType, RabbitSourceConfig, StreamStart, redact};
use crate::delivery::{DeliveryBuffer, Live};
use crate::error::map;

/// RabbitMQ source over one queue (classic, quorum or stream). See the module docs.
pub struct RabbitSource {
    cfg: RabbitSourceConfig,
    partition: PartitionId,
    inbox: Arc<SourceInbox<DeliveryBuffer>>,
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
