//! A broker that cannot be reached is never "healthy": `flowgate run` warns with the cause,
//! repeats the warning, and stops after `runtime.health.disconnect_timeout` with an error
//! naming the endpoint — for each broker. Nothing listens on port 1 of the loopback address,
//! so these need no broker running.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flowgate");

/// Runs a pipeline from `source` (a `[source]` table) with a 3 s disconnect timeout; returns
/// its exit status, standard error and how long it ran.
fn run_unreachable(name: &str, source: &str) -> (bool, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\n{source}\n[sink]\ntype = \"null\"\n[store]\ntype = \"embedded\"\npath = \"{}\"\n\
             [runtime.health]\ndisconnect_timeout = \"3s\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .args(["--duration", "60s"])
        .env("FLOWGATE_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

fn assert_reported(name: &str, endpoint: &str, (ok, stderr, took): (bool, String, Duration)) {
    assert!(
        !ok,
        "{name}: an unreachable broker must fail the run: {stderr}"
    );
    assert!(
        took < Duration::from_secs(30),
        "{name}: gave up after {took:?}, not after the 3 s timeout"
    );
    assert!(
        stderr.contains("cannot reach its broker"),
        "{name}: the disconnection is warned about: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(endpoint),
        "{name}: the error names {endpoint}: {last}"
    );
    assert!(
        last.contains("disconnect_timeout"),
        "{name}: says how long it waited: {last}"
    );
}

#[test]
fn kafka_unreachable_is_reported_then_fatal() {
    let res = run_unreachable(
        "kafka-down",
        "[source]\ntype = \"kafka\"\nbootstrap_servers = \"127.0.0.1:1\"\ntopics = [\"t\"]",
    );
    assert_reported("kafka", "127.0.0.1:1", res);
}

#[test]
fn rabbitmq_unreachable_is_reported_then_fatal() {
    let res = run_unreachable(
        "rabbitmq-down",
        "[source]\ntype = \"rabbitmq\"\nurl = \"amqp://guest:secret-pw@127.0.0.1:1/%2f\"\nqueue = \"q\"",
    );
    assert!(
        !res.1.contains("secret-pw"),
        "the password never appears: {}",
        res.1
    );
    assert_reported("rabbitmq", "127.0.0.1:1", res);
}

#[test]
fn kinesis_unreachable_is_reported_then_fatal() {
    let res = run_unreachable(
        "kinesis-down",
        "[source]\ntype = \"kinesis\"\nstream = \"s\"\n[source.connection]\nendpoint_url = \"http://127.0.0.1:1\"\nregion = \"us-east-1\"\naccess_key_id = \"a\"\nsecret_access_key = \"b\"\ncall_timeout = \"1s\"",
    );
    assert_reported("kinesis", "127.0.0.1:1", res);
}

/// Secrets given in a pipeline file — a Kafka SASL password and TLS key password, a
/// RabbitMQ URL password, a Kinesis secret key, PostgreSQL and Redis URL passwords — never
/// appear in anything `flowgate run` prints, even logging at `trace` and failing with an
/// error about the very endpoint they belong to.
#[test]
fn secrets_never_appear_in_logs_or_errors() {
    let cases = [
        (
            "kafka",
            "[source]\ntype = \"kafka\"\nbootstrap_servers = \"127.0.0.1:1\"\ntopics = [\"t\"]\n\
             properties = { \"sasl.oauthbearer.client.secret\" = \"s3cret-oauth\" }\n\
             [source.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"u\"\npassword = \"s3cret-sasl\"\n\
             [source.tls]\nkey_password = \"s3cret-keypw\"\n",
            "[store]\ntype = \"memory\"\n",
        ),
        (
            "rabbitmq",
            "[source]\ntype = \"rabbitmq\"\nurl = \"amqp://guest:s3cret-amqp@127.0.0.1:1/%2f\"\nqueue = \"q\"\n",
            "[store]\ntype = \"memory\"\n",
        ),
        (
            "kinesis",
            "[source]\ntype = \"kinesis\"\nstream = \"s\"\n[source.connection]\nendpoint_url = \"http://127.0.0.1:1\"\n\
             region = \"us-east-1\"\naccess_key_id = \"AKIAFLOWGATE\"\nsecret_access_key = \"s3cret-aws\"\ncall_timeout = \"1s\"\n",
            "[store]\ntype = \"memory\"\n",
        ),
        (
            "postgres",
            "[source]\ntype = \"generator\"\n",
            "[store]\ntype = \"postgres\"\nurl = \"postgres://flowgate:s3cret-pg@127.0.0.1:1/flowgate\"\ngive_up_after = \"1s\"\n",
        ),
        (
            "redis",
            "[source]\ntype = \"generator\"\n",
            "[store]\ntype = \"redis\"\nurl = \"redis://:s3cret-redis@127.0.0.1:1\"\ngive_up_after = \"1s\"\n",
        ),
    ];
    for (name, source, store) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            format!(
                "name = \"secrets-{name}\"\n{source}[sink]\ntype = \"null\"\n{store}\
                 [runtime.health]\ndisconnect_timeout = \"2s\"\n"
            ),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .args(["--duration", "30s"])
            .env("FLOWGATE_LOG", "trace")
            .output()
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{name}: must fail: {printed}");
        assert!(
            printed.contains("127.0.0.1:1"),
            "{name}: the endpoint is named: {printed}"
        );
        for secret in [
            "s3cret-oauth",
            "s3cret-sasl",
            "s3cret-keypw",
            "s3cret-amqp",
            "s3cret-aws",
            "s3cret-pg",
            "s3cret-redis",
        ] {
            let at = printed.find(secret);
            assert!(
                at.is_none(),
                "{name}: {secret} printed: …{}…",
                &printed[at.unwrap_or(0).saturating_sub(300)
                    ..(at.unwrap_or(0) + 50).min(printed.len())]
            );
        }
        eprintln!(
            "secrets/{name}: {} bytes printed at trace, no secret among them",
            printed.len()
        );
    }
}
