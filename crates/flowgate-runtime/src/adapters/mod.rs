//! In-process adapters, for tests, demos and your own tests:
//!
//! - [`GeneratorSource`]: deterministic records on N partitions, at a rate with a spike
//!   schedule, finite or endless, replayable from a position;
//! - [`MemorySource`] / [`MemorySink`]: records from and into memory;
//! - [`NullSink`]: confirms everything at once (benchmarks);
//! - [`JsonLinesSink`]: one JSON object per line in a file;
//! - [`FaultInjectingSink`]: wraps a sink with latency, limited capacity, throttling,
//!   transient failures, stalls and poison records.

mod faulty;
mod generator;
mod jsonl;
mod memory;
mod null;

pub use faulty::{FaultConfig, FaultInjectingSink};
pub use generator::{GeneratorConfig, GeneratorSource, Spike};
pub use jsonl::{JsonLinesConfig, JsonLinesSink};
pub use memory::{MemorySink, MemorySource};
pub use null::NullSink;
