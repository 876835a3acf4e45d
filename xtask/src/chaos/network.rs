//! Network faults between flowgate and the broker: flowgate reaches the broker only through a
//! toxiproxy proxy, whose toxics (latency, a bandwidth limit, connection resets) and whose
//! switch (a full cut) the chaos run drives through toxiproxy's HTTP API.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::rig::Rig;

/// toxiproxy's API port.
const API_PORT: u16 = 18_474;
const PROXY: &str = "broker";

/// The network faults a cycle can inject, each for a while, then lifted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Net {
    /// 500 ms (±100 ms) added to every answer of the broker, for 8 s.
    Latency,
    /// The broker's answers limited to 32 KiB/s, for 8 s.
    Bandwidth,
    /// No connection at all for 15 s: longer than the Kafka session timeout (10 s).
    Cut,
    /// Every connection reset by peer when it next carries data, for 2 s.
    Reset,
}

impl Net {
    pub(super) const ALL: [Net; 4] = [Net::Latency, Net::Bandwidth, Net::Cut, Net::Reset];

    pub(super) fn name(self) -> &'static str {
        match self {
            Net::Latency => "network: +500 ms latency 8 s",
            Net::Bandwidth => "network: 32 KiB/s for 8 s",
            Net::Cut => "network: cut for 15 s",
            Net::Reset => "network: connections reset",
        }
    }

    fn lasts(self) -> Duration {
        Duration::from_secs(match self {
            Net::Latency | Net::Bandwidth => 8,
            Net::Cut => 15,
            Net::Reset => 2,
        })
    }

    fn toxic(self) -> Option<&'static str> {
        match self {
            Net::Latency => Some(r#"{"type":"latency","attributes":{"latency":500,"jitter":100}}"#),
            Net::Bandwidth => Some(r#"{"type":"bandwidth","attributes":{"rate":32}}"#),
            Net::Reset => Some(r#"{"type":"reset_peer","attributes":{"timeout":0}}"#),
            Net::Cut => None,
        }
    }
}

/// A toxiproxy server with one proxy, `listen` → `upstream`, for the length of a run.
pub(super) struct Toxiproxy {
    server: Child,
}

impl Toxiproxy {
    pub(super) fn start(rig: &Rig, listen: u16, upstream: u16, log: &Path) -> Result<Self, String> {
        let bin = rig.toxiproxy_server()?;
        let server = Command::new(&bin)
            .args(["-host", "127.0.0.1", "-port", &API_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let proxy = Toxiproxy { server };
        let deadline = Instant::now() + Duration::from_secs(15);
        while api("GET", "/version", "").is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "toxiproxy did not answer on {API_PORT}: see {}",
                    log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        api(
            "POST",
            "/proxies",
            &format!(
                r#"{{"name":"{PROXY}","listen":"127.0.0.1:{listen}","upstream":"127.0.0.1:{upstream}","enabled":true}}"#
            ),
        )?;
        Ok(proxy)
    }

    /// Injects `fault`, keeps it for its length, and lifts it.
    pub(super) fn inject(&self, fault: Net) -> Result<(), String> {
        let path = format!("/proxies/{PROXY}");
        match fault.toxic() {
            Some(toxic) => {
                let named = toxic.replacen('{', r#"{"name":"fault","stream":"downstream","#, 1);
                api("POST", &format!("{path}/toxics"), &named)?;
                std::thread::sleep(fault.lasts());
                api("DELETE", &format!("{path}/toxics/fault"), "")?;
            }
            None => {
                api("POST", &path, r#"{"enabled":false}"#)?;
                std::thread::sleep(fault.lasts());
                api("POST", &path, r#"{"enabled":true}"#)?;
            }
        }
        Ok(())
    }
}

impl Drop for Toxiproxy {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// One call to toxiproxy's API; the answer's body, or what went wrong.
fn api(method: &str, path: &str, body: &str) -> Result<String, String> {
    let (status, answer) = crate::rig::http(
        method,
        API_PORT,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
    .map_err(|e| format!("toxiproxy: {e}"))?;
    if (200..300).contains(&status) {
        Ok(answer)
    } else {
        Err(format!("toxiproxy {method} {path}: HTTP {status} {answer}"))
    }
}
