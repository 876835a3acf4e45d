//! # flowgate-runtime
//!
//! The backpressure runtime that drives every flowgate [`Source`](flowgate_core::Source) and
//! [`Sink`](flowgate_core::Sink):
//!
//! - **credit** per partition (bounded in-flight records) and a global **byte budget**,
//!   handed to the source as [`Credits`](flowgate_core::Credits) so it can apply
//!   broker-native flow control;
//! - per-partition **ordering** (or per key, or none), **batching** (records, bytes, linger);
//! - fixed or **adaptive** sink concurrency (AIMD);
//! - **retries** with exponential backoff and jitter (via `backon`), bounded;
//! - error classes → retry / back off / dead-letter / stop;
//! - **overflow policies** `block` / `shed_oldest` / `shed_newest` / `fail_fast`;
//! - ack tracking → **contiguous watermark** → checkpoint commits (every N records or T, and
//!   on revoke and shutdown), in the order sink → dedup marks → checkpoint store → broker;
//! - **dedup** by idempotency key (check before sink, mark after confirm);
//! - **metrics** through the `metrics` facade and a progress-based **health** state;
//! - graceful **shutdown** on SIGINT/SIGTERM with a drain timeout.
//!
//! Start with [`Pipeline::builder`].

pub mod adapters;
mod concurrency;
mod dedup;
#[cfg(feature = "endpoint")]
pub mod endpoint;
mod metrics;
mod pipeline;
mod progress;
mod retry;
mod settings;
mod shutdown;
mod stats;
#[cfg(feature = "testkit")]
pub mod testkit;
mod tracker;
mod worker;

pub use dedup::{KeyExtractor, KeyFn};
#[cfg(feature = "endpoint")]
pub use endpoint::{DEFAULT_LISTEN, Endpoint, EndpointSettings, EndpointTls};
pub use metrics::names as metric_names;
pub use pipeline::{Pipeline, PipelineBuilder, resume_after};
pub use progress::PartitionState;
pub use settings::{
    BatchSettings, CommitSettings, ConcurrencyMode, ConcurrencySettings, ExhaustedPolicy,
    HealthSettings, OverflowPolicy, RetrySettings, RuntimeSettings, SinkOrdering,
};
pub use shutdown::{Shutdown, ShutdownTrigger};
pub use stats::{Health, NotReady, PartitionStatus, RunSummary, Stats, StatsSnapshot};
pub use worker::{BoxFuture, TransformFn, dead_letter_record};
