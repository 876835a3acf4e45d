//! # flowgate-kinesis
//!
//! AWS Kinesis Data Streams for flowgate, on aws-sdk-kinesis:
//!
//! - [`KinesisSource`]: shard leases kept in a [`LeaseStore`](flowgate_core::LeaseStore)
//!   (the pipeline's checkpoint store, shared by every worker), so several workers split a
//!   stream's shards, take over a crashed worker's shards after the lease expiry and balance
//!   gradually; a worker that lost a lease cannot checkpoint that shard any more. One reader
//!   per owned shard, paced within the shard limits (5 calls/s, 2 MB/s) and by the runtime's
//!   credit; resharding handled parent-before-child (a child starts only after all its
//!   parents were read to their end and committed). `MillisBehindLatest` is the lag.
//! - [`KinesisSink`]: `PutRecords` within the API limits (500 records, 5 MiB per call,
//!   1 MiB per record); only failed entries are retried; a record over 1 MiB is poison.
//!
//! KPL-aggregated records are read as their user records (module [`kpl`]). The guide is
//! `docs/brokers/kinesis.md`.

//!
//! ```no_run
//! use std::sync::Arc;
//! use flowgate_kinesis::{KinesisConnection, KinesisSource, KinesisSourceConfig};
//!
//! # fn demo(leases: Arc<dyn flowgate_core::LeaseStore>) -> Result<(), flowgate_core::Error> {
//! // Read `clicks`, sharing its shards with the other workers through `leases` (a shared
//! // store: PostgreSQL, Redis or DynamoDB).
//! let source = KinesisSource::new(
//!     KinesisSourceConfig {
//!         stream: "clicks".into(),
//!         connection: KinesisConnection {
//!             region: Some("eu-west-1".into()),
//!             ..Default::default()
//!         },
//!         ..Default::default()
//!     },
//!     leases,
//! )?;
//! # let _ = source;
//! # Ok(()) }
//! ```
#![doc = include_str!("docs.md")]

mod client;
mod config;
mod error;
mod lag;
mod leases;
mod sink;
mod source;

pub use client::kpl;
pub use config::{KinesisConnection, KinesisSinkConfig, KinesisSourceConfig, StartAt};
pub use leases::shards::{
    EXPIRED_ITERATORS, GET_RECORDS_CALLS, KinesisStats, READ_THROTTLES, ShardStats,
};
pub use sink::{KinesisSink, MAX_BATCH_BYTES, MAX_BATCH_RECORDS, MAX_RECORD_BYTES};
pub use source::KinesisSource;
