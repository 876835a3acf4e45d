//! The scenario suites every broker adapter runs (feature `testkit`), by contract area:
//!
//! - [`delivery`]: every record arrives once and the broker's own count shows nothing left;
//! - [`poison`]: a record the sink refuses goes to the dead letters, the rest flows on;
//! - [`restart`]: the broker stopped and started mid-stream loses nothing, and the outage
//!   reads as `disconnected` while it lasts;
//! - [`slow_sink`]: a sink ten times slower than the backlog: in flight within the bound, no
//!   rebalance, the lag visible, every record once.
//!
//! An adapter's tests implement [`BrokerHarness`] for its broker (create a stream, produce,
//! read dead letters, restart the broker, count the backlog) and call each suite; what is
//! truly specific to the broker is checked on the returned [`ScenarioReport`]. A suite a
//! broker cannot run (by its [`Capabilities`]) panics naming the capability, so a test never
//! passes without having run.
//!
//! The suites drive whole pipelines, so they live in the runtime; `flowgate-core`'s testkit
//! holds the trait-level conformance suites (source, sink, store) they build on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod delivery;
mod harness;
pub mod poison;
pub mod restart;
pub mod slow_sink;

pub use harness::{BrokerHarness, Capabilities, ScenarioReport};
