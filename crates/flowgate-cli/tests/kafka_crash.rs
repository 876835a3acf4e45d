//! Kafka crash safety: `flowgate run` consuming a topic (static group membership, JSON-lines
//! sink, embedded store, dedup) is SIGKILLed between fetch and commit at least 10 times and
//! restarted each time. Afterwards every record is in the sink, duplicates stay within the
//! documented window, and Kafka's own consumer-groups tool shows lag 0.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowgate_runtime::adapters::JsonLinesSink;

const PARTITIONS: u64 = 4;
const PER_PARTITION: u64 = 4_000;
const KILLS: usize = 10;

use flowgate_rig_tests::endpoint as env;

#[test]
fn sigkill_loop_against_kafka_loses_nothing() {
    let bootstrap = env("FLOWGATE_TEST_KAFKA_BOOTSTRAP");
    let classpath = env("FLOWGATE_TEST_KAFKA_CLASSPATH");
    let bin = env!("CARGO_BIN_EXE_flowgate");
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("crash-{nanos}");
    let group = format!("crash-group-{nanos}");

    // Fill the topic with the CLI itself: generator → Kafka sink.
    let produce = dir.path().join("produce.toml");
    std::fs::write(
        &produce,
        format!(
            "name = \"crash-produce\"\n[source]\ntype = \"generator\"\npartitions = {PARTITIONS}\nrecords_per_partition = {PER_PARTITION}\n\
             [sink]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\"\n[store]\ntype = \"none\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(bin)
        .args(["run", "-c"])
        .arg(&produce)
        .env("FLOWGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "producing failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = PARTITIONS * PER_PARTITION;

    let jsonl = dir.path().join("out.jsonl");
    let consume = dir.path().join("consume.toml");
    std::fs::write(
        &consume,
        format!(
            "name = \"{group}\"\n\
             [source]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"{topic}\"]\n\
             group_instance_id = \"crash-member\"\nsession_timeout = \"10s\"\n\
             [sink]\ntype = \"jsonl\"\npath = \"{}\"\nfaults = {{ capacity_per_sec = 1000 }}\n\
             [store]\ntype = \"embedded\"\npath = \"{}\"\n\
             [dedup]\nkey = \"source_position\"\n\
             [runtime]\nmax_in_flight_per_partition = 500\n[runtime.batch]\nmax_records = 100\n[runtime.commit]\nevery_records = 200\nevery = \"100ms\"\n",
            jsonl.display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    let started = Instant::now();
    for _ in 0..KILLS {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "kill loop took too long"
        );
        let mut child = Command::new(bin)
            .args(["run", "-c"])
            .arg(&consume)
            .env("FLOWGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(800..1600)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the consumer exited on its own"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let written_before_final = JsonLinesSink::read(&jsonl).map(|r| r.len()).unwrap_or(0);
    assert!(
        written_before_final > 0 && (written_before_final as u64) < total,
        "the kills must interrupt real work ({written_before_final} of {total})"
    );
    // Final run: long enough to catch up, then a clean drain.
    let out = Command::new(bin)
        .args(["run", "-c"])
        .arg(&consume)
        .args(["--duration", "25s"])
        .env("FLOWGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "final run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Kafka's own tool: everything committed, lag 0; the log-end offsets say what exists
    // (records spread over partitions by key, not evenly).
    let tool = Command::new("java")
        .args([
            "-cp",
            &classpath,
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        ])
        .args([
            "--bootstrap-server",
            &bootstrap,
            "--describe",
            "--group",
            &group,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tool.stdout);
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    for row in text.lines().filter(|l| l.contains(&topic)) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[5], "0", "lag must be 0: {row}");
        assert_eq!(cols[3], cols[4], "committed = log end: {row}");
        ends.insert(format!("{topic}/{}", cols[2]), cols[4].parse().unwrap());
    }
    assert_eq!(ends.len() as u64, PARTITIONS, "{text}");
    assert_eq!(
        ends.values().sum::<u64>(),
        total,
        "the topic holds every produced record"
    );

    let records = JsonLinesSink::read(&jsonl).unwrap();
    let mut seen: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for r in &records {
        *seen
            .entry((r.partition.to_string(), r.position.as_u64().unwrap()))
            .or_default() += 1;
    }
    let missing: Vec<(&String, usize)> = ends
        .iter()
        .map(|(p, end)| {
            (
                p,
                (0..*end)
                    .filter(|o| !seen.contains_key(&(p.clone(), *o)))
                    .count(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(
        missing.is_empty(),
        "records lost: {missing:?}; final run: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(seen.len() as u64, total);
    let duplicates = records.len() - seen.len();
    eprintln!(
        "kafka/crash: {KILLS} SIGKILLs, {total} records, {duplicates} duplicates (window bound {})",
        KILLS * 4 * 100
    );
    assert!(
        duplicates <= KILLS * 4 * 100,
        "duplicates beyond the documented window"
    );
}
