//! `cargo xtask bench patterns [spike|slow-sink|throttle|storm|all] [--scale=F] [--docs]`:
//! the failure patterns users meet, run against the release `flowgate` binary and drawn
//! over time from what it shows outside (its `/metrics` endpoint, scraped as a Prometheus
//! server would, and its RSS).
//!
//! - `spike`: a generator at 20,000 records/s with a 2× spike for 60 s into a sink that takes
//!   30,000/s, with `overflow = "block"` and with `"shed_oldest"`: lag, records written and
//!   records shed over time, and the time to recover after the spike.
//! - `slow-sink`: Kafka's producer-perf-test at 5,000 records/s for 3 minutes into a topic that
//!   flowgate reads into a sink taking 500/s: lag, RSS and rebalances over time.
//! - `throttle`: a generator at 20,000 records/s into a sink that answers "throttled" above
//!   10,000/s, with adaptive (AIMD) and with fixed concurrency: records written, throttles and
//!   concurrency over time.
//! - `storm`: a topic fed at 10,000 records/s, one member reading it throughout and a second
//!   joining and leaving every 5 s, with the classic protocol (cooperative-sticky) and with
//!   Kafka 4's consumer protocol (KIP-848): records/s over time and the pause per rebalance.
//!
//! Each writes `target/bench-report/<name>.svg` and `.csv`; `--docs` also copies the SVG to
//! `docs/img/`. `--scale=0.2` shortens every phase (a quick look, not a figure to publish).

mod plot;
mod probe;
mod scenarios;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::rig::Rig;
use plot::Panel;

/// What every scenario shares: the rig, the binary, where figures go.
struct Bench {
    rig: Rig,
    bin: PathBuf,
    report: PathBuf,
    docs: bool,
    scale: f64,
}

impl Bench {
    /// `secs` of the full-length scenario, scaled.
    fn secs(&self, secs: f64) -> Duration {
        Duration::from_secs_f64(secs * self.scale)
    }

    /// Starts `flowgate run` on `config` (written to the report directory as `name.toml`) with
    /// its metrics on `port`, and waits until the endpoint answers.
    fn start(&self, name: &str, config: &str, port: u16) -> Result<Child, String> {
        let path = self.report.join(format!("{name}.toml"));
        fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
        let log =
            fs::File::create(self.report.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.bin)
            .args(["run", "-c"])
            .arg(&path)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("FLOWGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while probe::scrape(port).is_none() {
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                return Err(format!(
                    "flowgate ({name}) did not serve /metrics on port {port}: see {}",
                    self.report.join(format!("{name}.log")).display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child)
    }

    /// Writes the figure and its numbers; with `--docs`, copies the SVG to `docs/img/`.
    fn publish(&self, name: &str, title: &str, panels: &[Panel]) -> Result<(), String> {
        let svg = self.report.join(format!("{name}.svg"));
        plot::svg(&svg, title, panels)?;
        plot::csv(&self.report.join(format!("{name}.csv")), panels)?;
        eprintln!("    figure: {}", svg.display());
        if self.docs {
            let dir = self.rig.root().join("docs/img");
            fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            fs::copy(&svg, dir.join(format!("{name}.svg"))).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

pub(crate) fn patterns(args: &[&str]) -> Result<(), String> {
    let which = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .copied()
        .unwrap_or("all");
    let all = ["spike", "slow-sink", "throttle", "storm"];
    let chosen: Vec<&str> = match which {
        "all" => all.to_vec(),
        one if all.contains(&one) => vec![one],
        other => {
            return Err(format!(
                "bench patterns {other}: expected one of {all:?} or all"
            ));
        }
    };
    let rig = Rig::new()?;
    crate::run(
        "build flowgate (release)",
        crate::cargo().args([
            "build",
            "--release",
            "-p",
            "flowgate-cli",
            "--bin",
            "flowgate",
        ]),
    )?;
    let report = rig.root().join("target/bench-report");
    fs::create_dir_all(&report).map_err(|e| format!("{}: {e}", report.display()))?;
    let b = Bench {
        bin: rig.root().join("target/release/flowgate"),
        report,
        docs: args.contains(&"--docs"),
        scale: crate::flag(args, "--scale=", 1.0f64).clamp(0.05, 10.0),
        rig,
    };
    let mut summary = Vec::new();
    for name in chosen {
        eprintln!("\n==> pattern {name}");
        summary.extend(match name {
            "spike" => scenarios::spike(&b)?,
            "slow-sink" => scenarios::slow_sink(&b)?,
            "throttle" => scenarios::throttle(&b)?,
            _ => scenarios::storm(&b)?,
        });
    }
    println!("\n| pattern | setting | result |\n|---|---|---|");
    for row in &summary {
        println!("{row}");
    }
    Ok(())
}

/// `1234567.8` as `1,234,568`.
fn fmt_int(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
