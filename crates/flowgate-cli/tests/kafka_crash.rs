//! Kafka crash safety: `flowgate run` is SIGKILLed between fetch and commit at least 10 times
//! and restarted each time.
//!
//! - Consuming a topic (static group membership, JSON-lines sink, embedded store, dedup):
//!   afterwards every record is in the sink, duplicates stay within the documented window,
//!   and Kafka's own consumer-groups tool shows lag 0.
//! - Bridging a topic into another with the transactional sink: a read_committed reader of
//!   the output sees every input record exactly once.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used)]

mod cli;
mod http;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowgate_runtime::adapters::JsonLinesSink;

const PARTITIONS: u64 = 4;
const PER_PARTITION: u64 = 4_000;
const KILLS: usize = 10;

use flowgate_rig_tests::endpoint as env;

const BIN: &str = env!("CARGO_BIN_EXE_flowgate");

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Runs `flowgate run` on `config` (TOML text written into `dir` as `name.toml`), with
/// `extra` arguments, to its end; fails unless it succeeds. Returns its standard output.
fn run_to_end(dir: &Path, name: &str, config: &str, extra: &[&str]) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .args(extra)
        .env("FLOWGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fills `topic` with the CLI itself (generator → Kafka sink): `PARTITIONS × PER_PARTITION`
/// records with distinct payloads.
fn produce(dir: &Path, bootstrap: &str, topic: &str) -> u64 {
    run_to_end(
        dir,
        "produce",
        &format!(
            "name = \"crash-produce\"\n[source]\ntype = \"generator\"\npartitions = {PARTITIONS}\nrecords_per_partition = {PER_PARTITION}\n\
             [sink]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\"\n[store]\ntype = \"none\"\n"
        ),
        &[],
    );
    PARTITIONS * PER_PARTITION
}

/// Starts `flowgate run` on `config` `kills` times and SIGKILLs it each time after a random
/// moment of `window` (milliseconds), checking that it was still working.
fn kill_loop(config: &Path, seed: u64, kills: usize, window: std::ops::Range<u64>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    for _ in 0..kills {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "kill loop took too long"
        );
        let log = config.with_extension("log");
        let mut child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(config)
            .env("FLOWGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(window.clone())));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the pipeline exited on its own: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The count after `in ` in a run's summary line.
fn records_in(summary: &str) -> u64 {
    summary
        .split("in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no input count in the summary: {summary}"))
}

/// With static membership a restarted member gets its partitions back at once, so the
/// kills come every 0.8–1.6 s.
#[test]
fn sigkill_loop_against_kafka_loses_nothing() {
    crash_loop(true);
}

/// Without it, each restart waits for the killed member's session (6 s here) to time out, so
/// fewer kills, further apart.
#[test]
fn sigkill_loop_without_static_membership_loses_nothing() {
    crash_loop(false);
}

fn crash_loop(static_membership: bool) {
    let bootstrap = env("FLOWGATE_TEST_KAFKA_BOOTSTRAP");
    let classpath = env("FLOWGATE_TEST_KAFKA_CLASSPATH");
    let dir = tempfile::tempdir().unwrap();
    let nanos = nanos();
    let topic = format!("crash-{nanos}");
    let group = format!("crash-group-{nanos}");
    let total = produce(dir.path(), &bootstrap, &topic);

    let jsonl = dir.path().join("out.jsonl");
    let consume = dir.path().join("consume.toml");
    let membership = if static_membership {
        "group_instance_id = \"crash-member\"\nsession_timeout = \"10s\"\n"
    } else {
        "session_timeout = \"6s\"\n"
    };
    let consume_cfg = format!(
        "name = \"{group}\"\n\
             [source]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"{topic}\"]\n\
             {membership}\
             [sink]\ntype = \"jsonl\"\npath = \"{}\"\nfaults = {{ capacity_per_sec = 1000 }}\n\
             [store]\ntype = \"embedded\"\npath = \"{}\"\n\
             [dedup]\nkey = \"source_position\"\n\
             [runtime]\nmax_in_flight_per_partition = 500\n[runtime.batch]\nmax_records = 100\n[runtime.commit]\nevery_records = 200\nevery = \"100ms\"\n",
        jsonl.display(),
        dir.path().join("data").display()
    );
    std::fs::write(&consume, &consume_cfg).unwrap();
    let (kills, window) = if static_membership {
        (KILLS, 800..1600)
    } else {
        (4, 7_500..9_500)
    };
    kill_loop(&consume, 11, kills, window);
    let written_before_final = JsonLinesSink::read(&jsonl).map(|r| r.len()).unwrap_or(0);
    assert!(
        written_before_final > 0 && (written_before_final as u64) < total,
        "the kills must interrupt real work ({written_before_final} of {total})"
    );
    // Final run: long enough to catch up, then a clean drain.
    let last = run_to_end(dir.path(), "consume", &consume_cfg, &["--duration", "25s"]);

    // Kafka's own tool: everything committed, lag 0; the log-end offsets say what exists
    // (records spread over partitions by key, not evenly).
    let rows = describe(&classpath, &bootstrap, &group, &topic);
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    for row in &rows {
        assert_eq!(
            row.current,
            Some(row.end),
            "committed = log end, lag 0: {row:?}"
        );
        ends.insert(format!("{topic}/{}", row.partition), row.end);
    }
    assert_eq!(ends.len() as u64, PARTITIONS, "{rows:?}");
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
        last
    );
    assert_eq!(seen.len() as u64, total);
    let duplicates = records.len() - seen.len();
    eprintln!(
        "kafka/crash: static membership {static_membership}, {kills} SIGKILLs, {total} records, {duplicates} duplicates (window bound {})",
        kills * 4 * 100
    );
    assert!(
        duplicates <= kills * 4 * 100,
        "duplicates beyond the documented window"
    );
}

/// One row of `kafka-consumer-groups --describe`.
#[derive(Debug)]
struct GroupRow {
    partition: u32,
    /// CURRENT-OFFSET; `None` for `-` (nothing committed).
    current: Option<u64>,
    /// LOG-END-OFFSET.
    end: u64,
}

/// The group's committed offsets and log ends of `topic`, as Kafka's own consumer-groups
/// tool shows them.
fn describe(classpath: &str, bootstrap: &str, group: &str, topic: &str) -> Vec<GroupRow> {
    let tool = Command::new("java")
        .args([
            "-cp",
            classpath,
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        ])
        .args([
            "--bootstrap-server",
            bootstrap,
            "--describe",
            "--group",
            group,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tool.stdout);
    let mut rows: Vec<GroupRow> = text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(topic))
        .map(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            GroupRow {
                partition: cols[2].parse().unwrap(),
                current: cols[3].parse().ok(),
                end: cols[4].parse().unwrap(),
            }
        })
        .collect();
    rows.sort_by_key(|r| r.partition);
    rows
}

/// The checkpoint store is ahead of the group's committed offsets (here: the offsets were
/// reset to the beginning by Kafka's own tool, as a crash between the checkpoint write and
/// the broker commit leaves them). A run that has nothing new to read still brings the
/// broker's offsets to the checkpoints at once, so `kafka-consumer-groups`, Burrow, lag
/// exporters and KEDA see the true lag (0) — checked while the run is alive and after a
/// SIGKILL, without a clean shutdown's final commit.
#[test]
fn broker_offsets_follow_the_checkpoints_when_nothing_new_is_read() {
    let bootstrap = env("FLOWGATE_TEST_KAFKA_BOOTSTRAP");
    let classpath = env("FLOWGATE_TEST_KAFKA_CLASSPATH");
    let dir = tempfile::tempdir().unwrap();
    let nanos = nanos();
    let topic = format!("converge-{nanos}");
    let group = format!("converge-group-{nanos}");
    let total = produce(dir.path(), &bootstrap, &topic);
    let jsonl = dir.path().join("out.jsonl");
    let cfg = format!(
        "name = \"{group}\"\n\
         [source]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"{topic}\"]\n\
         [sink]\ntype = \"jsonl\"\npath = \"{}\"\n\
         [store]\ntype = \"embedded\"\npath = \"{}\"\n",
        jsonl.display(),
        dir.path().join("data").display()
    );
    run_to_end(dir.path(), "first", &cfg, &["--duration", "8s"]);
    assert_eq!(JsonLinesSink::read(&jsonl).unwrap().len() as u64, total);

    let reset = Command::new("java")
        .args([
            "-cp",
            &classpath,
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        ])
        .args([
            "--bootstrap-server",
            &bootstrap,
            "--reset-offsets",
            "--to-earliest",
        ])
        .args(["--execute", "--group", &group, "--topic", &topic])
        .output()
        .unwrap();
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let behind = describe(&classpath, &bootstrap, &group, &topic);
    assert!(
        behind.iter().all(|r| r.current == Some(0)) && behind.len() as u64 == PARTITIONS,
        "the reset put the group back: {behind:?}"
    );

    let path = dir.path().join("second.toml");
    std::fs::write(&path, &cfg).unwrap();
    let log = dir.path().join("second.log");
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .env("FLOWGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let converged = loop {
        let rows = describe(&classpath, &bootstrap, &group, &topic);
        if rows.len() as u64 == PARTITIONS && rows.iter().all(|r| r.current == Some(r.end)) {
            break Some(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(30) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = describe(&classpath, &bootstrap, &group, &topic);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let converged = converged.unwrap_or_else(|| {
        panic!("the broker's offsets never reached the checkpoints: {after_kill:?}\n{log_text}")
    });
    eprintln!(
        "kafka/converge: the group's offsets reached the checkpoints {converged:?} after the start"
    );
    for row in &after_kill {
        assert_eq!(
            row.current,
            Some(row.end),
            "lag 0 after the SIGKILL: {row:?}"
        );
    }
    assert_eq!(
        JsonLinesSink::read(&jsonl).unwrap().len() as u64,
        total,
        "nothing was read again: the checkpoints decided where to start"
    );
}

/// Kafka→Kafka through the transactional sink, SIGKILLed `KILLS` times mid-stream: each
/// restart's producer fences its predecessor and aborts the transaction it left open, and the
/// consumed offsets commit inside the transactions, so a read_committed reader of the output
/// sees every input record exactly once.
#[test]
fn sigkill_loop_through_the_transactional_bridge_is_exactly_once() {
    let bootstrap = env("FLOWGATE_TEST_KAFKA_BOOTSTRAP");
    let dir = tempfile::tempdir().unwrap();
    let nanos = nanos();
    let (input, output) = (format!("bridge-in-{nanos}"), format!("bridge-out-{nanos}"));
    let total = PARTITIONS * PER_PARTITION;
    produce_distinct(&bootstrap, &input, total);
    // Small batches: one transaction each, so the bridge is still working when killed.
    let bridge = format!(
        "name = \"bridge-{nanos}\"\n\
         [source]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"{input}\"]\n\
         group_instance_id = \"bridge-member\"\nsession_timeout = \"10s\"\n\
         [sink]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{output}\"\n\
         transactional_id = \"bridge-{nanos}\"\ntransaction_timeout = \"10s\"\n\
         [store]\ntype = \"none\"\n\
         [runtime]\nmax_in_flight_per_partition = 200\n[runtime.batch]\nmax_records = 20\n"
    );
    let bridge_path = dir.path().join("bridge.toml");
    std::fs::write(&bridge_path, &bridge).unwrap();
    kill_loop(&bridge_path, 17, KILLS, 800..1600);
    let last = run_to_end(dir.path(), "bridge", &bridge, &["--duration", "30s"]);
    let finished = records_in(&last);
    assert!(
        finished > 0 && finished < total,
        "the kills must interrupt real work (the final run read {finished} of {total}): {last}"
    );

    let (committed, seen) = read_output(&bootstrap, &output, "read_committed");
    let (uncommitted, _) = read_output(&bootstrap, &output, "read_uncommitted");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "kafka/bridge-crash: {KILLS} SIGKILLs, {total} records, the final run read {finished}; \
         read_committed: {committed} records, {} distinct, {duplicates} duplicates; \
         read_uncommitted: {uncommitted} (aborted writes included)",
        seen.len()
    );
    assert_eq!(seen.len() as u64, total, "every input record in the output");
    assert_eq!(duplicates, 0, "exactly once");
}

/// Writes `total` records with distinct payloads (`r0`, `r1`, …) to `topic`.
fn produce_distinct(bootstrap: &str, topic: &str, total: u64) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for i in 0..total {
        let payload = format!("r{i}");
        let key = format!("k{}", i % 64);
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Reads `topic` to its end at `isolation`: how many records, and how often each payload.
fn read_output(bootstrap: &str, topic: &str, isolation: &str) -> (usize, BTreeMap<String, usize>) {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bridge-read-{}", nanos()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = 0;
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(5) {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            *seen.entry(payload).or_default() += 1;
            count += 1;
            idle = Instant::now();
        }
    }
    (count, seen)
}

/// Seconds from the start of `flowgate run` on `config` until its first assignment (the
/// "partitions assigned" log line), at most `limit`; the run is SIGKILLed then.
fn time_to_assignment(config: &Path, limit: Duration) -> Option<Duration> {
    use std::io::{BufRead, BufReader};
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(config)
        .env("FLOWGATE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("partitions assigned") {
                let _ = tx.send(());
            }
        }
    });
    let got = rx.recv_timeout(limit).ok().map(|()| started.elapsed());
    child.kill().unwrap();
    child.wait().unwrap();
    got
}

/// A member SIGKILLed (without static membership) leaves the group only when its session
/// times out; with flowgate's defaults (10 s session, 60 s rebalance timeout) a restarted
/// member gets its partitions within about that long, after one kill and after several in a
/// row (librdkafka's own defaults, 45 s and 300 s, made it wait 44 s after one kill and 68 s
/// after eight). With static membership the restart takes its partitions back at once.
#[test]
fn a_restarted_member_gets_its_partitions_within_the_session_timeout() {
    let bootstrap = env("FLOWGATE_TEST_KAFKA_BOOTSTRAP");
    let dir = tempfile::tempdir().unwrap();
    let nanos = nanos();
    let topic = format!("restart-{nanos}");
    produce(dir.path(), &bootstrap, &topic);
    for (name, extra, bound) in [
        ("dynamic", "", Duration::from_secs(20)),
        (
            "static",
            "group_instance_id = \"restart-member\"\n",
            Duration::from_secs(5),
        ),
    ] {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "name = \"restart-{name}-{nanos}\"\n\
                 [source]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"{topic}\"]\n{extra}\
                 [sink]\ntype = \"null\"\nfaults = {{ capacity_per_sec = 500 }}\n\
                 [store]\ntype = \"embedded\"\npath = \"{}\"\n",
                dir.path().join(format!("data-{name}")).display()
            ),
        )
        .unwrap();
        // A first member, killed once it holds its partitions; then three more in a row.
        for kill in 0..4 {
            let took = time_to_assignment(&config, Duration::from_secs(60));
            assert!(
                took.is_some(),
                "{name}: run {kill} got no partitions in 60 s"
            );
        }
        let last = time_to_assignment(&config, Duration::from_secs(60));
        eprintln!(
            "kafka/restart: {name} membership, after 4 kills in a row: partitions after {last:?}"
        );
        let last = last.unwrap_or_else(|| panic!("{name}: no partitions in 60 s after 4 kills"));
        assert!(
            last < bound,
            "{name}: waited {last:?} for its partitions (bound {bound:?})"
        );
    }
}

/// From outside a pipeline: `flowgate validate` reaches everything (and exits 3 on an
/// unreachable broker), `flowgate lag` reads the checkpoints and the broker without joining
/// the group and agrees with `kafka-consumer-groups --describe`, names the owners while the
/// pipeline runs, and `flowgate checkpoints reset` is refused meanwhile; after the stop, a
/// reset `--to latest` is what the next run starts from and commits to the broker.
#[test]
fn lag_validate_and_reset_from_outside_agree_with_kafkas_tools() {
    let bootstrap = env("FLOWGATE_TEST_KAFKA_BOOTSTRAP");
    let classpath = env("FLOWGATE_TEST_KAFKA_CLASSPATH");
    let pg_url = env("FLOWGATE_TEST_POSTGRES_URL");
    let dir = tempfile::tempdir().unwrap();
    let nanos = nanos();
    let topic = format!("outside-{nanos}");
    let group = format!("outside-group-{nanos}");
    let total = produce(dir.path(), &bootstrap, &topic);
    let cfg = |bootstrap: &str| {
        format!(
            "name = \"{group}\"\n\
             [source]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"{topic}\"]\n\
             [sink]\ntype = \"jsonl\"\npath = \"{}\"\nfaults = {{ capacity_per_sec = 1500 }}\n\
             [store]\ntype = \"postgres\"\nurl = \"{pg_url}\"\nschema = \"outside_{nanos}\"\n",
            dir.path().join("out.jsonl").display(),
        )
    };
    let path = dir.path().join("outside.toml");
    std::fs::write(&path, cfg(&bootstrap)).unwrap();
    let (code, report) = cli::validate(&path);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report.matches('✓').count(),
        4,
        "file, store, source, sink: {report}"
    );
    let unreachable = dir.path().join("unreachable.toml");
    std::fs::write(&unreachable, cfg("127.0.0.1:1")).unwrap();
    let (code, report) = cli::validate(&unreachable);
    assert_eq!(code, 3, "an unreachable broker exits 3: {report}");
    assert!(
        report.contains("✗ source") && report.contains("127.0.0.1:1"),
        "{report}"
    );

    let before = cli::lag(&path);
    assert_eq!(before.len() as u64, PARTITIONS, "{before:?}");
    let waiting: u64 = before
        .values()
        .map(|p| p["lag_records"].as_u64().unwrap())
        .sum();
    assert_eq!(waiting, total, "{before:?}");
    assert!(
        before
            .values()
            .all(|p| p["owner"].is_null() && p["checkpoint"].is_null())
    );
    assert!(
        before
            .values()
            .all(|p| p["lag_seconds"].as_f64().unwrap() > 0.0),
        "every partition holds records, seconds old: {before:?}"
    );

    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .env("FLOWGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let during = loop {
        let now = cli::lag(&path);
        if now
            .values()
            .all(|p| !p["owner"].is_null() && !p["checkpoint"].is_null())
        {
            break now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "owners and checkpoints never showed: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let left: u64 = during
        .values()
        .map(|p| p["lag_records"].as_u64().unwrap())
        .sum();
    assert!(left > 0 && left < total, "read part way: {during:?}");
    let refused = cli::flowgate(&[
        "checkpoints",
        "reset",
        "-c",
        path.to_str().unwrap(),
        "--yes",
    ]);
    assert_eq!(refused.status.code(), Some(2));
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(text.contains("a running pipeline holds"), "{text}");

    // A clean stop leaves the group: nobody owns the partitions, the broker's offsets equal
    // the checkpoints, and the lag is Kafka's own.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(child.wait().unwrap().success());
    let after = cli::lag(&path);
    let kafka = describe(&classpath, &bootstrap, &group, &topic);
    assert_eq!(kafka.len() as u64, PARTITIONS);
    for row in &kafka {
        let ours = &after[&format!("{topic}/{}", row.partition)];
        let current = row.current.unwrap();
        assert_eq!(
            ours["lag_records"].as_u64(),
            Some(row.end - current),
            "{ours} vs {row:?}"
        );
        assert_eq!(ours["checkpoint"], ours["broker_committed"], "{ours}");
        assert_eq!(
            ours["broker_committed"],
            (current - 1).to_string().as_str(),
            "{ours}"
        );
        assert!(ours["owner"].is_null(), "{ours}");
    }

    // Partition 0 skips to its end; the next run starts there and tells the broker.
    let p0 = format!("{topic}/0");
    let reset = cli::flowgate(&[
        "checkpoints",
        "reset",
        "-c",
        path.to_str().unwrap(),
        "--partition",
        &p0,
        "--to",
        "latest",
        "--yes",
    ]);
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let skipped = cli::lag(&path);
    assert_eq!(skipped[&p0]["lag_records"].as_u64(), Some(0), "{skipped:?}");
    assert_eq!(
        skipped[&p0]["checkpoint"], skipped[&p0]["end"],
        "{skipped:?}"
    );
    run_to_end(
        dir.path(),
        "after-reset",
        &cfg(&bootstrap),
        &["--duration", "3s"],
    );
    let row0 = describe(&classpath, &bootstrap, &group, &topic)
        .into_iter()
        .find(|r| r.partition == 0)
        .unwrap();
    assert_eq!(
        row0.current,
        Some(row0.end),
        "the broker follows the reset: {row0:?}"
    );
}

/// Kafka → HTTP (one request per record, the idempotency key in `Idempotency-Key`),
/// SIGKILLed 10 times: every record reaches the endpoint at least once, a record seen twice
/// comes with the same key both times (so the endpoint can tell), and Kafka's own tool shows
/// lag 0 at the end.
#[test]
fn sigkill_loop_into_an_http_endpoint_repeats_only_with_the_same_idempotency_key() {
    let bootstrap = env("FLOWGATE_TEST_KAFKA_BOOTSTRAP");
    let classpath = env("FLOWGATE_TEST_KAFKA_CLASSPATH");
    let dir = tempfile::tempdir().unwrap();
    let nanos = nanos();
    let topic = format!("http-crash-{nanos}");
    let group = format!("http-crash-group-{nanos}");
    let total = produce(dir.path(), &bootstrap, &topic);
    let endpoint = http::Recorder::start(Duration::from_millis(4), 200);
    let cfg = format!(
        "name = \"{group}\"\n\
         [source]\ntype = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"{topic}\"]\n\
         group_instance_id = \"http-crash-member\"\n\
         [sink]\ntype = \"http\"\nurl = \"http://{}/records/{{partition}}/{{position}}\"\nencoding = \"single\"\n\
         [store]\ntype = \"embedded\"\npath = \"{}\"\n\
         [dedup]\nkey = \"source_position\"\n\
         [runtime.commit]\nevery_records = 200\nevery = \"100ms\"\n",
        endpoint.addr,
        dir.path().join("data").display()
    );
    let path = dir.path().join("http.toml");
    std::fs::write(&path, &cfg).unwrap();
    kill_loop(&path, 23, KILLS, 800..1600);
    let before_final = endpoint.seen().len() as u64;
    assert!(
        before_final > 0 && before_final < total,
        "the kills must interrupt real work ({before_final} of {total})"
    );
    run_to_end(dir.path(), "http-final", &cfg, &["--duration", "30s"]);

    let rows = describe(&classpath, &bootstrap, &group, &topic);
    assert_eq!(rows.len() as u64, PARTITIONS, "{rows:?}");
    for row in &rows {
        assert_eq!(row.current, Some(row.end), "committed = log end: {row:?}");
    }
    let seen = endpoint.seen();
    let mut times: BTreeMap<String, usize> = BTreeMap::new();
    for (path, key, _) in &seen {
        // /records/TOPIC%2FPARTITION/OFFSET, and the key names the same record.
        let rest = path.strip_prefix("/records/").unwrap();
        let (partition, offset) = rest.rsplit_once('/').unwrap();
        let record = format!("{}@{offset}", partition.replace("%2F", "/"));
        assert_eq!(key, &record, "the key names the record the request carries");
        *times.entry(record).or_default() += 1;
    }
    for row in &rows {
        for offset in 0..row.end {
            let record = format!("{topic}/{}@{offset}", row.partition);
            assert!(
                times.contains_key(&record),
                "{record} never reached the endpoint"
            );
        }
    }
    assert_eq!(times.len() as u64, total);
    let repeated = seen.len() - times.len();
    eprintln!(
        "kafka → http: {KILLS} SIGKILLs, {total} records, {} requests, {repeated} repeats, each with its record's key",
        seen.len()
    );
}
