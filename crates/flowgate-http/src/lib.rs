#![doc = include_str!("docs.md")]

mod client;
mod config;
mod error;
mod request;
mod sink;

pub use config::{Encoding, HttpAuth, HttpMethod, HttpSinkConfig, HttpTls};
pub use sink::{HttpSink, REQUEST_SECONDS};
