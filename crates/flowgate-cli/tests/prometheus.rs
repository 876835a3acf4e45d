//! The shipped dashboard and alert rules against a real Prometheus (the rig's, scraping the
//! pipeline every second with `deploy/prometheus/flowgate-rules.yml` loaded): every dashboard
//! expression parses and returns data; when the sink stalls, `FlowgateLagGrowing` fires and
//! `/ready` turns 503 and Prometheus sees the partitions in STALL; all recover once the sink
//! confirms again.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used)]

mod http;

use std::time::{Duration, Instant};

use http::{encode, get, run_with_endpoint};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the rig's Prometheus with `cargo xtask brokers up --only prometheus` and export what it prints")
    })
}

/// `GET /api/v1/…` on Prometheus, as JSON.
fn api(prometheus: &str, path: &str) -> serde_json::Value {
    let (code, body) = get(prometheus, path);
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
    assert_eq!(code, 200, "{path}: {v}");
    v
}

fn alert_state(prometheus: &str, name: &str) -> Option<String> {
    api(prometheus, "/api/v1/alerts")["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] == name)
        .map(|a| a["state"].as_str().unwrap().to_string())
        .max()
}

#[test]
fn dashboard_queries_answer_and_the_lag_alert_fires_on_a_stall_and_resolves() {
    let prometheus = env("FLOWGATE_TEST_PROMETHEUS_URL")
        .trim_start_matches("http://")
        .to_string();
    let target = env("FLOWGATE_TEST_PROMETHEUS_TARGET");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"scraped\"\n\
             [source]\ntype = \"generator\"\npartitions = 2\nrate = 2000\n\
             [sink]\ntype = \"null\"\nfaults = {{ stall_after = \"12s\", stall_for = \"45s\" }}\n\
             [store]\ntype = \"embedded\"\npath = \"{}\"\n\
             [runtime.health]\nstall_window = \"2s\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let (mut child, addr) = run_with_endpoint(&path, &target, &["--duration", "80s"]);
    assert_eq!(addr, target);

    // Scraped: the target is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = api(
            &prometheus,
            &format!("/api/v1/query?query={}", encode("up{job=\"flowgate\"}")),
        );
        if up["data"]["result"][0]["value"][1] == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped {target}: {up}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(6));

    // Every dashboard expression parses and answers with series for this pipeline.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy/grafana/flowgate.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut empty = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5s")
                .replace("$pipeline", "scraped");
            let answer = api(
                &prometheus,
                &format!("/api/v1/query?query={}", encode(&expr)),
            );
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            if answer["data"]["result"]
                .as_array()
                .is_none_or(|r| r.is_empty())
            {
                empty.push(expr);
            }
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );
    // One scrape with more lag than the one before makes the alert pending on a healthy
    // pipeline too; only growth held for the rule's `for` makes it fire.
    let before = alert_state(&prometheus, "FlowgateLagGrowing");
    assert_ne!(before.as_deref(), Some("firing"), "fired before the stall");
    let (code, body) = get(&addr, "/ready");
    assert_eq!(code, 200, "ready before the stall: {body}");

    // The sink stalls at 12 s: lag grows at every scrape and the alert fires after its `for`.
    let (mut not_ready_seen, mut stall_seen) = (false, false);
    let status = format!(
        "/api/v1/query?query={}",
        encode("max(flowgate_partition_status{pipeline=\"scraped\"})")
    );
    let fired_at = loop {
        if get(&addr, "/ready").0 == 503 {
            not_ready_seen = true;
        }
        if api(&prometheus, &status)["data"]["result"][0]["value"][1] == "2" {
            stall_seen = true;
        }
        if alert_state(&prometheus, "FlowgateLagGrowing").as_deref() == Some("firing") {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(56),
            "FlowgateLagGrowing never fired during the stall"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(not_ready_seen, "/ready never turned 503 during the stall");
    assert!(stall_seen, "Prometheus never saw a partition in STALL");
    assert!(
        fired_at >= Duration::from_secs(12 + 30),
        "fired before its `for` could elapse: {fired_at:?}"
    );
    eprintln!(
        "FlowgateLagGrowing fired {:.1}s after the stall began",
        fired_at.as_secs_f64() - 12.0
    );

    // The sink confirms again at 57 s: the alert resolves, /ready answers 200 again.
    let deadline = Duration::from_secs(57 + 15);
    loop {
        let state = alert_state(&prometheus, "FlowgateLagGrowing");
        let ready = get(&addr, "/ready").0 == 200;
        if state.is_none() && ready && started.elapsed() > Duration::from_secs(57) {
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "not recovered: alert {state:?}, ready {ready}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "recovered {:.1}s after the stall ended",
        started.elapsed().as_secs_f64() - 57.0
    );
    assert!(child.wait().unwrap().success());
}
