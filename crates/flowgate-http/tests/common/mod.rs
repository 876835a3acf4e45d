//! The user's endpoint, for real: an HTTP/1.1 server on loopback that records every request
//! and can be slow, limited, throttling, picky, or down.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flowgate_core::{Error, Record, Sink, SinkCapabilities, WriteError};
use tokio::task::JoinHandle;

/// One request as the endpoint saw it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) at: Instant,
    pub(crate) path: String,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) authorization: Option<String>,
    pub(crate) body: Bytes,
    pub(crate) status: u16,
}

/// How the endpoint behaves; change it while it runs.
#[derive(Clone, Debug, Default)]
pub(crate) struct Behaviour {
    /// Time taken by every request before it is answered.
    pub(crate) delay: Duration,
    /// Records per second the endpoint can take (requests wait their turn): `None` unlimited.
    pub(crate) records_per_sec: Option<f64>,
    /// Requests per second accepted; above it `429` with `Retry-After: 1`.
    pub(crate) requests_per_sec: Option<usize>,
    /// A body containing this text is answered `422` with a JSON error.
    pub(crate) reject_marker: Option<String>,
}

struct Shared {
    seen: Mutex<Vec<Seen>>,
    behaviour: Mutex<Behaviour>,
    /// When the capacity lets the next record in.
    capacity_free_at: tokio::sync::Mutex<Instant>,
    in_flight: std::sync::atomic::AtomicUsize,
    peak_in_flight: std::sync::atomic::AtomicUsize,
    /// Accepted requests per whole second since start.
    window: Mutex<(u64, usize)>,
    started: Instant,
}

/// A running endpoint.
pub(crate) struct TestEndpoint {
    pub(crate) addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl TestEndpoint {
    pub(crate) async fn start(behaviour: Behaviour) -> TestEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            seen: Mutex::new(Vec::new()),
            behaviour: Mutex::new(behaviour),
            capacity_free_at: tokio::sync::Mutex::new(Instant::now()),
            in_flight: Default::default(),
            peak_in_flight: Default::default(),
            window: Mutex::new((0, 0)),
            started: Instant::now(),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        TestEndpoint {
            addr,
            shared,
            server: Mutex::new(Some(server)),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.shared.behaviour.lock().unwrap());
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub(crate) fn peak_in_flight(&self) -> usize {
        self.shared
            .peak_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops listening and drops every open connection: connections are refused until
    /// [`up`](Self::up).
    pub(crate) fn down(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }

    /// Listens again on the same address.
    pub(crate) async fn up(&self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        *self.server.lock().unwrap() = Some(tokio::spawn(serve(listener, self.shared.clone())));
    }
}

/// Accepts connections; each is served on a task of this one's `JoinSet`, so aborting this
/// task closes them all.
async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .fallback(handle)
        .with_state(shared)
        .into_service::<hyper::body::Incoming>();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(State(s): State<Arc<Shared>>, req: Request) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let behaviour = s.behaviour.lock().unwrap().clone();
    let header =
        |h: &HeaderMap, n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut seen = Seen {
        at: Instant::now(),
        path: parts.uri.path().to_string(),
        idempotency_key: header(&parts.headers, "idempotency-key"),
        authorization: header(&parts.headers, "authorization"),
        body: body.clone(),
        status: 200,
    };
    let response = if let Some(limit) = behaviour.requests_per_sec {
        let second = s.started.elapsed().as_secs();
        let mut w = s.window.lock().unwrap();
        if w.0 != second {
            *w = (second, 0);
        }
        if w.1 >= limit {
            Some((StatusCode::TOO_MANY_REQUESTS, "slow down"))
        } else {
            w.1 += 1;
            None
        }
    } else {
        None
    };
    if let Some((status, text)) = response {
        seen.status = status.as_u16();
        s.seen.lock().unwrap().push(seen);
        return (status, [("retry-after", "1")], text).into_response();
    }
    let now = s.in_flight.fetch_add(1, Relaxed) + 1;
    s.peak_in_flight.fetch_max(now, Relaxed);
    tokio::time::sleep(behaviour.delay).await;
    if let Some(rate) = behaviour.records_per_sec {
        let records = body.iter().filter(|b| **b == b'\n').count().max(1);
        let wait_until = {
            let mut free = s.capacity_free_at.lock().await;
            let start = (*free).max(Instant::now());
            *free = start + Duration::from_secs_f64(records as f64 / rate);
            *free
        };
        tokio::time::sleep_until(wait_until.into()).await;
    }
    s.in_flight.fetch_sub(1, Relaxed);
    if let Some(marker) = &behaviour.reject_marker {
        if body.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            seen.status = 422;
            s.seen.lock().unwrap().push(seen);
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                r#"{"error":"amount must be positive"}"#,
            )
                .into_response();
        }
    }
    s.seen.lock().unwrap().push(seen);
    StatusCode::OK.into_response()
}

/// Every accepted JSON line: `(partition, n)` from `{"p": …, "n": …}` payloads.
pub(crate) fn accepted_lines(seen: &[Seen]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for s in seen.iter().filter(|s| s.status == 200) {
        for line in s.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            out.push((
                v["p"].as_str().unwrap().to_string(),
                v["n"].as_u64().unwrap(),
            ));
        }
    }
    out
}

/// Per partition: the numbers in the order the endpoint accepted them.
pub(crate) fn by_partition(lines: &[(String, u64)]) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (p, n) in lines {
        m.entry(p.clone()).or_default().push(*n);
    }
    m
}

/// A dead-letter sink that keeps what it gets.
#[derive(Clone, Default)]
pub(crate) struct Collect(pub Arc<Mutex<Vec<Record>>>);

#[async_trait::async_trait]
impl Sink for Collect {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic()
    }
    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        self.0.lock().unwrap().extend_from_slice(batch);
        Ok(())
    }
    async fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}
