//! [`HttpSink`]: the `Sink` implementation.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::{Error, ErrorKind, Record, Sink, SinkCapabilities, WriteError};
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue};

use crate::client::{self, Credentials};
use crate::config::{Encoding, HttpMethod, HttpSinkConfig};
use crate::error;
use crate::request::{self, UrlTemplate};

/// Histogram (seconds, label `outcome`: `2xx`, `429`, `503`, `4xx`, `5xx`, `error`): one
/// request of the HTTP sink, from sending to the end of the answer.
pub const REQUEST_SECONDS: &str = "flowgate_sink_request_seconds";

/// Sends records to an HTTP endpoint and confirms them on its `2xx` answer.
///
/// One request per batch (`ndjson`, `json_array`) or per record (`single`), records of one
/// partition in order; the runtime's adaptive concurrency decides how many requests are in
/// flight. What each answer means (the crate docs list it): `429`/`503` throttle
/// (honouring `Retry-After`), `408`/`5xx`/timeouts retry, other `4xx` dead-letter the
/// record — a batch the endpoint rejects is split in halves until the rejected records are
/// found, so one bad record never dead-letters its neighbours.
#[derive(Clone, Debug)]
pub struct HttpSink {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    credentials: Credentials,
    url: UrlTemplate,
    method: reqwest::Method,
    encoding: Encoding,
    content_type: HeaderValue,
    idempotency_header: Option<HeaderName>,
    max_batch_records: usize,
    max_batch_bytes: usize,
    max_record_bytes: usize,
    per_record_results: bool,
    error_body_limit: usize,
    /// The custom TLS settings, to find out why a handshake failed.
    tls: Option<crate::config::HttpTls>,
    /// An endpoint's `Retry-After` holds every request of this sink, not only the refused
    /// one: other partitions' requests would only be refused too.
    not_before: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// One request to send: indices into the batch, in order, and their URL.
struct Planned {
    url: String,
    records: Vec<usize>,
}

impl HttpSink {
    /// Checks the settings (every error names its `sink.*` key), reads the secrets and builds
    /// the client. Nothing is sent until the first write.
    pub fn new(cfg: HttpSinkConfig) -> Result<HttpSink, Error> {
        let url = UrlTemplate::parse(&cfg.url)?;
        if cfg.max_batch_records == 0 || cfg.max_batch_bytes == 0 || cfg.max_record_bytes == 0 {
            return Err(
                Error::config("batch and record limits must be above 0").with_context(
                    "key",
                    "sink.max_batch_records / max_batch_bytes / max_record_bytes",
                ),
            );
        }
        let content_type = cfg.content_type.clone().unwrap_or_else(|| {
            match cfg.encoding {
                Encoding::Ndjson => "application/x-ndjson",
                Encoding::JsonArray | Encoding::Single => "application/json",
            }
            .to_string()
        });
        let content_type = HeaderValue::from_str(&content_type).map_err(|_| {
            Error::config("not a valid Content-Type").with_context("key", "sink.content_type")
        })?;
        let idempotency_header = match cfg.idempotency_header.as_str() {
            "" => None,
            name => Some(HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
                Error::config("not a valid header name")
                    .with_context("key", "sink.idempotency_header")
                    .with_context("cause", e)
            })?),
        };
        let max_batch_records = match cfg.encoding {
            Encoding::Single => 1,
            _ => cfg.max_batch_records,
        };
        Ok(HttpSink {
            inner: Arc::new(Inner {
                client: client::build(&cfg)?,
                credentials: Credentials::resolve(cfg.auth.as_ref())?,
                url,
                method: match cfg.method {
                    HttpMethod::Post => reqwest::Method::POST,
                    HttpMethod::Put => reqwest::Method::PUT,
                    HttpMethod::Patch => reqwest::Method::PATCH,
                },
                encoding: cfg.encoding,
                content_type,
                idempotency_header,
                max_batch_records,
                max_batch_bytes: cfg.max_batch_bytes,
                max_record_bytes: cfg.max_record_bytes,
                per_record_results: cfg.per_record_results,
                error_body_limit: cfg.error_body_limit,
                tls: cfg.tls.clone(),
                not_before: std::sync::Mutex::new(None),
            }),
        })
    }
}

impl Inner {
    /// Splits the sendable records into requests: one URL each, within the batch limits,
    /// order kept.
    fn plan(
        &self,
        batch: &[Record],
        sendable: &[usize],
        compacted: &[Option<Bytes>],
    ) -> Vec<Planned> {
        let mut plans: Vec<Planned> = Vec::new();
        let mut bytes = 0usize;
        let fixed = self.url.fixed();
        for &i in sendable {
            let rendered = match fixed {
                Some(_) => None,
                None => Some(self.url.render(&batch[i])),
            };
            let len = compacted[i]
                .as_ref()
                .map_or(batch[i].payload.len(), Bytes::len)
                + 1;
            match plans.last_mut() {
                Some(p)
                    if rendered.as_ref().is_none_or(|u| *u == p.url)
                        && p.records.len() < self.max_batch_records
                        && bytes + len <= self.max_batch_bytes =>
                {
                    p.records.push(i);
                    bytes += len;
                }
                _ => {
                    plans.push(Planned {
                        url: rendered.unwrap_or_else(|| fixed.unwrap_or_default().to_string()),
                        records: vec![i],
                    });
                    bytes = len;
                }
            }
        }
        plans
    }

    /// Sends one request for `records` (indices into `batch`); the outcome per record.
    async fn send(
        &self,
        batch: &[Record],
        compacted: &[Option<Bytes>],
        url: &str,
        records: &[usize],
    ) -> Result<(), Outcome> {
        let body = request::body(
            self.encoding,
            records
                .iter()
                .map(|&i| compacted[i].as_deref().unwrap_or(&batch[i].payload[..])),
        );
        let mut req = self
            .client
            .request(self.method.clone(), url)
            .header(CONTENT_TYPE, self.content_type.clone())
            .body(body);
        if let Some(header) = &self.idempotency_header {
            let refs: Vec<&Record> = records.iter().map(|&i| &batch[i]).collect();
            if let Some(key) = request::request_key(&refs) {
                req = req.header(header.clone(), key);
            }
        }
        req = self.credentials.apply(req);
        let hold = *self
            .not_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = hold {
            tokio::time::sleep_until(until).await;
        }
        let started = Instant::now();
        let answer = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                resp.bytes().await.map(|body| (status, headers, body))
            }
            Err(e) => Err(e),
        };
        let (status, headers, body) = match answer {
            Ok(answer) => answer,
            Err(e) => {
                observe(started, "error");
                return Err(Outcome::Whole(self.no_answer(&e, url).await));
            }
        };
        observe(started, outcome_label(status.as_u16()));
        let shown = &body[..body.len().min(self.error_body_limit)];
        if let Err(e) = error::classify(status, &headers, shown, url, self.url.fixed().is_some()) {
            if let Some(after) = e.retry_after() {
                let until = tokio::time::Instant::now() + after;
                let mut hold = self
                    .not_before
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *hold = Some(hold.map_or(until, |h| h.max(until)));
            }
            return Err(Outcome::Whole(e));
        }
        if self.per_record_results && self.encoding != Encoding::Single {
            return per_record(&body, records.len(), url);
        }
        Ok(())
    }
}

impl Inner {
    /// A request without an answer, as an error; when custom TLS is configured and the failure
    /// does not say why, a handshake of our own asks the endpoint.
    async fn no_answer(&self, e: &reqwest::Error, url: &str) -> Error {
        let first = error::no_answer(e, url, None);
        if first.kind() != ErrorKind::Transient || e.is_timeout() || e.is_connect() {
            return first;
        }
        match &self.tls {
            Some(tls) if url.starts_with("https://") => {
                let heard = client::tls_refusal(url, tls).await;
                error::no_answer(e, url, heard.as_deref())
            }
            _ => first,
        }
    }
}

/// What one request did to its records.
enum Outcome {
    /// Every record of the request failed with this error.
    Whole(Error),
    /// Some records (by position in the request) failed.
    Some(Vec<(usize, Error)>),
}

/// Reads `{"results": [{"status": N, "error": "…"}, …]}`: one entry per record.
fn per_record(body: &[u8], expected: usize, url: &str) -> Result<(), Outcome> {
    #[derive(serde::Deserialize)]
    struct Answer {
        results: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        status: u16,
        #[serde(default)]
        error: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(body)
        .ok()
        .filter(|a: &Answer| a.results.len() == expected)
        .ok_or_else(|| {
            Outcome::Whole(
                Error::config("the endpoint's answer does not give one result per record")
                    .with_context("key", "sink.per_record_results")
                    .with_context("records", expected)
                    .with_hint("answer {\"results\": [{\"status\": 200}, …]} in body order, or turn per_record_results off"),
            )
        })?;
    let failed: Vec<(usize, Error)> = answer
        .results
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            error::classify_entry(e.status, e.error.as_deref(), url)
                .err()
                .map(|err| (i, err))
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Outcome::Some(failed))
    }
}

fn outcome_label(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        429 => "429",
        503 => "503",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

fn observe(started: Instant, outcome: &'static str) {
    metrics::histogram!(REQUEST_SECONDS, "sink" => "http", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

#[async_trait]
impl Sink for HttpSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic()
            .with_batch_limits(
                Some(self.inner.max_batch_records),
                Some(self.inner.max_batch_bytes),
            )
            .with_max_record_bytes(Some(self.inner.max_record_bytes))
            .with_forwards_idempotency_key(self.inner.idempotency_header.is_some())
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        let s = &self.inner;
        let mut failed: Vec<(usize, Error)> = Vec::new();
        // Payloads rewritten for the body (multi-line JSON compacted); `None`: as they are.
        let mut compacted: Vec<Option<Bytes>> = Vec::with_capacity(batch.len());
        let mut sendable = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            if r.payload.len() > s.max_record_bytes {
                failed.push((
                    i,
                    Error::poison("the record is larger than the sink accepts")
                        .with_context("key", "sink.max_record_bytes")
                        .with_context("bytes", r.payload.len()),
                ));
                compacted.push(None);
                continue;
            }
            match request::payload(s.encoding, r) {
                Ok(p) => {
                    compacted.push(p);
                    sendable.push(i);
                }
                Err(e) => {
                    failed.push((i, e));
                    compacted.push(None);
                }
            }
        }
        // Requests go out one after another, so a partition's records arrive in order; a
        // request that fails for a reason other than its records stops the ones after it.
        let mut work: Vec<Planned> = s.plan(batch, &sendable, &compacted);
        work.reverse();
        while let Some(p) = work.pop() {
            match s.send(batch, &compacted, &p.url, &p.records).await {
                Ok(()) => {}
                Err(Outcome::Some(errs)) => {
                    let retried = errs
                        .iter()
                        .find(|(_, e)| e.is_temporary())
                        .map(|(_, e)| e.duplicate());
                    failed.extend(errs.into_iter().map(|(at, e)| (p.records[at], e)));
                    // A record that will be retried keeps its partition's order: the requests
                    // after it wait for the same retry.
                    if let Some(e) = retried {
                        let rest = work.drain(..).rev().flat_map(|p| p.records);
                        failed.extend(rest.map(|i| (i, e.duplicate())));
                    }
                }
                Err(Outcome::Whole(e)) if e.kind() == ErrorKind::Poison && p.records.len() > 1 => {
                    // Find the rejected records: each half on its own, left first.
                    let (left, right) = p.records.split_at(p.records.len() / 2);
                    work.push(Planned {
                        url: p.url.clone(),
                        records: right.to_vec(),
                    });
                    work.push(Planned {
                        url: p.url,
                        records: left.to_vec(),
                    });
                }
                Err(Outcome::Whole(e)) if e.kind() == ErrorKind::Poison => {
                    // One record, rejected: it alone is dead-lettered.
                    failed.extend(p.records.into_iter().map(|i| (i, e.duplicate())));
                }
                Err(Outcome::Whole(e)) => {
                    // Not the records' fault: this request and the ones after it wait for
                    // the retry, in order.
                    let rest = work.drain(..).rev().flat_map(|p| p.records);
                    for i in p.records.into_iter().chain(rest) {
                        failed.push((i, e.duplicate()));
                    }
                }
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        if failed.len() == batch.len() && failed.iter().all(|(_, e)| e.kind() != ErrorKind::Poison)
        {
            // Nothing went through and nothing is the records' fault: one error for the batch.
            failed.sort_by_key(|(i, _)| *i);
            if let Some((_, e)) = failed.pop() {
                return Err(WriteError::Batch(e));
            }
        }
        Err(WriteError::Partial(failed))
    }

    /// A `HEAD` to the endpoint (its URL with every field empty): any answer proves it
    /// reachable, except `401`/`403`/`407` (the credentials are refused).
    async fn check(&self) -> Result<bool, Error> {
        let s = &self.inner;
        let url = match s.url.fixed() {
            Some(u) => u.to_string(),
            None => s.url.render(&Record::new(
                flowgate_core::PartitionId::new(""),
                flowgate_core::Position::ZERO,
                Bytes::new(),
            )),
        };
        let req = s.credentials.apply(s.client.head(&url));
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => return Err(s.no_answer(&e, &url).await),
        };
        let code = resp.status().as_u16();
        if matches!(code, 401 | 403 | 407) {
            return error::classify(resp.status(), resp.headers(), b"", &url, true).map(|()| true);
        }
        Ok(true)
    }
}
