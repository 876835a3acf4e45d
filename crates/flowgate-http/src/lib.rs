//!
//! ```no_run
//! use flowgate_http::{HttpSink, HttpSinkConfig};
//!
//! # fn demo() -> Result<(), flowgate_core::Error> {
//! // POST batches of records to an endpoint; 429 and 503 slow the pipeline down.
//! let sink = HttpSink::new(HttpSinkConfig {
//!     url: "https://ingest.example.com/events".into(),
//!     ..Default::default()
//! })?;
//! # let _ = sink;
//! # Ok(()) }
//! ```
#![doc = include_str!("docs.md")]

mod client;
mod config;
mod error;
mod request;
mod sink;

pub use config::{Encoding, HttpAuth, HttpMethod, HttpSinkConfig, HttpTls};
pub use sink::{HttpSink, REQUEST_SECONDS};
