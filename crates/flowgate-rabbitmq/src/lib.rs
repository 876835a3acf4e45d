//! # flowgate-rabbitmq
//!
//! RabbitMQ for flowgate, on lapin:
//!
//! - [`RabbitSource`]: one queue (classic, quorum or stream) consumed with manual
//!   acknowledgements sent only after the sink confirmed; `basic.qos` prefetch bounds what
//!   the broker pushes and the runtime's credit bounds what is handed over; reconnects with
//!   backoff (unacknowledged messages come back marked redelivered and go through dedup);
//!   poison records rejected to the dead-letter exchange or sent to a dead-letter sink;
//!   streams resumed after the checkpointed offset; queue depth as lag.
//! - [`RabbitSink`]: publisher confirms, `mandatory` publishes (unroutable records are
//!   errors), persistent messages, the idempotency key as `message_id`.
//!
//! The guide with configuration keys and semantics is `docs/brokers/rabbitmq.md`.

//!
//! ```no_run
//! use flowgate_rabbitmq::{RabbitSink, RabbitSinkConfig, RabbitSource, RabbitSourceConfig};
//!
//! # fn demo() -> Result<(), flowgate_core::Error> {
//! // Consume the queue `orders` (prefetch bounded by the runtime's credit).
//! let source = RabbitSource::new(RabbitSourceConfig {
//!     url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
//!     queue: "orders".into(),
//!     ..Default::default()
//! })?;
//! // Publish with confirms to the exchange `invoices`.
//! let sink = RabbitSink::new(RabbitSinkConfig {
//!     url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
//!     exchange: "invoices".into(),
//!     ..Default::default()
//! })?;
//! # let _ = (source, sink);
//! # Ok(()) }
//! ```
#![doc = include_str!("docs.md")]

mod client;
mod config;
mod delivery;
mod error;
mod lag;
mod sink;
mod source;

pub use config::{
    QueueType, RabbitSinkConfig, RabbitSourceConfig, RabbitTls, ReconnectSettings, StreamStart,
};
pub use sink::RabbitSink;

/// The header that carries a record's key through RabbitMQ (which has no message key): the
/// sink sets it, the source reads it back (falling back to the routing key).
pub const KEY_HEADER: &str = "flowgate-key";
pub use source::RabbitSource;
