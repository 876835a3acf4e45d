//! The running pipeline's HTTP endpoint: `/metrics` (Prometheus), `/health` (liveness),
//! `/ready` (progress, 503 with the reasons) and `/status` (JSON per partition).
//!
//! Served on a loopback address unless configured otherwise; nothing served contains a
//! secret or a configuration value.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flowgate_core::Error;
use flowgate_runtime::{Health, PartitionStatus, Stats, metric_names};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

/// `[observability]` in the pipeline file.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ObservabilityConfig {
    /// Where the endpoint listens; another interface than loopback is an explicit choice.
    /// Unset: `127.0.0.1:9464`, or a free loopback port (printed) when another pipeline on
    /// the host holds that one. Set (or `--metrics-addr`): that address, or a clear error.
    pub(crate) listen: Option<SocketAddr>,
    /// Serve nothing.
    pub(crate) disabled: bool,
    /// When set, every request must carry `Authorization: Bearer <token>` (401 otherwise).
    /// Best given by the environment: `FLOWGATE_OBSERVABILITY__BEARER_TOKEN`.
    pub(crate) bearer_token: Option<String>,
}

impl std::fmt::Debug for ObservabilityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservabilityConfig")
            .field("listen", &self.listen)
            .field("disabled", &self.disabled)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The endpoint's address when none is configured.
pub(crate) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// Seconds: end-to-end latency buckets (a record's timestamp to its sink confirmation).
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Seconds: checkpoint write + broker commit.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Installs the Prometheus recorder for the `metrics` facade: real histograms with explicit
/// buckets for the latencies.
pub(crate) fn install_recorder() -> Result<PrometheusHandle, Error> {
    let failed = |e: metrics_exporter_prometheus::BuildError| {
        Error::fatal("cannot install the Prometheus recorder").with_context("cause", e)
    };
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(metric_names::END_TO_END.to_string()),
            &LATENCY_BUCKETS,
        )
        .map_err(failed)?
        .set_buckets_for_metric(
            Matcher::Full(metric_names::COMMIT_LATENCY.to_string()),
            &COMMIT_BUCKETS,
        )
        .map_err(failed)?
        .set_buckets_for_metric(
            Matcher::Full("flowgate_store_operation_seconds".to_string()),
            &COMMIT_BUCKETS,
        )
        .map_err(failed)?
        .install_recorder()
        .map_err(failed)
}

#[derive(Clone)]
struct Served {
    pipeline: String,
    stats: Arc<Stats>,
    prometheus: PrometheusHandle,
}

/// Binds `listen` (or the default) and serves the endpoint until the process ends; returns
/// the bound address.
pub(crate) async fn serve(
    listen: Option<SocketAddr>,
    bearer_token: Option<String>,
    pipeline: String,
    stats: Arc<Stats>,
    prometheus: PrometheusHandle,
) -> Result<SocketAddr, Error> {
    let addr = listen.unwrap_or(DEFAULT_LISTEN);
    let bound = match tokio::net::TcpListener::bind(addr).await {
        Err(e) if listen.is_none() && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(address = %addr, "the default metrics port is taken (another pipeline on this host?); serving on a free loopback port instead");
            tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await
        }
        other => other,
    };
    let listener = bound.map_err(|e| {
        Error::config("cannot listen for the metrics and health endpoint")
            .with_context("key", "observability.listen")
            .with_context("address", addr)
            .with_context("cause", e)
            .with_hint("choose a free port with observability.listen or --metrics-addr")
    })?;
    let bound = listener.local_addr().unwrap_or(addr);
    if !bound.ip().is_loopback() && bearer_token.is_none() {
        tracing::warn!(address = %bound, "the metrics and health endpoint listens beyond loopback without a bearer token (observability.bearer_token)");
    }
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .layer(axum::middleware::from_fn(move |req, next| {
            authorized(bearer_token.clone(), req, next)
        }))
        .with_state(Served {
            pipeline,
            stats,
            prometheus,
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics and health endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "serving /metrics, /health, /ready and /status");
    Ok(bound)
}

/// Refuses a request without the configured bearer token (compared in constant time).
async fn authorized(
    token: Option<String>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = token else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = token.as_bytes();
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required (observability.bearer_token)\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Served>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
        .into_response()
}

/// Liveness: the process serves and the pipeline has not stopped.
async fn health(State(s): State<Served>) -> Response {
    let h = s.stats.health();
    let code = if h == Health::Stopped {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        axum::Json(serde_json::json!({ "health": h.to_string() })),
    )
        .into_response()
}

/// Progress: 200 while records are acknowledged or the source is idle with lag 0; 503 with a
/// body naming each reason otherwise.
async fn ready(State(s): State<Served>) -> Response {
    let health = s.stats.health();
    let reasons = s.stats.readiness();
    let ready = reasons.is_empty() && health == Health::Healthy;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "pipeline": s.pipeline,
        "ready": ready,
        "health": health.to_string(),
        "reasons": reasons,
    });
    (code, axum::Json(body)).into_response()
}

#[derive(Serialize)]
struct StatusBody {
    pipeline: String,
    health: String,
    lag: u64,
    in_flight: u64,
    records_in: u64,
    records_out: u64,
    partitions: Vec<PartitionStatus>,
}

/// Everything per partition: checkpoint, lag (from the committed position) and what makes it
/// up, rate of change, status, catch-up estimate.
async fn status(State(s): State<Served>) -> Response {
    let snap = s.stats.snapshot();
    axum::Json(StatusBody {
        pipeline: s.pipeline.clone(),
        health: snap.health.to_string(),
        lag: snap.lag,
        in_flight: snap.in_flight,
        records_in: snap.records_in,
        records_out: snap.records_out,
        partitions: s.stats.partitions(),
    })
    .into_response()
}
