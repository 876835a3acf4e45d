//! # flowgate-kafka
//!
//! Apache Kafka for flowgate, on rdkafka (librdkafka, built and linked statically):
//!
//! - [`KafkaSource`]: a consumer group member that reads each partition only up to the
//!   runtime's credit for it and pauses partitions starved of credit (it keeps polling: never
//!   kicked out of the group), offsets stored
//!   and committed only after the sink confirmed and the checkpoint store recorded them,
//!   rebalances that drain and commit before releasing partitions, cooperative-sticky by
//!   default, static membership optional.
//! - [`KafkaSink`]: an idempotent producer (`acks=all`); records are confirmed by their
//!   delivery reports; the idempotency key travels as a header.
//!
//! ```no_run
//! use flowgate_kafka::{KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig};
//!
//! # fn demo() -> Result<(), flowgate_core::Error> {
//! // A member of group `billing` reading `orders`; hand it to `Pipeline::builder(..).source(..)`.
//! let source = KafkaSource::new(KafkaSourceConfig {
//!     bootstrap_servers: "127.0.0.1:9092".into(),
//!     topics: vec!["orders".into()],
//!     group_id: Some("billing".into()),
//!     ..Default::default()
//! })?;
//! // An idempotent producer writing every record to `invoices`.
//! let sink = KafkaSink::new(KafkaSinkConfig {
//!     bootstrap_servers: "127.0.0.1:9092".into(),
//!     topic: Some("invoices".into()),
//!     ..Default::default()
//! })?;
//! # let _ = (source, sink);
//! # Ok(()) }
//! ```
#![doc = include_str!("docs.md")]

mod client;
mod config;
mod error;
mod lag;
mod rebalance;
mod sink;
mod source;

pub use client::records::partition_id;
pub use config::{
    AssignmentStrategy, Compression, GroupProtocol, KafkaSasl, KafkaSinkConfig, KafkaSourceConfig,
    KafkaTls, SaslMechanism, SecurityProtocol,
};
pub use sink::KafkaSink;
pub use source::{KafkaSource, OffsetsLink};
