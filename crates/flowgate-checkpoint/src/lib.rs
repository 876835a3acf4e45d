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
//! - [`MemoryStore`]: the same semantics in memory, for tests.
//!
//! Both pass the store conformance suite of `flowgate_core::testkit::store`. The rules every
//! store applies to a checkpoint write (monotonic, fenced) live in [`rules`].

#[cfg(feature = "embedded")]
mod embedded;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
pub mod rules;

#[cfg(feature = "embedded")]
pub use embedded::{EmbeddedStore, TableSink};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresConfig, PostgresStore};
