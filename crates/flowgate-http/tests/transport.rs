//! Transport: HTTPS with a private CA and a client certificate the endpoint requires, what a
//! refused or untrusted certificate does, and HTTP/2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Request;
use bytes::Bytes;
use flowgate_core::{ErrorKind, PartitionId, Position, Record, Sink, WriteError};
use flowgate_http::{Encoding, HttpSink, HttpSinkConfig, HttpTls};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A private CA, a server certificate for 127.0.0.1 and a client certificate, written as PEM
/// files into `dir`; returns the CA.
struct Pki {
    ca_pem: String,
}

fn issue(dir: &Path, name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |sans: Vec<String>, file: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    };
    leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        &format!("{name}-server"),
    );
    leaf(vec!["flowgate-client".into()], &format!("{name}-client"));
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
    Pki { ca_pem: ca.pem() }
}

fn record(i: u128) -> Record {
    Record::new(
        PartitionId::new("t-0"),
        Position::new(i),
        Bytes::from(format!("{{\"n\":{i}}}")),
    )
}

/// An HTTPS endpoint on loopback that requires a client certificate signed by `client_ca`;
/// records the bodies it accepts.
async fn https_endpoint(
    dir: &Path,
    name: &str,
    client_ca: &str,
) -> (String, Arc<Mutex<Vec<Bytes>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(client_ca.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let certs = CertificateDer::pem_file_iter(dir.join(format!("{name}-server.pem")))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}-server.key"))).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let log = bodies.clone();
    let app = Router::new().fallback(move |body: Bytes| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(body);
            "ok"
        }
    });
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (format!("https://127.0.0.1:{}/ingest", addr.port()), bodies)
}

fn sink(url: &str, dir: &Path, ca: &str, client: Option<&str>) -> HttpSink {
    HttpSink::new(HttpSinkConfig {
        url: url.to_string(),
        tls: Some(HttpTls {
            ca_file: Some(dir.join(format!("{ca}-ca.pem"))),
            cert_file: client.map(|c| dir.join(format!("{c}-client.pem"))),
            key_file: client.map(|c| dir.join(format!("{c}-client.key"))),
        }),
        ..Default::default()
    })
    .unwrap()
}

fn kind(e: WriteError) -> (ErrorKind, String) {
    match e {
        WriteError::Batch(e) => (e.kind(), e.to_string()),
        WriteError::Partial(mut errs) => {
            let (_, e) = errs.remove(0);
            (e.kind(), e.to_string())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ours = issue(dir.path(), "ours");
    let other = issue(dir.path(), "other");
    let (url, bodies) = https_endpoint(dir.path(), "ours", &ours.ca_pem).await;

    // Trusting the CA and presenting a certificate it signed: delivered.
    let good = sink(&url, dir.path(), "ours", Some("ours"));
    good.write(&[record(1), record(2)]).await.unwrap();
    assert_eq!(bodies.lock().unwrap().concat(), b"{\"n\":1}\n{\"n\":2}\n");
    assert!(good.check().await.unwrap(), "validate reaches it");

    // No client certificate, or one of another CA: refused, a configuration error (under TLS
    // 1.3 the endpoint's alert may be lost with the pooled connection: the sink then asks
    // the endpoint with a handshake of its own).
    for client in [None, Some("other")] {
        let refused = sink(&url, dir.path(), "ours", client);
        let (kind_seen, text) = kind(refused.write(&[record(3)]).await.unwrap_err());
        assert_eq!(kind_seen, ErrorKind::Config, "{client:?}: {text}");
        assert!(text.contains("sink.tls.cert_file"), "{text}");
    }
    // The endpoint's certificate from a CA we do not trust: a configuration error.
    let untrusting = sink(&url, dir.path(), "other", Some("ours"));
    let (kind, text) = kind(untrusting.write(&[record(4)]).await.unwrap_err());
    assert_eq!(kind, ErrorKind::Config, "{text}");
    assert!(text.contains("sink.tls.ca_file"), "{text}");
    drop(other);
    let delivered = bodies
        .lock()
        .unwrap()
        .iter()
        .filter(|b| !b.is_empty())
        .count();
    assert_eq!(
        delivered, 1,
        "nothing else got through (the HEAD of `check` has no body)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge() {
    let versions = Arc::new(Mutex::new(Vec::new()));
    let log = versions.clone();
    let app = Router::new().fallback(move |req: Request| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(format!("{:?}", req.version()));
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let sink = HttpSink::new(HttpSinkConfig {
        url: format!("http://{addr}/ingest"),
        encoding: Encoding::JsonArray,
        http2_prior_knowledge: true,
        ..Default::default()
    })
    .unwrap();
    sink.write(&[record(1), record(2)]).await.unwrap();
    assert_eq!(versions.lock().unwrap().as_slice(), ["HTTP/2.0"]);
}
