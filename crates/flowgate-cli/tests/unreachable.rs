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
