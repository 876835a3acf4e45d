//! `cargo xtask kafka-versions [--versions=A,B] [--cycles=N]`: the Kafka adapter against
//! several Apache Kafka releases, one after another.
//!
//! For each release the rig's broker is started at that version (`$FLOWGATE_RIG_KAFKA_VERSION`:
//! its own jars from Maven Central, its own log directory), then the Kafka adapter's
//! conformance and scenario suites run against it (`cargo test -p flowgate-kafka --features
//! broker-tests`, and the CLI's SIGKILL tests, which read the group with the release's own
//! `kafka-consumer-groups`), then a short chaos run (`chaos kafka --cycles=N`). Each step runs
//! as a child process, so every one of them sees the release under test. The broker is stopped
//! at the end; the next `brokers up` starts the default release again. The report goes to
//! `target/bench-report/kafka-versions.md`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::rig::{KAFKA_VERSION, Rig};

/// The oldest and the newest release the rig is checked against, beside [`KAFKA_VERSION`].
const DEFAULT_VERSIONS: &str = "3.9.1,4.4.0";

/// One release's results.
struct Row {
    version: String,
    /// `flowgate-kafka`'s broker tests: conformance, scenarios, security, compression.
    adapter: Outcome,
    /// The CLI's SIGKILL tests against Kafka (`kafka_crash`).
    cli: Outcome,
    chaos: Outcome,
}

/// A step's result: passed or not, its summary, how long it took.
struct Outcome {
    ok: bool,
    summary: String,
    secs: f64,
}

pub(crate) fn kafka_versions(args: &[&str]) -> Result<(), String> {
    let mut versions = DEFAULT_VERSIONS.to_string();
    let mut cycles = 4u32;
    for a in args {
        if let Some(v) = a.strip_prefix("--versions=") {
            versions = v.to_string();
        } else if let Some(v) = a.strip_prefix("--cycles=") {
            cycles = v
                .parse()
                .map_err(|_| format!("--cycles={v}: expected a whole number"))?;
        } else {
            return Err(format!(
                "kafka-versions: unknown argument {a:?} (--versions=3.9.1,4.4.0 --cycles=4)"
            ));
        }
    }
    let rig = Rig::new()?;
    let xtask = std::env::current_exe().map_err(|e| format!("cannot find xtask's binary: {e}"))?;
    let logs = rig.root().join("target/bench-report/kafka-versions");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let mut rows = Vec::new();
    for version in versions.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        eprintln!("\n==> Apache Kafka {version}");
        let row = one_version(&rig, &xtask, version, cycles, &logs);
        // Whatever happened, the next release starts on a stopped broker.
        let _ = step(&xtask, version, &["brokers", "down", "--only", "kafka"]).status();
        rows.push(row?);
    }
    let _ = Command::new(&xtask)
        .args(["brokers", "down", "--only", "postgres"])
        .status();
    let report = report(&rows, &versions, cycles);
    let path = rig.root().join("target/bench-report/kafka-versions.md");
    std::fs::write(&path, &report).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{report}\nreport: {}", path.display());
    match rows
        .iter()
        .find(|r| !(r.adapter.ok && r.cli.ok && r.chaos.ok))
    {
        Some(r) => Err(format!(
            "Apache Kafka {} failed: see {}",
            r.version,
            logs.display()
        )),
        None => Ok(()),
    }
}

/// xtask itself, with the rig's Kafka at `version`.
fn step(xtask: &Path, version: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(xtask);
    cmd.args(args).env("FLOWGATE_RIG_KAFKA_VERSION", version);
    cmd
}

fn one_version(
    rig: &Rig,
    xtask: &Path,
    version: &str,
    cycles: u32,
    logs: &Path,
) -> Result<Row, String> {
    crate::run(
        &format!("brokers down --only kafka (before {version})"),
        &mut step(xtask, version, &["brokers", "down", "--only", "kafka"]),
    )?;
    crate::run(
        &format!("brokers up --only kafka at {version}"),
        &mut step(
            xtask,
            version,
            &["brokers", "up", "--only", "kafka,postgres"],
        ),
    )?;
    let env = crate::output(&mut step(
        xtask,
        version,
        &["brokers", "env", "--only", "kafka,postgres"],
    ))?;
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let count_tests = |out: &str| {
        let (mut passed, mut failed) = (0u64, 0u64);
        for l in out.lines() {
            if let Some(r) = l.strip_prefix("test result: ") {
                passed += count_before(r, "passed");
                failed += count_before(r, "failed");
            }
        }
        format!("{passed} passed, {failed} failed")
    };
    let cargo_test = |package: &str, targets: &[&str]| {
        let mut cmd = crate::cargo();
        cmd.args([
            "test",
            "--no-fail-fast",
            "-p",
            package,
            "--features",
            "broker-tests",
        ]);
        for t in targets {
            cmd.args(["--test", t]);
        }
        cmd.args(["--", "--test-threads", "2"])
            .envs(env.iter().cloned())
            .env("FLOWGATE_RIG_KAFKA_VERSION", version)
            .current_dir(rig.root());
        cmd
    };
    let adapter = logged(
        &mut cargo_test("flowgate-kafka", &[]),
        &logs.join(format!("{version}-adapter.log")),
        count_tests,
    )?;
    let cli = logged(
        &mut cargo_test("flowgate-cli", &["kafka_crash"]),
        &logs.join(format!("{version}-cli.log")),
        count_tests,
    )?;
    let cycles_arg = format!("--cycles={cycles}");
    let chaos = logged(
        &mut step(xtask, version, &["chaos", "kafka", &cycles_arg]),
        &logs.join(format!("{version}-chaos.log")),
        |out| {
            let line = |key: &str| {
                out.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.rsplit('|').nth(1))
                    .map_or("?".into(), |v| v.trim().replace("**", ""))
            };
            format!(
                "{} lost of {} accepted, {} duplicates, committed = end: {}",
                line("| **lost**"),
                line("| records the broker accepted"),
                line("| duplicates"),
                line("| consumed to the end"),
            )
        },
    )?;
    Ok(Row {
        version: version.to_string(),
        adapter,
        cli,
        chaos,
    })
}

/// Runs `cmd` with its output in `log`; `summary` reads the output.
fn logged(
    cmd: &mut Command,
    log: &Path,
    summary: impl Fn(&str) -> String,
) -> Result<Outcome, String> {
    let started = Instant::now();
    eprintln!(
        "    {:?} > {}",
        cmd.get_args().collect::<Vec<_>>(),
        log.display()
    );
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(log, &text).map_err(|e| format!("{}: {e}", log.display()))?;
    let o = Outcome {
        ok: out.status.success(),
        summary: summary(&text),
        secs: started.elapsed().as_secs_f64(),
    };
    eprintln!(
        "    {} in {:.0} s: {}",
        if o.ok { "ok" } else { "FAILED" },
        o.secs,
        o.summary
    );
    Ok(o)
}

/// `12` from `"ok. 12 passed; 0 failed; …"` and `"passed"`.
fn count_before(text: &str, word: &str) -> u64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1].trim_end_matches([';', ',', '.']) == word)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

fn report(rows: &[Row], versions: &str, cycles: u32) -> String {
    let mut md = format!(
        "# Apache Kafka releases\n\n`cargo xtask kafka-versions --versions={versions} --cycles={cycles}` \
         (the rig's default release is {KAFKA_VERSION}): `cargo test -p flowgate-kafka --features \
         broker-tests`, `cargo test -p flowgate-cli --features broker-tests --test kafka_crash` \
         and `chaos kafka --cycles={cycles}` against each release.\n\n\
         | release | adapter tests | CLI SIGKILL tests | chaos |\n|---|---|---|---|\n"
    );
    let cell = |o: &Outcome| {
        format!(
            "{}: {} ({:.0} s)",
            if o.ok { "pass" } else { "**FAIL**" },
            o.summary,
            o.secs
        )
    };
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.version,
            cell(&r.adapter),
            cell(&r.cli),
            cell(&r.chaos)
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_cargo_test_summaries() {
        let r = "ok. 12 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.2s";
        assert_eq!(count_before(r, "passed"), 12);
        assert_eq!(count_before(r, "failed"), 1);
        assert_eq!(count_before("FAILED. 0 passed; 2 failed", "failed"), 2);
    }
}
