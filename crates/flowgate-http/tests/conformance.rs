//! The sink conformance suite against a real HTTP server on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_trait::async_trait;
use bytes::Bytes;
use common::{Behaviour, TestEndpoint};
use flowgate_core::testkit::sink::{SinkHarness, run_all};
use flowgate_core::{Error, IdempotencyKey, PartitionId, Position, Record};
use flowgate_http::{Encoding, HttpSink, HttpSinkConfig};

struct Harness {
    endpoint: TestEndpoint,
}

#[async_trait]
impl SinkHarness for Harness {
    type Sink = HttpSink;

    async fn open_sink(&self) -> Result<HttpSink, Error> {
        HttpSink::new(HttpSinkConfig {
            url: self.endpoint.url("/records/{key}"),
            encoding: Encoding::Single,
            max_record_bytes: 64 << 10,
            ..Default::default()
        })
    }

    async fn read_back(&self) -> Result<Vec<Record>, Error> {
        Ok(self
            .endpoint
            .seen()
            .into_iter()
            .filter(|s| s.status == 200)
            .enumerate()
            .map(|(i, s)| {
                let key = s
                    .path
                    .strip_prefix("/records/")
                    .unwrap_or_default()
                    .to_string();
                let mut r = Record::new(PartitionId::new("read"), Position::new(i as u128), s.body)
                    .with_key(Bytes::from(key));
                if let Some(k) = s.idempotency_key {
                    r = r.with_idempotency_key(IdempotencyKey::new(k));
                }
                r
            })
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_conformance() {
    let endpoint = TestEndpoint::start(Behaviour::default()).await;
    run_all(&Harness { endpoint }).await;
}
