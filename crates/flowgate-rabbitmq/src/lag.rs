//! The RabbitMQ source's lag, read on a channel of its own so that a slow reading never
//! holds deliveries up: classic and quorum queues report their depth (ready messages, from a
//! passive declare); streams report the distance from the newest offset delivered to the
//! stream's end, found by a short-lived consumer attached at `last` (the stream's last chunk)
//! that reads to the end of that chunk.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::{LagSample, LagUnit, PartitionId, SourceEvent, SourceInbox};
use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::watch;

use crate::delivery::{DeliveryBuffer, stream_offset};

/// A stream lag reading waits this long for the next message of the last chunk.
const PROBE_IDLE: Duration = Duration::from_millis(100);
/// A stream lag reading takes at most this long (a producer may keep the chunk growing).
pub(crate) const PROBE_MAX: Duration = Duration::from_secs(1);
/// Unacknowledged messages a stream lag reading may hold: bounds its memory (it needs the
/// offsets, but AMQP sends whole messages). A stream may overshoot it by part of a chunk.
const PROBE_PREFETCH: u16 = 16;

/// Aborts a task when dropped (a session that ends takes its lag probe along).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the queue's lag every `interval` on a channel of its own.
pub(crate) struct LagProbe {
    pub(crate) queue: String,
    pub(crate) partition: PartitionId,
    pub(crate) stream: bool,
    pub(crate) interval: Duration,
    pub(crate) inbox: Arc<SourceInbox<DeliveryBuffer>>,
    pub(crate) closing: watch::Receiver<bool>,
    pub(crate) tag: String,
}

impl LagProbe {
    pub(crate) async fn run(mut self, ch: Channel) {
        if self.stream {
            if let Err(e) = stream_probe_channel(&ch).await {
                tracing::warn!(error = %e, queue = %self.queue, "rabbitmq: cannot set up lag readings; lag is not reported");
                return;
            }
        }
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tokio::select! {
                _ = self.closing.changed() => break,
                _ = tick.tick() => {}
            }
            let lag = if self.stream {
                self.stream_lag(&ch, n).await
            } else {
                self.depth(&ch).await.map(Some)
            };
            match lag {
                Ok(Some(lag)) => self.inbox.push_event(SourceEvent::Lag(vec![LagSample {
                    partition: self.partition.clone(),
                    lag,
                    unit: LagUnit::Records,
                }])),
                Ok(None) => {}
                Err(e) => {
                    // The session's own channel sees the same failure and reconnects.
                    tracing::debug!(error = %e, queue = %self.queue, "rabbitmq: lag reading failed");
                    return;
                }
            }
        }
        let _ = ch.close(200, "flowgate closing".into()).await;
    }

    /// Ready messages (a passive declare).
    async fn depth(&self, ch: &Channel) -> Result<u64, lapin::Error> {
        let q = ch
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(u64::from(q.message_count()))
    }

    /// The stream's end minus the newest offset delivered. `None` before the first delivery,
    /// or if the stream's end could not be read.
    async fn stream_lag(&self, ch: &Channel, n: u64) -> Result<Option<u64>, lapin::Error> {
        let Some(delivered) = self.inbox.buffered().last_offset else {
            return Ok(None);
        };
        let end = stream_end(ch, &self.queue, &format!("{}-{n}", self.tag)).await?;
        Ok(end.map(|end| end.saturating_sub(delivered)))
    }
}

/// The stream's end: the highest offset of its last chunk, read by a consumer attached at
/// `last` (on a channel whose prefetch bounds what it holds). `None` for an empty stream.
pub(crate) async fn stream_end(
    ch: &Channel,
    queue: &str,
    tag: &str,
) -> Result<Option<u64>, lapin::Error> {
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("last".into()),
    );
    let mut reader = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let deadline = tokio::time::Instant::now() + PROBE_MAX;
    let mut end = None;
    while let Ok(Some(d)) = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + PROBE_IDLE),
        reader.next(),
    )
    .await
    {
        let d = d?;
        end = end.max(stream_offset(&d));
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    ch.basic_cancel(tag.into(), BasicCancelOptions::default())
        .await?;
    Ok(end)
}

/// Prepares `ch` for [`stream_end`]: a prefetch that bounds what a reading holds.
pub(crate) async fn stream_probe_channel(ch: &Channel) -> Result<(), lapin::Error> {
    ch.basic_qos(PROBE_PREFETCH, BasicQosOptions::default())
        .await
}

/// One reading of the stream's end on `ch` (for `flowgate lag`, from outside a pipeline);
/// `None` for an empty stream or a failed reading (logged).
pub(crate) async fn stream_end_once(ch: &Channel, queue: &str) -> Option<u64> {
    let read = async {
        stream_probe_channel(ch).await?;
        stream_end(ch, queue, "flowgate-lag").await
    };
    match read.await {
        Ok(end) => end,
        Err(e) => {
            tracing::warn!(error = %e, queue, "rabbitmq: cannot read the stream's end; lag unknown");
            None
        }
    }
}
