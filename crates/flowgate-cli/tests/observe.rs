//! The running pipeline's endpoint, as an operator or an orchestrator sees it: `/metrics` in
//! Prometheus text (histograms with buckets), `/health` 200, `/ready` 200 while records are
//! acknowledged and 503 naming the stalled partitions while the sink stalls, then 200 again;
//! `/status` per partition with the lag counted from the committed position.
#![allow(clippy::unwrap_used)]

mod http;

use std::time::{Duration, Instant};

use http::{get, get_with, run_with_endpoint};

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
    let (mut child, addr) = run_with_endpoint(&path, "127.0.0.1:0", &["--duration", "14s"]);
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
    // Every metric the shipped dashboard and alert rules name is served.
    for name in deploy_metric_names() {
        assert!(
            metrics.contains(&format!("{name}{{")),
            "{name} (named in deploy/) missing from /metrics:\n{metrics}"
        );
    }
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

/// Every `flowgate_*` metric named by the dashboard and the alert rules in `deploy/`.
fn deploy_metric_names() -> std::collections::BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let mut names = std::collections::BTreeSet::new();
    for file in ["grafana/flowgate.json", "prometheus/flowgate-rules.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (i, _) in text.match_indices("flowgate_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    assert!(names.len() > 15, "{names:?}");
    names
}

/// The dashboard imports anywhere: a datasource input and variable, a stable uid, every panel
/// on the datasource variable with a unit, rates over `$__rate_interval`.
#[test]
fn the_dashboard_is_importable() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/flowgate.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(d["uid"], "flowgate-pipelines");
    assert_eq!(d["__inputs"][0]["type"], "datasource");
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource")
    );
    assert!(vars.iter().any(|v| v["name"] == "pipeline"));
    let panels: Vec<&serde_json::Value> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    assert!(panels.len() >= 15);
    let mut ids = std::collections::BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(
            p["fieldConfig"]["defaults"]["unit"].is_string(),
            "{} has no unit",
            p["title"]
        );
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("$pipeline"), "{expr}");
            if expr.contains("rate(") || expr.contains("increase(") {
                assert!(expr.contains("[$__rate_interval]"), "{expr}");
            }
        }
    }
}

/// With `observability.bearer_token`, nothing is served without the token.
#[test]
fn a_bearer_token_guards_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "name = \"guarded\"\n[source]\ntype = \"generator\"\npartitions = 1\nrate = 100\n\
         [sink]\ntype = \"null\"\n[store]\ntype = \"memory\"\n\
         [observability]\nbearer_token = \"s3cret-token\"\n",
    )
    .unwrap();
    let (mut child, addr) = run_with_endpoint(&path, "127.0.0.1:0", &["--duration", "4s"]);
    for p in ["/metrics", "/health", "/ready", "/status"] {
        assert_eq!(get(&addr, p).0, 401, "{p} without a token");
        assert_eq!(
            get_with(&addr, p, "Authorization: Bearer wrong-token!\r\n").0,
            401,
            "{p} with a wrong token"
        );
    }
    let (code, body) = get_with(&addr, "/metrics", "Authorization: Bearer s3cret-token\r\n");
    assert_eq!(code, 200);
    assert!(body.contains("flowgate_records_in_total"), "{body}");
    assert!(!body.contains("s3cret"), "the token is never served");
    assert!(child.wait().unwrap().success());
}
