//! The SIGKILL loop shared by the crash tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const PARTITIONS: u64 = 4;
pub(crate) const PER_PARTITION: u64 = 25_000;
pub(crate) const KILLS: usize = 20;
pub(crate) const MAX_BATCH: u64 = 100;
pub(crate) const MAX_CONCURRENCY: u64 = 8;

/// The pipeline: a generator (4 × 25,000 records) into `sink`, checkpoints and dedup marks
/// in `store` (TOML of the `[store]` table's keys).
pub(crate) fn config(sink: &str, store: &str) -> String {
    format!(
        r#"
name = "crash"

[source]
type = "generator"
partitions = {PARTITIONS}
records_per_partition = {PER_PARTITION}
rate = 12000

[sink]
{sink}

[store]
{store}

[dedup]
key = "source_position"

[runtime]
max_in_flight_per_partition = 2000
[runtime.batch]
max_records = {MAX_BATCH}
[runtime.concurrency]
initial = 4
max = {MAX_CONCURRENCY}
[runtime.commit]
every_records = 500
every = "50ms"
"#,
    )
}

/// Runs the pipeline, killing it `KILLS` times while it is still working, then lets it finish.
pub(crate) fn kill_loop(dir: &Path, sink: &str, store: &str, seed: u64) -> usize {
    let cfg = dir.join("pipeline.toml");
    std::fs::write(&cfg, config(sink, store)).unwrap();
    let bin = env!("CARGO_BIN_EXE_flowgate");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    let mut runs = 0;
    let started = Instant::now();
    while kills < KILLS {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "kill loop took too long"
        );
        runs += 1;
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("FLOWGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(80..450)));
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            assert!(status.success(), "run {runs} failed: {log}");
            // It finished on its own: all records done; the loop cannot kill any more.
            break;
        }
        // SIGKILL: no drain, no final checkpoint.
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    assert!(
        kills >= KILLS,
        "only {kills} kills in {runs} runs: the pipeline finished too early for the test to mean anything"
    );
    // Final run to completion.
    let out = Command::new(bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("FLOWGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "final run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    kills
}

pub(crate) fn count(
    records: impl Iterator<Item = (String, u64)>,
) -> (BTreeMap<(String, u64), usize>, usize) {
    let mut m: BTreeMap<(String, u64), usize> = BTreeMap::new();
    let mut total = 0;
    for k in records {
        *m.entry(k).or_default() += 1;
        total += 1;
    }
    (m, total)
}

pub(crate) fn assert_complete(m: &BTreeMap<(String, u64), usize>) {
    for p in 0..PARTITIONS {
        for i in 0..PER_PARTITION {
            assert!(
                m.contains_key(&(format!("gen-{p}"), i)),
                "record gen-{p}@{i} was lost"
            );
        }
    }
    assert_eq!(
        m.len() as u64,
        PARTITIONS * PER_PARTITION,
        "no unexpected records"
    );
}
