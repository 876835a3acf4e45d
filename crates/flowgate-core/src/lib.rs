//! # flowgate-core
//!
//! The contracts every flowgate component agrees on:
//!
//! - [`Record`], [`Position`], [`PartitionId`], [`IdempotencyKey`]: what flows.
//! - [`Source`], [`Sink`], [`CheckpointStore`], [`DedupStore`]: what adapters and stores
//!   implement. The runtime (`flowgate-runtime`) drives them; adapters never talk to each other.
//! - [`Credits`]: how the runtime tells a source how much it may still deliver per partition,
//!   so that the source can apply broker-native flow control (Kafka pause/resume, RabbitMQ
//!   prefetch, Kinesis read pacing) instead of simply not polling.
//! - [`Error`] with an [`ErrorKind`]: one error type whose kind decides what the runtime does
//!   (retry, back off, dead-letter, stop).
//! - `testkit` (Cargo feature): the conformance suite every source, sink and store must pass.
//!
//! The contract is written down in MUST/SHOULD words in `docs/specs/adapter.md`.

mod capability;
mod checkpoint;
mod credit;
mod error;
mod inbox;
mod inspect;
mod lease;
mod position;
mod record;
pub mod retry;
mod secret;
mod sink;
mod source;
mod store;
pub mod tls;

#[cfg(feature = "testkit")]
pub mod testkit;

/// The attribute that lets a `Source`, `Sink` or store implementation use `async fn`s
/// (the traits are declared with it).
pub use async_trait::async_trait;
pub use capability::{LagUnit, SinkCapabilities, SourceCapabilities};
pub use checkpoint::Checkpoint;
pub use credit::{CreditGrant, Credits};
pub use error::{Error, ErrorKind, Result};
pub use inbox::{Buffered, SourceInbox};
pub use inspect::PartitionView;
pub use lease::{Lease, LeaseStore};
pub use position::{MAX_DIGITS as MAX_POSITION_DIGITS, ParsePositionError, Position};
pub use record::{Header, Headers, IdempotencyKey, PartitionId, Record};
pub use secret::redact_url;
pub use sink::{Sink, TxContext, WriteError};
pub use source::{
    Assignment, Connection, LagSample, Revocation, RevocationWaiter, Source, SourceContext,
    SourceEvent, StartPosition,
};
pub use store::{CheckpointStore, DedupStore, PositionRange};

/// Header names flowgate itself writes (dead letters, idempotency keys).
pub mod headers {
    /// The idempotency key, forwarded downstream so the next hop can deduplicate.
    pub const IDEMPOTENCY_KEY: &str = "flowgate-idempotency-key";
    /// The error that sent a record to the dead-letter destination.
    pub const ERROR: &str = "flowgate-error";
    /// The [`ErrorKind`](crate::ErrorKind) of that error.
    pub const ERROR_KIND: &str = "flowgate-error-kind";
    /// The partition the dead-lettered record came from.
    pub const SOURCE_PARTITION: &str = "flowgate-source-partition";
    /// The position the dead-lettered record had in its partition.
    pub const SOURCE_POSITION: &str = "flowgate-source-position";
}
