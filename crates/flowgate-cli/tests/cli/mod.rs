//! The `flowgate` binary's read-only commands, as the tests call them.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `flowgate ARGS` to its end.
pub(crate) fn flowgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        .env("FLOWGATE_LOG", "warn")
        .output()
        .unwrap()
}

/// `flowgate validate -c config`: its exit code and report.
pub(crate) fn validate(config: &Path) -> (i32, String) {
    let out = flowgate(&["validate", "-c", config.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `flowgate lag -c config --json`: the partitions, by name.
pub(crate) fn lag(config: &Path) -> std::collections::BTreeMap<String, serde_json::Value> {
    let out = flowgate(&["lag", "-c", config.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "flowgate lag failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["partition"].as_str().unwrap().to_string(), p.clone()))
        .collect()
}
