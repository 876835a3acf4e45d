//! Nothing the rig starts listens on anything but loopback (`ss -ltnp`).
#![cfg(feature = "brokers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn every_rig_listener_is_on_loopback() {
    // Fails loudly without the rig, like every broker test.
    let _ = flowgate_rig_tests::endpoint("FLOWGATE_TEST_RIG_STATE");
    let out = Command::new("ss")
        .args(["-ltnpH"])
        .output()
        .expect("run ss (iproute2)");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let rig_processes = [
        "java",
        "beam.smp",
        "epmd",
        "node",
        "postgres",
        "redis-server",
    ];
    let mut checked = 0;
    for line in text.lines() {
        let Some(process) = rig_processes
            .iter()
            .find(|p| line.contains(&format!("((\"{p}\"")))
        else {
            continue;
        };
        let local = line
            .split_whitespace()
            .nth(3)
            .expect("local address column");
        let host = local.rsplit_once(':').map(|(h, _)| h).unwrap_or(local);
        let loopback =
            host.starts_with("127.") || host == "[::1]" || host.starts_with("[::ffff:127.");
        assert!(
            loopback,
            "{process} listens on {local}, not on loopback: {line}"
        );
        checked += 1;
    }
    assert!(
        checked >= 10,
        "expected the rig's listeners (found {checked}):\n{text}"
    );
}
