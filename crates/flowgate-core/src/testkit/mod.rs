//! The conformance suite every source, sink and store must pass (feature `testkit`).
//!
//! Each function panics with a message naming the violated contract clause. The in-process
//! adapters and the in-memory / embedded stores run it in plain `cargo test`; broker adapters
//! run the very same functions against real brokers in `tests/`.
//!
//! - [`source`]: delivery and order, credit, resume from a position, bounded close.
//! - [`sink`]: confirmed writes read back, batch limits, idempotency key forwarding.
//! - [`store`]: checkpoint durability, monotonicity, fencing, reset, isolation; dedup marks
//!   and their TTL; the transactional path.
//!
//! The scenario suites that run whole pipelines against a broker (delivery, poison, broker
//! restart) build on these and live in `flowgate-runtime`'s testkit, since they need the
//! runtime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod sink;
pub mod source;
pub mod store;
