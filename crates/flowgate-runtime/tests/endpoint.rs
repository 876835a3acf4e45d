//! The endpoint from library code: it answers while the pipeline is built, serves the
//! pipeline once attached, shares one recorder between pipelines of a process, and speaks
//! HTTPS with a configured certificate (and nothing else then).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flowgate_runtime::adapters::{GeneratorConfig, GeneratorSource, NullSink};
use flowgate_runtime::{Endpoint, EndpointSettings, EndpointTls, Pipeline, Shutdown};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn loopback() -> EndpointSettings {
    EndpointSettings {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..Default::default()
    }
}

/// One `GET` over any stream: (status, body).
async fn get_over<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify; what arrived is the answer.
    let _ = conn.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_string())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_over(tokio::net::TcpStream::connect(addr).await.unwrap(), path).await
}

fn generator(rate: u64) -> GeneratorSource {
    GeneratorSource::new(GeneratorConfig {
        partitions: 2,
        rate: Some(rate as f64),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_answers_while_starting_then_serves_each_attached_pipeline() {
    let first = Endpoint::start(&loopback(), "first").await.unwrap();
    let addr = first.local_addr();
    assert!(
        first.url().starts_with("http://127.0.0.1:"),
        "{}",
        first.url()
    );

    // Before a pipeline is attached: alive, not ready, nothing per partition.
    let (code, body) = get(addr, "/health").await;
    assert_eq!((code, body.as_str()), (200, r#"{"health":"starting"}"#));
    let (code, body) = get(addr, "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(r#""reason":"starting""#), "{body}");
    let (code, body) = get(addr, "/status").await;
    assert_eq!(code, 200);
    assert!(body.contains(r#""partitions":[]"#), "{body}");

    // A second endpoint in the same process shares the recorder instead of failing.
    let second = Endpoint::start(&loopback(), "second").await.unwrap();
    assert_ne!(second.local_addr(), addr);

    let pipeline = Pipeline::builder("first")
        .source(generator(2_000))
        .sink(NullSink::default())
        .build()
        .unwrap();
    first.attach(pipeline.stats());
    let (stop, shutdown) = Shutdown::manual();
    let running = tokio::spawn(pipeline.run(shutdown));

    // Ready once records are acknowledged; metrics carry the pipeline's label.
    let mut ready = (0, String::new());
    for _ in 0..50 {
        ready = get(addr, "/ready").await;
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, 200, "{}", ready.1);
    let (code, metrics) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"flowgate_records_in_total{pipeline="first""#),
        "{metrics}"
    );
    assert!(
        metrics.contains("flowgate_end_to_end_latency_seconds_bucket"),
        "latency is a histogram with buckets: {metrics}"
    );
    // The second endpoint serves the same process-wide metrics.
    let (_, seen_by_second) = get(second.local_addr(), "/metrics").await;
    assert!(seen_by_second.contains(r#"pipeline="first""#));
    // Partitions are published four times a second.
    let mut status = serde_json::Value::Null;
    for _ in 0..20 {
        status = serde_json::from_str(&get(addr, "/status").await.1).unwrap();
        if status["partitions"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status["pipeline"], "first");
    assert_eq!(
        status["partitions"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );

    stop.trigger();
    running.await.unwrap().unwrap();
    let (code, body) = get(addr, "/health").await;
    assert_eq!((code, body.as_str()), (503, r#"{"health":"stopped"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_it_speaks_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let settings = EndpointSettings {
        tls: Some(EndpointTls {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        }),
        ..loopback()
    };
    let endpoint = Endpoint::start(&settings, "tls").await.unwrap();
    let addr = endpoint.local_addr();
    assert!(endpoint.url().starts_with("https://"), "{}", endpoint.url());

    // A client that trusts the certificate gets answers.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (code, body) = get_over(tls, "/health").await;
    assert_eq!((code, body.as_str()), (200, r#"{"health":"starting"}"#));

    // Plain HTTP to the TLS port gets no HTTP answer.
    let (code, _) = get(addr, "/health").await;
    assert_eq!(code, 0, "plain HTTP must not be answered on a TLS endpoint");

    // A key that does not load names its key and file.
    let broken = EndpointSettings {
        tls: Some(EndpointTls {
            cert_file,
            key_file: dir.path().join("missing.pem"),
        }),
        ..loopback()
    };
    let err = Endpoint::start(&broken, "tls")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("observability.tls.key_file"), "{err}");
    assert!(err.contains("missing.pem"), "{err}");
}
