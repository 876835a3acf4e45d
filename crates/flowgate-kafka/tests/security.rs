//! The Kafka adapter over the rig's TLS and SASL listeners: the conformance suites over
//! SASL_SSL + SCRAM-SHA-512, SSL with a client certificate, and SASL_PLAINTEXT + PLAIN; a
//! wrong password and an untrusted server certificate stop the source and the sink with a
//! configuration error naming the listener (and the mechanism), never the secret.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_core::testkit::{sink::SinkHarness, source::SourceHarness};
use flowgate_core::{Credits, Error, ErrorKind, PartitionId, Record, Sink, Source, SourceContext};
use flowgate_kafka::{
    KafkaSasl, KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig, KafkaTls, SaslMechanism,
    SecurityProtocol, partition_id,
};

mod common;
use common::{create_topic, produce, unique};

fn env(var: &str) -> String {
    flowgate_rig_tests::endpoint(var)
}

/// How one listener is reached: servers, protocol, TLS and SASL tables.
#[derive(Clone)]
struct Listener {
    servers: String,
    protocol: SecurityProtocol,
    tls: Option<KafkaTls>,
    sasl: Option<KafkaSasl>,
}

fn rig_tls(client_cert: bool) -> KafkaTls {
    let dir = PathBuf::from(env("FLOWGATE_TEST_KAFKA_TLS_DIR"));
    KafkaTls {
        ca: Some(PathBuf::from(env("FLOWGATE_TEST_KAFKA_CA"))),
        cert: client_cert.then(|| dir.join("client.pem")),
        key: client_cert.then(|| dir.join("client.key")),
        ..Default::default()
    }
}

fn sasl(mechanism: SaslMechanism, password: &str) -> KafkaSasl {
    KafkaSasl {
        mechanism,
        username: Some(env("FLOWGATE_TEST_KAFKA_SASL_USER")),
        password: Some(password.to_string()),
        password_env: None,
    }
}

fn sasl_ssl(password: &str) -> Listener {
    Listener {
        servers: env("FLOWGATE_TEST_KAFKA_SASL_SSL_BOOTSTRAP"),
        protocol: SecurityProtocol::SaslSsl,
        tls: Some(rig_tls(false)),
        sasl: Some(sasl(SaslMechanism::ScramSha512, password)),
    }
}

fn ssl_with_client_cert() -> Listener {
    Listener {
        servers: env("FLOWGATE_TEST_KAFKA_SSL_BOOTSTRAP"),
        protocol: SecurityProtocol::Ssl,
        tls: Some(rig_tls(true)),
        sasl: None,
    }
}

fn sasl_plaintext_plain() -> Listener {
    Listener {
        servers: env("FLOWGATE_TEST_KAFKA_SASL_PLAINTEXT_BOOTSTRAP"),
        protocol: SecurityProtocol::SaslPlaintext,
        tls: None,
        sasl: Some(sasl(
            SaslMechanism::Plain,
            &env("FLOWGATE_TEST_KAFKA_SASL_PASSWORD"),
        )),
    }
}

fn source_config(l: &Listener, topic: &str, group: &str) -> KafkaSourceConfig {
    KafkaSourceConfig {
        bootstrap_servers: l.servers.clone(),
        security_protocol: Some(l.protocol),
        tls: l.tls.clone(),
        sasl: l.sasl.clone(),
        topics: vec![topic.to_string()],
        group_id: Some(group.to_string()),
        session_timeout: Duration::from_secs(6),
        max_poll_interval: Duration::from_secs(20),
        rebalance_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn sink_config(l: &Listener, topic: &str) -> KafkaSinkConfig {
    KafkaSinkConfig {
        bootstrap_servers: l.servers.clone(),
        security_protocol: Some(l.protocol),
        tls: l.tls.clone(),
        sasl: l.sasl.clone(),
        topic: Some(topic.to_string()),
        ..Default::default()
    }
}

struct SourceH {
    listener: Listener,
    topic: Mutex<String>,
    group: Mutex<String>,
}

#[async_trait]
impl SourceHarness for SourceH {
    type Source = KafkaSource;
    async fn prepare(&self, per_partition: usize) -> Result<Vec<PartitionId>, Error> {
        let topic = unique("sec-src");
        create_topic(&topic, 2).await;
        produce(&topic, 2, per_partition).await;
        *self.topic.lock().unwrap() = topic.clone();
        *self.group.lock().unwrap() = unique("sec-group");
        Ok((0..2).map(|p| partition_id(&topic, p)).collect())
    }
    async fn open_source(&self) -> Result<KafkaSource, Error> {
        KafkaSource::new(source_config(
            &self.listener,
            &self.topic.lock().unwrap(),
            &self.group.lock().unwrap(),
        ))
    }
}

struct SinkH {
    listener: Listener,
    topic: String,
}

#[async_trait]
impl SinkHarness for SinkH {
    type Sink = KafkaSink;
    async fn open_sink(&self) -> Result<KafkaSink, Error> {
        KafkaSink::new(sink_config(&self.listener, &self.topic))
    }
    async fn read_back(&self) -> Result<Vec<Record>, Error> {
        Ok(common::read_back(&self.topic).await)
    }
}

async fn conforms(listener: Listener) {
    flowgate_core::testkit::source::run_all(&SourceH {
        listener: listener.clone(),
        topic: Mutex::new(String::new()),
        group: Mutex::new(String::new()),
    })
    .await;
    let topic = unique("sec-sink");
    create_topic(&topic, 1).await;
    flowgate_core::testkit::sink::run_all(&SinkH { listener, topic }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_sink_conform_over_sasl_ssl_with_scram_sha_512() {
    conforms(sasl_ssl(&env("FLOWGATE_TEST_KAFKA_SASL_PASSWORD"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_sink_conform_over_ssl_with_a_client_certificate() {
    conforms(ssl_with_client_cert()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_sink_conform_over_sasl_plaintext_with_plain() {
    conforms(sasl_plaintext_plain()).await;
}

/// Opens a source on `l` and reads events until one is an error (at most 30 s).
async fn source_error(l: &Listener) -> (Error, Duration) {
    let topic = unique("sec-bad");
    create_topic(&topic, 1).await;
    let mut source = KafkaSource::new(source_config(l, &topic, &unique("sec-bad-group"))).unwrap();
    let started = Instant::now();
    source
        .open(SourceContext::new("sec-bad", Credits::new()))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Err(e) = source.next().await {
                return e;
            }
        }
    })
    .await
    .expect("the source must fail, not retry forever");
    let took = started.elapsed();
    source.close().await.unwrap();
    (err, took)
}

/// Writes one record through a sink on `l`; the error it ends with (at most 30 s).
async fn sink_error(l: &Listener) -> (Error, Duration) {
    let topic = unique("sec-bad-sink");
    create_topic(&topic, 1).await;
    let sink = KafkaSink::new(sink_config(l, &topic)).unwrap();
    let started = Instant::now();
    let record = Record::new(
        PartitionId::new("p"),
        flowgate_core::Position::from(1u64),
        bytes::Bytes::from_static(b"x"),
    );
    let res = tokio::time::timeout(Duration::from_secs(30), sink.write(&[record]))
        .await
        .expect("the sink must fail, not retry forever");
    let err = match res {
        Err(flowgate_core::WriteError::Batch(e)) => e,
        Err(flowgate_core::WriteError::Partial(mut v)) => v.remove(0).1,
        Ok(()) => panic!("the write succeeded"),
    };
    (err, started.elapsed())
}

fn assert_config_error(what: &str, err: &Error, servers: &str, words: &[&str], secret: &str) {
    let text = err.to_string();
    eprintln!("kafka/security: {what}: {text}");
    assert_eq!(err.kind(), ErrorKind::Config, "{what}: {text}");
    assert!(text.contains(servers), "{what}: names the listener: {text}");
    for w in words {
        assert!(text.contains(w), "{what}: says {w:?}: {text}");
    }
    assert!(!text.contains(secret), "{what}: the secret leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_source_and_sink_with_a_config_error() {
    let wrong = "not-the-rig-password";
    let l = sasl_ssl(wrong);
    let (err, took) = source_error(&l).await;
    assert_config_error(
        "source",
        &err,
        &l.servers,
        &["SCRAM-SHA-512", "credentials"],
        wrong,
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    let (err, took) = sink_error(&l).await;
    assert_config_error(
        "sink",
        &err,
        &l.servers,
        &["SCRAM-SHA-512", "credentials"],
        wrong,
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_certificate_stops_source_and_sink_with_a_config_error() {
    // A CA of its own, which never signed the broker's certificate.
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=other CA",
            "-keyout",
            "other.key",
            "-out",
            "other.pem",
        ])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mut l = ssl_with_client_cert();
    l.tls = Some(KafkaTls {
        ca: Some(dir.path().join("other.pem")),
        ..Default::default()
    });
    let (err, _) = source_error(&l).await;
    assert_config_error("source", &err, &l.servers, &["TLS", "tls.ca"], "\u{0}");
    let (err, _) = sink_error(&l).await;
    assert_config_error("sink", &err, &l.servers, &["TLS", "tls.ca"], "\u{0}");
}

/// A secret in a config never shows in `Debug`, and not in the errors above.
#[test]
fn secrets_are_redacted_in_debug() {
    let mut cfg = KafkaSourceConfig {
        sasl: Some(KafkaSasl {
            mechanism: SaslMechanism::ScramSha512,
            username: Some("u".into()),
            password: Some("hunter2-sasl".into()),
            password_env: None,
        }),
        tls: Some(KafkaTls {
            key_password: Some("hunter2-key".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    cfg.properties.insert(
        "sasl.oauthbearer.client.secret".into(),
        "hunter2-oauth".into(),
    );
    let text = format!("{cfg:?}");
    for s in ["hunter2-sasl", "hunter2-key", "hunter2-oauth"] {
        assert!(!text.contains(s), "{text}");
    }
    let sink = KafkaSinkConfig {
        sasl: cfg.sasl.clone(),
        tls: cfg.tls.clone(),
        ..Default::default()
    };
    let text = format!("{sink:?}");
    assert!(!text.contains("hunter2"), "{text}");
}

/// The rig's SSL listener requires a client certificate: without one the source and the sink
/// stop with a configuration error, as with a certificate of another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_foreign_client_certificate_is_a_config_error() {
    let mut l = ssl_with_client_cert();
    l.tls = Some(rig_tls(false));
    let (err, _) = source_error(&l).await;
    assert_config_error(
        "source without a certificate",
        &err,
        &l.servers,
        &["TLS"],
        "\u{0}",
    );
    let (err, _) = sink_error(&l).await;
    assert_config_error(
        "sink without a certificate",
        &err,
        &l.servers,
        &["TLS"],
        "\u{0}",
    );
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = flowgate_rig_tests::foreign_client_certificate(dir.path());
    l.tls = Some(KafkaTls {
        cert: Some(cert),
        key: Some(key),
        ..rig_tls(false)
    });
    let (err, _) = source_error(&l).await;
    assert_config_error(
        "source with a foreign certificate",
        &err,
        &l.servers,
        &["TLS"],
        "\u{0}",
    );
}
