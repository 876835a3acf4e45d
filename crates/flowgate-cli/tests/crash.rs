//! Crash safety: a pipeline in a child process is SIGKILLed at random moments, many times,
//! and restarted each time. Afterwards every generated record must be in the sink; with dedup
//! the duplicates may come only from the documented window (records confirmed by the sink but
//! not yet marked when the process died); with the transactional table sink there must be
//! exactly one copy of each record.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowgate_checkpoint::EmbeddedStore;
use flowgate_runtime::adapters::JsonLinesSink;

const PARTITIONS: u64 = 4;
const PER_PARTITION: u64 = 25_000;
const KILLS: usize = 20;
const MAX_BATCH: u64 = 100;
const MAX_CONCURRENCY: u64 = 8;

fn config(dir: &Path, sink: &str) -> String {
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
type = "embedded"
path = "{data}"

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
        data = dir.join("data").display(),
    )
}

/// Runs the pipeline, killing it `KILLS` times while it is still working, then lets it finish.
fn kill_loop(dir: &Path, sink: &str, seed: u64) -> usize {
    let cfg = dir.join("pipeline.toml");
    std::fs::write(&cfg, config(dir, sink)).unwrap();
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

fn count(records: impl Iterator<Item = (String, u64)>) -> (BTreeMap<(String, u64), usize>, usize) {
    let mut m: BTreeMap<(String, u64), usize> = BTreeMap::new();
    let mut total = 0;
    for k in records {
        *m.entry(k).or_default() += 1;
        total += 1;
    }
    (m, total)
}

fn assert_complete(m: &BTreeMap<(String, u64), usize>) {
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

#[test]
fn sigkill_loop_with_dedup_loses_nothing_and_duplicates_stay_in_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let kills = kill_loop(
        dir.path(),
        &format!("type = \"jsonl\"\npath = \"{}\"", out.display()),
        42,
    );
    let records = JsonLinesSink::read(&out).unwrap();
    let (m, total) = count(
        records
            .iter()
            .map(|r| (r.partition.to_string(), r.position.as_u64().unwrap())),
    );
    assert_complete(&m);
    let duplicates = total - m.len();
    // The window: per kill, at most the batches confirmed by the sink and not yet marked, i.e.
    // concurrency × batch size (plus a torn line at the kill).
    let bound = kills as u64 * (MAX_CONCURRENCY * MAX_BATCH + 1);
    eprintln!(
        "crash/jsonl+dedup: {kills} SIGKILLs, {} records, {duplicates} duplicates ({:.3}%), window bound {bound}",
        m.len(),
        duplicates as f64 * 100.0 / m.len() as f64
    );
    assert!(
        (duplicates as u64) <= bound,
        "{duplicates} duplicates exceed the documented window ({bound})"
    );
}

#[test]
fn sigkill_loop_with_the_transactional_sink_is_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let kills = kill_loop(dir.path(), "type = \"table\"\ntable = \"events\"", 7);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        let store = EmbeddedStore::open_dir(dir.path().join("data"))
            .await
            .unwrap();
        store.table_sink("events").rows().await.unwrap()
    });
    let (m, total) = count(
        rows.iter()
            .map(|r| (r.partition.to_string(), r.position.as_u64().unwrap())),
    );
    assert_complete(&m);
    eprintln!(
        "crash/table (transactional): {kills} SIGKILLs, {} records, {} duplicates",
        m.len(),
        total - m.len()
    );
    assert_eq!(total, m.len(), "exactly one row per record");
}
