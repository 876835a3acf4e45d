//! A running pipeline's HTTP endpoint (feature `endpoint`): `/metrics` (Prometheus),
//! `/health` (liveness), `/ready` (progress, 503 with the reasons) and `/status` (JSON per
//! partition).
//!
//! ```no_run
//! # async fn run(builder: flowgate_runtime::PipelineBuilder) -> Result<(), flowgate_core::Error> {
//! use flowgate_runtime::{Endpoint, EndpointSettings, Shutdown};
//!
//! // Before the pipeline is built, so its metrics register with the endpoint's recorder
//! // and `/health` answers (`starting`) while sources and stores connect.
//! let endpoint = Endpoint::start(&EndpointSettings::default(), "orders").await?;
//! let pipeline = builder.build()?;
//! endpoint.attach(pipeline.stats());
//! pipeline.run(Shutdown::on_signals()).await?;
//! # Ok(()) }
//! ```
//!
//! Served on a loopback address unless configured otherwise; nothing served contains a
//! secret or a configuration value. With [`EndpointSettings::tls`] it speaks HTTPS only;
//! with [`EndpointSettings::bearer_token`] every path answers 401 without the token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flowgate_core::Error;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

use crate::{Health, NotReady, PartitionStatus, Stats, metric_names};

/// `[observability]`: where and how the endpoint is served.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointSettings {
    /// Where the endpoint listens; another interface than loopback is an explicit choice.
    /// Unset: `127.0.0.1:9464`, or a free loopback port (logged) when another pipeline on
    /// the host holds that one. Set: that address, or a clear error.
    pub listen: Option<SocketAddr>,
    /// Serve nothing.
    pub disabled: bool,
    /// When set, every request must carry `Authorization: Bearer <token>` (401 otherwise).
    /// Best given by the environment: `FLOWGATE_OBSERVABILITY__BEARER_TOKEN`.
    pub bearer_token: Option<String>,
    /// Serve HTTPS with this certificate instead of plain HTTP.
    pub tls: Option<EndpointTls>,
}

/// `[observability.tls]`: the endpoint's certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointTls {
    /// The certificate chain, PEM, leaf first.
    pub cert_file: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl std::fmt::Debug for EndpointSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSettings")
            .field("listen", &self.listen)
            .field("disabled", &self.disabled)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

/// The endpoint's address when none is configured.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// Seconds: end-to-end latency buckets (a record's timestamp to its sink confirmation).
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Seconds: checkpoint write + broker commit, and store operations.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A pipeline's endpoint, serving from [`Endpoint::start`] until the process ends.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    tls: bool,
    stats: Arc<OnceLock<Arc<Stats>>>,
}

impl Endpoint {
    /// Installs the process's Prometheus recorder for the `metrics` facade (real histograms
    /// with explicit buckets for the latencies) unless an earlier endpoint did, binds, and
    /// serves. Until [`attach`](Self::attach), `/health` answers `starting` and `/ready` 503.
    /// Call it inside a tokio runtime.
    ///
    /// Errors: another `metrics` recorder is installed already, the address cannot be bound,
    /// or the TLS certificate or key does not load (each naming its `observability.*` key).
    pub async fn start(settings: &EndpointSettings, pipeline: &str) -> Result<Endpoint, Error> {
        let acceptor = settings.tls.as_ref().map(tls_acceptor).transpose()?;
        let prometheus = recorder()?;
        let listener = bind(settings.listen).await?;
        let addr = listener.local_addr().unwrap_or(DEFAULT_LISTEN);
        if !addr.ip().is_loopback() && settings.bearer_token.is_none() {
            tracing::warn!(address = %addr, "the metrics and health endpoint listens beyond loopback without a bearer token (observability.bearer_token)");
        }
        let stats = Arc::new(OnceLock::new());
        let token = settings.bearer_token.clone();
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/status", get(status))
            .layer(axum::middleware::from_fn(move |req, next| {
                authorized(token.clone(), req, next)
            }))
            .with_state(Served {
                pipeline: pipeline.to_string(),
                stats: stats.clone(),
                prometheus,
            });
        let tls = acceptor.is_some();
        match acceptor {
            None => {
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "the metrics and health endpoint stopped");
                    }
                });
            }
            Some(acceptor) => {
                tokio::spawn(serve_tls(listener, acceptor, app));
            }
        }
        let endpoint = Endpoint { addr, tls, stats };
        tracing::info!(url = %endpoint.url(), "serving /metrics, /health, /ready and /status");
        Ok(endpoint)
    }

    /// Serves this pipeline's [`Stats`] from now on (once; later calls are ignored).
    pub fn attach(&self, stats: Arc<Stats>) {
        let _ = self.stats.set(stats);
    }

    /// The bound address (the configured one, or the free port taken instead).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/` or `https://ADDR/`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/", self.addr)
    }
}

/// The process's Prometheus recorder: installed by the first endpoint (with its upkeep task),
/// shared by every later one, so several pipelines of one process each serve the whole
/// process's metrics (told apart by their `pipeline` label).
fn recorder() -> Result<PrometheusHandle, Error> {
    static RECORDER: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut installed = RECORDER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = install_recorder()?;
    let upkeep = handle.clone();
    // A thread of its own: it outlives the runtime of whichever pipeline started it.
    let spawned = std::thread::Builder::new()
        .name("flowgate-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are drained at each scrape only");
    }
    *installed = Some(handle.clone());
    Ok(handle)
}

fn install_recorder() -> Result<PrometheusHandle, Error> {
    let failed = |e: metrics_exporter_prometheus::BuildError| {
        Error::fatal("cannot install the Prometheus recorder for the endpoint")
            .with_context("cause", e)
            .with_hint("another `metrics` recorder is installed in this process: start the endpoint before it, or serve that recorder instead (observability.disabled = true)")
    };
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in [
        (metric_names::END_TO_END, &LATENCY_BUCKETS[..]),
        (metric_names::COMMIT_LATENCY, &COMMIT_BUCKETS[..]),
        ("flowgate_store_operation_seconds", &COMMIT_BUCKETS[..]),
        ("flowgate_sink_request_seconds", &LATENCY_BUCKETS[..]),
    ] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .map_err(failed)?;
    }
    builder.install_recorder().map_err(failed)
}

async fn bind(listen: Option<SocketAddr>) -> Result<tokio::net::TcpListener, Error> {
    let addr = listen.unwrap_or(DEFAULT_LISTEN);
    let bound = match tokio::net::TcpListener::bind(addr).await {
        Err(e) if listen.is_none() && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(address = %addr, "the default metrics port is taken (another pipeline on this host?); serving on a free loopback port instead");
            tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await
        }
        other => other,
    };
    bound.map_err(|e| {
        Error::config("cannot listen for the metrics and health endpoint")
            .with_context("key", "observability.listen")
            .with_context("address", addr)
            .with_context("cause", e)
            .with_hint("choose a free port with observability.listen or --metrics-addr")
    })
}

/// The server side of TLS from the configured PEM files (TLS 1.2 and 1.3, ring's ciphers,
/// HTTP/1.1 announced by ALPN).
fn tls_acceptor(tls: &EndpointTls) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let unreadable = |key: &'static str, path: &PathBuf, e: &dyn std::fmt::Display| {
        Error::config("the endpoint's TLS file does not load")
            .with_context("key", key)
            .with_context("path", path.display())
            .with_context("cause", e.to_string())
            .with_hint(
                "give a PEM certificate chain (cert_file) and its PEM private key (key_file)",
            )
    };
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| unreadable("observability.tls.cert_file", &tls.cert_file, &e))?;
    if certs.is_empty() {
        return Err(unreadable(
            "observability.tls.cert_file",
            &tls.cert_file,
            &"no CERTIFICATE block",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| unreadable("observability.tls.key_file", &tls.key_file, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| {
            Error::config("the endpoint's certificate and key do not make a TLS identity")
                .with_context("key", "observability.tls")
                .with_context("cause", e)
                .with_hint("key_file must hold the private key of cert_file's first certificate")
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TCP connections and serves each over TLS on its own task, so a slow or failed
/// handshake holds up nobody else.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
) {
    const HANDSHAKE: Duration = Duration::from_secs(10);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "the endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "endpoint connection ended");
            }
        });
    }
}

#[derive(Clone)]
struct Served {
    pipeline: String,
    stats: Arc<OnceLock<Arc<Stats>>>,
    prometheus: PrometheusHandle,
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

/// Liveness: the process serves and the pipeline has not stopped (`starting` before the
/// pipeline is attached).
async fn health(State(s): State<Served>) -> Response {
    let Some(stats) = s.stats.get() else {
        return axum::Json(serde_json::json!({ "health": "starting" })).into_response();
    };
    let h = stats.health();
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
    let (health, reasons) = match s.stats.get() {
        Some(stats) => (Some(stats.health()), stats.readiness()),
        None => (
            None,
            vec![NotReady {
                partition: None,
                reason: "starting",
                detail: "connecting the source, sink and stores".into(),
            }],
        ),
    };
    let ready = reasons.is_empty() && health == Some(Health::Healthy);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "pipeline": s.pipeline,
        "ready": ready,
        "health": health.map_or_else(|| "starting".to_string(), |h| h.to_string()),
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

/// Everything per partition: owner, checkpoint, end, lag (from the committed position) and
/// what makes it up, rate of change, status, catch-up estimate.
async fn status(State(s): State<Served>) -> Response {
    let Some(stats) = s.stats.get() else {
        return axum::Json(StatusBody {
            pipeline: s.pipeline.clone(),
            health: "starting".into(),
            lag: 0,
            in_flight: 0,
            records_in: 0,
            records_out: 0,
            partitions: Vec::new(),
        })
        .into_response();
    };
    let snap = stats.snapshot();
    axum::Json(StatusBody {
        pipeline: s.pipeline.clone(),
        health: snap.health.to_string(),
        lag: snap.lag,
        in_flight: snap.in_flight,
        records_in: snap.records_in,
        records_out: snap.records_out,
        partitions: stats.partitions(),
    })
    .into_response()
}
