//! # flowgate-checkpoint
//!
//! Durable checkpoint and dedup stores for flowgate:
//!
//! - [`EmbeddedStore`] (feature `embedded`, the default): one redb file, no server. Crash-safe
//!   (copy-on-write B-trees, checksummed commit slots), every commit `fsync`ed before it
//!   returns. Also offers a [`TableSink`] that commits its rows, the dedup marks and the
//!   checkpoints in **one** transaction: exactly-once for that sink.
//! - [`PostgresStore`] (feature `postgres`): PostgreSQL, shared by every worker of a
//!   pipeline; checkpoint writes are compare-and-set on position and fencing token.
//! - [`RedisStore`] (feature `redis`): Redis, shared by every worker; checkpoint writes are an
//!   atomic Lua compare-and-set, dedup marks expire in Redis itself.
//! - [`DynamoDbStore`] (feature `dynamodb`): DynamoDB, shared by every worker; conditional
//!   writes for checkpoints and leases (lease expiry by the reader's monotonic clock, as the
//!   AWS KCL does), dedup marks with TTL. [`read_kcl_leases`] reads a KCL lease table.
//! - [`MemoryStore`]: the same semantics in memory, for tests.
//!
//! Every store passes the store conformance suite of `flowgate_core::testkit::store`. The rules every
//! store applies to a checkpoint write (monotonic, fenced) live in [`rules`].
//!
//! ```no_run
//! use flowgate_checkpoint::EmbeddedStore;
//! use flowgate_core::{Checkpoint, CheckpointStore, PartitionId, Position};
//!
//! # async fn demo() -> Result<(), flowgate_core::Error> {
//! // Give the store to `Pipeline::builder(..).checkpoint_store(..)`; or read it directly:
//! let store = EmbeddedStore::open_dir("./flowgate-data").await?;
//! store
//!     .commit("orders", &[Checkpoint::new(PartitionId::new("orders/0"), Position::from(41u64))])
//!     .await?;
//! for cp in store.load("orders").await? {
//!     println!("{} {}", cp.partition, cp.position);
//! }
//! # Ok(()) }
//! ```

#[cfg(feature = "dynamodb")]
mod dynamodb;
#[cfg(feature = "embedded")]
mod embedded;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis_store;
pub mod rules;

#[cfg(feature = "dynamodb")]
pub use dynamodb::{DynamoDbConfig, DynamoDbStore, KclCheckpoint, KclLease, read_kcl_leases};
#[cfg(feature = "embedded")]
pub use embedded::{EmbeddedStore, TableSink};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresConfig, PostgresStore, PostgresTableSink, PostgresTls, TableMode};
#[cfg(feature = "redis")]
pub use redis_store::{RedisConfig, RedisStore, RedisTls};

#[cfg(any(feature = "postgres", feature = "redis"))]
pub(crate) use flowgate_core::redact_url;

/// Latency of every shared-store operation (`flowgate_store_operation_seconds`, labels
/// `store` and `operation`; retries included), through the `metrics` facade.
pub const STORE_LATENCY: &str = "flowgate_store_operation_seconds";

/// Calls a shared store retried because it was throttled (`flowgate_store_throttled_total`,
/// label `store`).
pub const STORE_THROTTLES: &str = "flowgate_store_throttled_total";

#[cfg(any(feature = "postgres", feature = "redis", feature = "dynamodb"))]
pub(crate) fn record_latency(
    store: &'static str,
    operation: &'static str,
    started: std::time::Instant,
) {
    metrics::histogram!(STORE_LATENCY, "store" => store, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
}

/// How the shared stores retry a lost connection: 50 ms doubling to 2 s, with jitter, until
/// the store's `give_up_after`.
#[cfg(any(feature = "postgres", feature = "redis", feature = "dynamodb"))]
pub(crate) fn store_backoff(
    give_up_after: std::time::Duration,
) -> flowgate_core::retry::BackoffPolicy {
    flowgate_core::retry::BackoffPolicy::new(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(2),
    )
    .with_give_up_after(give_up_after)
}
