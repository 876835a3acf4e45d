//! # flowgate
//!
//! Multi-broker streaming with one backpressure runtime. This facade re-exports the parts
//! picked by Cargo features:
//!
//! - [`core`]: records, positions, the `Source` / `Sink` / `CheckpointStore` / `DedupStore`
//!   traits, errors;
//! - [`runtime`]: the pipeline builder and the in-process adapters (generator, null,
//!   JSON-lines, fault injection) and, with feature `endpoint` (default), the HTTP endpoint
//!   that serves `/metrics`, `/health`, `/ready` and `/status`;
//! - [`checkpoint`]: the stores (in-memory; embedded redb with feature `embedded-store`;
//!   PostgreSQL, Redis and DynamoDB with `postgres-store`, `redis-store`, `dynamodb-store`);
//! - `kafka` (feature `kafka`): the Apache Kafka source and sink;
//! - `rabbitmq` (feature `rabbitmq`): the RabbitMQ source and sink.
//! - `kinesis` (feature `kinesis`): the Kinesis Data Streams source and sink.
//! - `http` (feature `http`): the HTTP sink.
//!
//! ```no_run
//! use flowgate::runtime::adapters::{GeneratorConfig, GeneratorSource, NullSink};
//! use flowgate::runtime::{Pipeline, RuntimeSettings, Shutdown};
//!
//! # async fn demo() -> Result<(), flowgate::core::Error> {
//! let summary = Pipeline::builder("demo")
//!     .source(GeneratorSource::new(GeneratorConfig::default())?)
//!     .sink(NullSink::default())
//!     .settings(RuntimeSettings::default())
//!     .build()?
//!     .run(Shutdown::on_signals())
//!     .await?;
//! println!("{summary}");
//! # Ok(()) }
//! ```

pub use flowgate_checkpoint as checkpoint;
pub use flowgate_core as core;
pub use flowgate_runtime as runtime;

#[cfg(feature = "testkit")]
pub use flowgate_core::testkit;

/// Apache Kafka source and sink (feature `kafka`).
#[cfg(feature = "kafka")]
pub use flowgate_kafka as kafka;

/// RabbitMQ source and sink (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub use flowgate_rabbitmq as rabbitmq;

/// Kinesis Data Streams source and sink (feature `kinesis`).
#[cfg(feature = "kinesis")]
pub use flowgate_kinesis as kinesis;

/// The HTTP sink (feature `http`).
#[cfg(feature = "http")]
pub use flowgate_http as http;

pub use flowgate_core::{Error, ErrorKind, PartitionId, Position, Record};
pub use flowgate_runtime::{Pipeline, RuntimeSettings, Shutdown};
