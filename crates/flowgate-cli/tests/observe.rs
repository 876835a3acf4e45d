//! The running pipeline's endpoint, as an operator or an orchestrator sees it: `/metrics` in
//! Prometheus text (histograms with buckets), `/health` 200, `/ready` 200 while records are
//! acknowledged and 503 naming the stalled partitions while the sink stalls, then 200 again;
//! `/status` per partition with the lag counted from the committed position.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flowgate");

/// `GET path` on `addr`: status code and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies: keep the JSON or text between the chunk sizes.
    (code, body)
}

#[test]
fn endpoints_show_progress_a_stall_and_the_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"observed\"\n\
             [source]\ntype = \"generator\"\npartitions = 2\nrate = 2000\n\
             [sink]\ntype = \"null\"\nfaults = {{ stall_after = \"3s\", stall_for = \"5s\" }}\n\
             [store]\ntype = \"embedded\"\npath = \"{}\"\n\
             [runtime.health]\nstall_window = \"1s\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .args(["--duration", "14s", "--metrics-addr", "127.0.0.1:0"])
        .env("FLOWGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = String::new();
    let mut line = String::new();
    while addr.is_empty() {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no endpoint announced"
        );
        if let Some(rest) = line.split("http://").nth(1) {
            addr = rest.split('/').next().unwrap().to_string();
        }
    }
    std::thread::spawn(move || for _ in stderr.lines() {});

    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(&addr, "/health").0, 200);
    let (code, body) = get(&addr, "/ready");
    assert_eq!(code, 200, "ready while records flow: {body}");
    let (code, metrics) = get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("flowgate_source_connected{pipeline=\"observed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flowgate_store_connected{pipeline=\"observed\"} 1"),
        "{metrics}"
    );
    for name in [
        "flowgate_records_in_total",
        "flowgate_records_out_total",
        "flowgate_lag{",
        "flowgate_healthy",
        "flowgate_source_connected",
        "flowgate_lag_seconds{",
        "flowgate_partition_status{",
        "flowgate_catch_up_seconds{",
        "flowgate_last_checkpoint_timestamp_seconds{",
        "flowgate_end_to_end_latency_seconds_bucket",
        "flowgate_commit_latency_seconds_bucket",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }

    // The sink stalls at 3 s for 5 s: /ready turns 503 naming the stalled partitions, and
    // /status counts what is received and unconfirmed as lag.
    let started = Instant::now();
    let (mut stalled, mut stall_status) = (None, String::new());
    while started.elapsed() < Duration::from_secs(6) {
        let (code, body) = get(&addr, "/ready");
        if code == 503 {
            stalled = Some(body);
            stall_status = get(&addr, "/status").1;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let stalled = stalled.expect("/ready never turned 503 during the stall");
    assert!(stalled.contains("\"stalled\""), "{stalled}");
    assert!(
        stalled.contains("gen-0") && stalled.contains("gen-1"),
        "{stalled}"
    );
    let status: serde_json::Value = serde_json::from_str(stall_status.trim())
        .unwrap_or_else(|e| panic!("/status is JSON ({e}): {stall_status}"));
    let parts = status["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{status}");
    for p in parts {
        let lag = p["lag"].as_u64().unwrap();
        let uncommitted = p["uncommitted"].as_u64().unwrap();
        assert!(
            uncommitted > 0 && lag >= uncommitted,
            "lag counts what is not committed: {p}"
        );
        assert_eq!(p["status"], "STALL", "{p}");
        let secs = p["lag_seconds"].as_f64().unwrap();
        assert!(
            secs > 0.5,
            "the oldest uncommitted record is seconds old: {p}"
        );
    }

    // After the stall: ready again.
    let recovered = Instant::now();
    loop {
        let (code, body) = get(&addr, "/ready");
        if code == 200 {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(8),
            "never ready again: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(child.wait().unwrap().success());
}
