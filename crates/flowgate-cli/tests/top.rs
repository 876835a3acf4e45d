//! `flowgate top` in a real terminal (tmux): it draws a running pipeline's partitions with
//! their status and lag, `s` changes the sort order, `q` quits.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used)]

mod http;

use std::process::Command;
use std::time::{Duration, Instant};

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tmux is needed (`cargo xtask test` installs it): {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the pane shows `text`; returns the pane.
fn pane_showing(session: &str, text: &str) -> String {
    let started = Instant::now();
    loop {
        let pane = tmux(&["capture-pane", "-p", "-t", session]);
        if pane.contains(text) {
            return pane;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the pane never showed {text:?}:\n{pane}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn top_draws_the_partitions_sorts_and_quits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "name = \"watched\"\n[source]\ntype = \"generator\"\npartitions = 3\nrate = 3000\n\
         [sink]\ntype = \"null\"\nfaults = { capacity_per_sec = 2000.0 }\n[store]\ntype = \"memory\"\n",
    )
    .unwrap();
    let (mut child, addr) = http::run_with_endpoint(&path, "127.0.0.1:0", &["--duration", "25s"]);
    let session = format!("flowgate-top-{}", std::process::id());
    let bin = env!("CARGO_BIN_EXE_flowgate");
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "140",
        "-y",
        "30",
        &format!("{bin} top {addr}"),
    ]);
    let pane = pane_showing(&session, "gen-2");
    assert!(
        pane.contains("flowgate top") && pane.contains("pipeline watched"),
        "{pane}"
    );
    for column in [
        "PARTITION",
        "STATUS",
        "LAG (records)",
        "CATCH-UP",
        "IN-FLIGHT",
    ] {
        assert!(pane.contains(column), "{column} missing:\n{pane}");
    }
    assert!(pane.contains("gen-0") && pane.contains("gen-1"), "{pane}");
    assert!(pane.contains("sort (partition)"), "{pane}");
    // The sink is slower than the source: the lag shows and grows.
    let pane = pane_showing(&session, "WARN");
    assert!(pane.contains("in ") && pane.contains("/s"), "{pane}");
    tmux(&["send-keys", "-t", &session, "s"]);
    pane_showing(&session, "sort (lag)");
    tmux(&["send-keys", "-t", &session, "q"]);
    let started = Instant::now();
    while Command::new("tmux")
        .args(["has-session", "-t", &session])
        .status()
        .unwrap()
        .success()
    {
        assert!(started.elapsed() < Duration::from_secs(5), "q did not quit");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
