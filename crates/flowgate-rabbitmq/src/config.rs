//! Source and sink settings, with defaults.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The kind of queue consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// A classic queue (the default). Acknowledged messages are gone: not replayable.
    Classic,
    /// A quorum queue (replicated). Like classic for flowgate.
    Quorum,
    /// A stream (`x-queue-type=stream`): an append-only log read by offset; a restart
    /// resumes after the checkpointed offset.
    Stream,
}

impl QueueType {
    pub(crate) fn as_arg(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// Where a stream is read from when there is no checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStart {
    /// The oldest retained message (the default).
    First,
    /// The last chunk.
    Last,
    /// Only messages published from now on.
    Next,
}

/// Reconnection after a lost connection or channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconnectSettings {
    /// First wait. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest wait between attempts. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Give up (a fatal error naming the broker) after trying this long. Default 120 s.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for ReconnectSettings {
    fn default() -> Self {
        ReconnectSettings {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            give_up_after: Duration::from_secs(120),
        }
    }
}

/// TLS settings for an `amqps://` URL: the broker's certificate is verified (its name or IP
/// must match the URL's host), or the connection fails.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitTls {
    /// PEM file of the CA that signed the broker's certificate. Default: the system's trusted
    /// roots.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate, for brokers that ask for one (mutual TLS; with
    /// RabbitMQ's `rabbitmq_auth_mechanism_ssl`, the certificate is also the login).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

/// Settings of the [`RabbitSource`](crate::RabbitSource).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitSourceConfig {
    /// AMQP URL, `amqp://` or `amqps://` (TLS). Default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`. The password never appears in logs.
    pub url: String,
    /// The queue consumed (required). It is the source's one partition.
    pub queue: String,
    /// Default `classic`.
    pub queue_type: QueueType,
    /// Declare the queue (durable, with `queue_type` and `dead_letter_exchange`) instead of
    /// expecting it to exist; re-declared after every reconnect. Default false.
    pub declare: bool,
    /// With `declare`: the queue's `x-dead-letter-exchange`. flowgate declares it (fanout,
    /// durable) and a queue `<queue>.dead-letter` bound to it. Default none.
    pub dead_letter_exchange: Option<String>,
    /// Poison records are rejected to the queue's dead-letter exchange (`basic.nack`,
    /// `requeue=false`) instead of going to a flowgate dead-letter sink. Default: true when
    /// `dead_letter_exchange` is set. The broker's dead-lettered copy carries `x-death`
    /// headers but not flowgate's error text (logged instead); a dead-letter sink gets the
    /// error as headers.
    pub native_dead_letter: Option<bool>,
    /// `basic.qos` prefetch: the most unacknowledged messages the broker pushes to this
    /// consumer. flowgate hands the runtime at most its credit and acknowledges only what the
    /// sink confirmed, so this bounds the memory the source holds. Default 300.
    pub prefetch: u16,
    /// Streams without a checkpoint start here. Default `first`.
    pub stream_start: StreamStart,
    /// Records handed to the runtime per event, at most. Default 500.
    pub max_batch: usize,
    /// How often the queue depth is read as lag. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub lag_interval: Duration,
    /// Reconnection.
    pub reconnect: ReconnectSettings,
    /// TLS settings; only with an `amqps://` URL. Default none (an `amqps://` URL then
    /// verifies against the system's trusted roots).
    pub tls: Option<RabbitTls>,
}

impl Default for RabbitSourceConfig {
    fn default() -> Self {
        RabbitSourceConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            queue: String::new(),
            queue_type: QueueType::Classic,
            declare: false,
            dead_letter_exchange: None,
            native_dead_letter: None,
            prefetch: 300,
            stream_start: StreamStart::First,
            max_batch: 500,
            lag_interval: Duration::from_secs(1),
            reconnect: ReconnectSettings::default(),
            tls: None,
        }
    }
}

/// Settings of the [`RabbitSink`](crate::RabbitSink).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitSinkConfig {
    /// AMQP URL (see the source). The password never appears in logs.
    pub url: String,
    /// Exchange published to. Default `""` (the default exchange: the routing key names the
    /// queue).
    pub exchange: String,
    /// Routing key, unless `routing_key_header` names one per record; without either, the
    /// record's key is used.
    pub routing_key: Option<String>,
    /// A header carrying the routing key per record, checked first.
    pub routing_key_header: Option<String>,
    /// `mandatory` publishes (default true): an unroutable record comes back and is an
    /// error (poison), never silently dropped.
    pub mandatory: bool,
    /// Persistent delivery mode (default true).
    pub persistent: bool,
    /// Declare this queue (durable) and, for a named exchange, bind it with `routing_key`.
    /// Default none.
    pub declare_queue: Option<String>,
    /// How long a publish waits for the broker's confirm. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Largest record; a larger one is poison. Default 16 MiB.
    pub max_record_bytes: usize,
    /// TLS settings (see the source). Default none.
    pub tls: Option<RabbitTls>,
}

impl Default for RabbitSinkConfig {
    fn default() -> Self {
        RabbitSinkConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: String::new(),
            routing_key: None,
            routing_key_header: None,
            mandatory: true,
            persistent: true,
            declare_queue: None,
            confirm_timeout: Duration::from_secs(30),
            max_record_bytes: 16 * 1024 * 1024,
            tls: None,
        }
    }
}

pub(crate) use flowgate_core::redact_url as redact;

impl fmt::Debug for RabbitSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSourceConfig")
            .field("url", &redact(&self.url))
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("declare", &self.declare)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("native_dead_letter", &self.native_dead_letter)
            .field("prefetch", &self.prefetch)
            .field("stream_start", &self.stream_start)
            .field("max_batch", &self.max_batch)
            .field("lag_interval", &self.lag_interval)
            .field("reconnect", &self.reconnect)
            .field("tls", &self.tls)
            .finish()
    }
}

impl fmt::Debug for RabbitSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSinkConfig")
            .field("url", &redact(&self.url))
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("routing_key_header", &self.routing_key_header)
            .field("mandatory", &self.mandatory)
            .field("persistent", &self.persistent)
            .field("declare_queue", &self.declare_queue)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("tls", &self.tls)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_appear_in_debug() {
        let cfg = RabbitSourceConfig {
            url: "amqps://app:s3cret@rabbit.internal:5671/prod".into(),
            queue: "q".into(),
            ..Default::default()
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("app:<redacted>@rabbit.internal"), "{text}");
        let sink = RabbitSinkConfig {
            url: cfg.url.clone(),
            ..Default::default()
        };
        assert!(!format!("{sink:?}").contains("s3cret"));
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
    }
}
