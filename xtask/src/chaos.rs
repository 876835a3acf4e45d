//! `cargo xtask chaos kafka [--cycles=N] [--minutes=M] [--rate=R] [--seed=S]`: faults at
//! volume against a real Kafka broker, with one ledger at the end.
//!
//! A producer (Kafka's own console producer) writes uniquely numbered records for the whole
//! run; `flowgate run` consumes them into a JSON-lines sink with checkpoints in the embedded
//! store (static group membership). Each cycle starts flowgate, lets it run 1–3 s, and ends
//! with a fault: SIGKILL of flowgate, or (every tenth cycle, and the last of a run of fewer
//! than ten) the broker stopped and restarted under the running pipeline, then SIGKILL. After the last cycle the producer stops, flowgate
//! runs once more to the end and stops on SIGTERM. The ledger: every record the topic holds
//! (read back with Kafka's console consumer) was received (lost = 0), duplicates counted, and
//! the group's committed offsets equal the end of every partition by Kafka's consumer-groups
//! tool. The report (one row per cycle: fault, time to resume, records received) goes to
//! `target/chaos/kafka-<time>/report.{md,json}`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::rig::{Broker, Engine, Rig};

const PARTITIONS: u32 = 4;
const BOOTSTRAP: &str = "127.0.0.1:9092";

/// A small deterministic generator (xorshift), so a seed replays the same run of faults.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    BrokerRestart,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL",
            Fault::BrokerRestart => "broker restart, then SIGKILL",
        }
    }
}

struct Cycle {
    fault: Fault,
    /// From the fault's end (flowgate started again, or the broker back) to the next record
    /// in the sink.
    resume: Option<Duration>,
    ran: Duration,
    received: usize,
    /// Times flowgate exited by itself (a fatal error) and was started again.
    restarts: u32,
}

struct Options {
    cycles: usize,
    minutes: Option<f64>,
    rate: u64,
    seed: u64,
}

fn options(args: &[&str]) -> Result<(String, Options), String> {
    let mut target = "kafka".to_string();
    let mut o = Options {
        cycles: 100,
        minutes: None,
        rate: 2_000,
        seed: 0x5eed,
    };
    for a in args {
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        if let Some(v) = a.strip_prefix("--cycles=") {
            o.cycles = num(v)? as usize;
        } else if let Some(v) = a.strip_prefix("--minutes=") {
            o.minutes = Some(v.parse().map_err(|e| format!("{a}: {e}"))?);
        } else if let Some(v) = a.strip_prefix("--rate=") {
            o.rate = num(v)?.max(1);
        } else if let Some(v) = a.strip_prefix("--seed=") {
            o.seed = num(v)?.max(1);
        } else if !a.starts_with("--") {
            target = a.to_string();
        } else {
            return Err(format!("chaos: unknown argument {a}"));
        }
    }
    Ok((target, o))
}

/// Lines of the JSON-lines sink, and their payloads (the record numbers).
fn received(sink: &Path) -> Vec<u64> {
    let Ok(text) = fs::read_to_string(sink) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let rest = &l[l.find("\"payload\":\"")? + 11..];
            rest[..rest.find('"')?].parse().ok()
        })
        .collect()
}

fn line_count(sink: &Path) -> usize {
    fs::read(sink).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
}

fn sink_bytes(sink: &Path) -> u64 {
    fs::metadata(sink).map_or(0, |m| m.len())
}

/// Waits until the sink grows past `before` bytes; how long that took (its size is polled
/// every 10 ms: reading a sink of millions of lines would slow the measurement down). Acts
/// as a supervisor meanwhile: a flowgate that exits (a fatal error) is started again, and
/// counted in `restarts`.
fn wait_for_growth(
    run: &mut Flowgate<'_>,
    before: u64,
    limit: Duration,
    restarts: &mut u32,
) -> Result<Option<Duration>, String> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if sink_bytes(run.sink) > before {
            return Ok(Some(started.elapsed()));
        }
        if let Ok(Some(status)) = run.child.try_wait() {
            eprintln!("    flowgate exited ({status}); starting it again");
            *restarts += 1;
            run.child = flowgate(run.bin, run.config, run.log)?;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(None)
}

/// A running `flowgate run` and how to start it again.
struct Flowgate<'a> {
    child: Child,
    bin: &'a Path,
    config: &'a Path,
    log: &'a Path,
    sink: &'a Path,
}

fn flowgate(bin: &Path, config: &Path, log: &Path) -> Result<Child, String> {
    Command::new(bin)
        .args(["run", "-c"])
        .arg(config)
        .env("FLOWGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| e.to_string())?,
        )
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

/// The console producer, fed numbers 0, 1, 2, … at `rate` per second until `stop`.
fn producer(
    rig: &Rig,
    topic: &str,
    rate: u64,
    stop: Arc<AtomicBool>,
    log: &Path,
) -> Result<(Child, std::thread::JoinHandle<u64>), String> {
    let mut child = rig
        .kafka_java(&rig.state_dir(Broker::Kafka))
        .args([
            "org.apache.kafka.tools.ConsoleProducer",
            "--bootstrap-server",
            BOOTSTRAP,
            "--topic",
            topic,
            "--producer-property",
            "acks=all",
            "--producer-property",
            "delivery.timeout.ms=120000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start the console producer: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("the producer has no stdin")?;
    let feeder = std::thread::spawn(move || {
        let started = Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while n < due {
                if writeln!(stdin, "{n}").is_err() {
                    return n;
                }
                n += 1;
            }
            let _ = stdin.flush();
            std::thread::sleep(Duration::from_millis(10));
        }
        n
    });
    Ok((child, feeder))
}

/// Every value the topic holds, read back with Kafka's console consumer.
fn topic_values(rig: &Rig, topic: &str) -> Result<Vec<u64>, String> {
    let out = rig
        .kafka_java(&rig.state_dir(Broker::Kafka))
        .args([
            "org.apache.kafka.tools.consumer.ConsoleConsumer",
            "--bootstrap-server",
            BOOTSTRAP,
            "--topic",
            topic,
            "--from-beginning",
            "--timeout-ms",
            "15000",
        ])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the console consumer: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// `(partition, committed, log end)` of the group, by Kafka's consumer-groups tool.
fn group_offsets(rig: &Rig, group: &str) -> Result<Vec<(String, Option<u64>, u64)>, String> {
    let out = rig
        .kafka_java(&rig.state_dir(Broker::Kafka))
        .args([
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server",
            BOOTSTRAP,
            "--describe",
            "--group",
            group,
        ])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run kafka-consumer-groups: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG …
        if cols.len() >= 6
            && cols[0] == group
            && let Ok(end) = cols[4].parse()
        {
            rows.push((cols[2].to_string(), cols[3].parse().ok(), end));
        }
    }
    Ok(rows)
}

fn stop_gracefully(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn chaos(args: &[&str]) -> Result<(), String> {
    let (target, o) = options(args)?;
    if target != "kafka" {
        return Err(format!(
            "chaos {target}: only `kafka` has a chaos run (RabbitMQ and Kinesis are covered by their SIGKILL tests in crates/flowgate-cli/tests)"
        ));
    }
    let rig = Rig::new()?;
    rig.up(&[Broker::Kafka], Engine::Native)?;
    crate::run(
        "build flowgate",
        crate::cargo().args(["build", "-p", "flowgate-cli", "--bin", "flowgate"]),
    )?;
    let bin = rig.root().join("target/debug/flowgate");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = rig.root().join(format!("target/chaos/kafka-{stamp}"));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let topic = format!("chaos-{stamp}-{}", std::process::id());
    crate::run(
        "create the topic",
        rig.kafka_java(&rig.state_dir(Broker::Kafka)).args([
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server",
            BOOTSTRAP,
            "--create",
            "--topic",
            &topic,
            "--partitions",
            &PARTITIONS.to_string(),
            "--replication-factor",
            "1",
        ]),
    )?;
    let sink = dir.join("sink.jsonl");
    let config = dir.join("pipeline.toml");
    fs::write(
        &config,
        format!(
            "name = \"{topic}\"\n\n[source]\ntype = \"kafka\"\nbootstrap_servers = \"{BOOTSTRAP}\"\n\
             topics = [\"{topic}\"]\ngroup_instance_id = \"chaos-member\"\nsession_timeout = \"10s\"\n\n\
             [sink]\ntype = \"jsonl\"\npath = \"{}\"\n\n[store]\ntype = \"embedded\"\npath = \"{}\"\n\n\
             [runtime.commit]\nevery = \"200ms\"\n",
            sink.display(),
            dir.join("data").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = dir.join("flowgate.log");
    let stop = Arc::new(AtomicBool::new(false));
    let (mut producer_child, feeder) = producer(
        &rig,
        &topic,
        o.rate,
        stop.clone(),
        &dir.join("producer.log"),
    )?;
    let mut rng = Rng(o.seed);
    let deadline = o
        .minutes
        .map(|m| Instant::now() + Duration::from_secs_f64(m * 60.0));
    let mut cycles: Vec<Cycle> = Vec::new();
    let started = Instant::now();
    eprintln!(
        "==> chaos kafka: {} cycles, topic {topic}, report in {}",
        o.cycles,
        dir.display()
    );
    for n in 0..o.cycles {
        if deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
        // Every tenth cycle, and the last of a shorter run, restarts the broker.
        let fault = if n % 10 == 9 || (o.cycles < 10 && n + 1 == o.cycles) {
            Fault::BrokerRestart
        } else {
            Fault::Kill
        };
        let before = line_count(&sink);
        let t0 = Instant::now();
        let mut restarts = 0;
        let mut run = Flowgate {
            child: flowgate(&bin, &config, &log)?,
            bin: &bin,
            config: &config,
            log: &log,
            sink: &sink,
        };
        let mut resume = wait_for_growth(
            &mut run,
            sink_bytes(&sink),
            Duration::from_secs(60),
            &mut restarts,
        )?;
        let run_for = Duration::from_millis(1_000 + rng.below(2_000));
        std::thread::sleep(run_for.saturating_sub(t0.elapsed()));
        if fault == Fault::BrokerRestart {
            rig.down(&[Broker::Kafka])?;
            std::thread::sleep(Duration::from_secs(2));
            rig.up(&[Broker::Kafka], Engine::Native)?;
            resume = wait_for_growth(
                &mut run,
                sink_bytes(&sink),
                Duration::from_secs(120),
                &mut restarts,
            )?;
        }
        let _ = run.child.kill();
        let _ = run.child.wait();
        let received = line_count(&sink) - before;
        eprintln!(
            "    cycle {n:>3} {:<30} ran {:>5.1}s, resumed in {}, {received} records{}",
            fault.name(),
            t0.elapsed().as_secs_f64(),
            resume.map_or("never".to_string(), |d| format!("{:.2}s", d.as_secs_f64())),
            if restarts > 0 {
                format!(", flowgate exited and was started again {restarts}×")
            } else {
                String::new()
            }
        );
        cycles.push(Cycle {
            fault,
            resume,
            ran: t0.elapsed(),
            received,
            restarts,
        });
    }
    stop.store(true, Ordering::Relaxed);
    let produced_lines = feeder.join().unwrap_or(0);
    let _ = producer_child.wait();
    // The last run: to the end, then a clean stop.
    let mut last = flowgate(&bin, &config, &log)?;
    let drain_started = Instant::now();
    let mut drained = false;
    while drain_started.elapsed() < Duration::from_secs(180) {
        let rows = group_offsets(&rig, &topic)?;
        if rows.len() == PARTITIONS as usize && rows.iter().all(|(_, c, e)| *c == Some(*e)) {
            drained = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop_gracefully(&mut last);
    ledger(
        &rig,
        &topic,
        &sink,
        &dir,
        &o,
        &cycles,
        produced_lines,
        drained,
        started,
    )
}

#[allow(clippy::too_many_arguments)]
fn ledger(
    rig: &Rig,
    topic: &str,
    sink: &Path,
    dir: &Path,
    o: &Options,
    cycles: &[Cycle],
    produced_lines: u64,
    drained: bool,
    started: Instant,
) -> Result<(), String> {
    let in_topic = topic_values(rig, topic)?;
    let got = received(sink);
    let mut counts: HashMap<u64, u32> = HashMap::new();
    for v in &got {
        *counts.entry(*v).or_default() += 1;
    }
    let lost: Vec<u64> = in_topic
        .iter()
        .filter(|v| !counts.contains_key(v))
        .copied()
        .collect();
    let duplicates = got.len() - counts.len();
    let offsets = group_offsets(rig, topic)?;
    let committed_at_end =
        offsets.len() == PARTITIONS as usize && offsets.iter().all(|(_, c, e)| *c == Some(*e));
    let kills = cycles.len();
    let restarts = cycles
        .iter()
        .filter(|c| c.fault == Fault::BrokerRestart)
        .count();
    let resumes: Vec<f64> = cycles
        .iter()
        .filter_map(|c| c.resume.map(|d| d.as_secs_f64()))
        .collect();
    let never = cycles.iter().filter(|c| c.resume.is_none()).count();
    let exits: u32 = cycles.iter().map(|c| c.restarts).sum();
    let worst = resumes.iter().copied().fold(0.0, f64::max);
    let mut sorted = resumes.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let mut md = format!(
        "# chaos kafka\n\n`cargo xtask chaos kafka --cycles={} --rate={} --seed={}`: {} cycles in {:.0} s \
         ({kills} SIGKILLs of flowgate, {restarts} of them after a broker restart under the running pipeline), \
         4 partitions, static membership (session timeout 10 s), checkpoints in the embedded store, \
         commits every 200 ms, no dedup.\n\n\
         | | |\n|---|---|\n\
         | records the producer sent | {produced_lines} |\n\
         | records the topic holds (read back) | {} |\n\
         | records received | {} ({} distinct) |\n\
         | **lost** | **{}** |\n\
         | duplicates | {duplicates} ({:.2} per kill) |\n\
         | committed offsets = log end (kafka-consumer-groups) | {} |\n\
         | time to resume, median / worst | {median:.2} s / {worst:.2} s |\n\
         | cycles that never resumed | {never} |\n\
         | flowgate exits by itself (fatal errors), started again | {exits} |\n\n\
         | cycle | fault | ran | resumed in | records | flowgate exited by itself |\n|---:|---|---:|---:|---:|---:|\n",
        o.cycles,
        o.rate,
        o.seed,
        cycles.len(),
        started.elapsed().as_secs_f64(),
        in_topic.len(),
        got.len(),
        counts.len(),
        lost.len(),
        duplicates as f64 / kills.max(1) as f64,
        if committed_at_end && drained {
            "yes"
        } else {
            "**no**"
        },
    );
    let mut json_rows = Vec::new();
    for (i, c) in cycles.iter().enumerate() {
        let resume = c.resume.map(|d| d.as_secs_f64());
        md.push_str(&format!(
            "| {i} | {} | {:.1} s | {} | {} | {} |\n",
            c.fault.name(),
            c.ran.as_secs_f64(),
            resume.map_or("never".into(), |r| format!("{r:.2} s")),
            c.received,
            c.restarts
        ));
        json_rows.push(format!(
            "{{\"cycle\":{i},\"fault\":\"{}\",\"ran_s\":{:.3},\"resume_s\":{},\"records\":{},\"exited\":{}}}",
            c.fault.name(),
            c.ran.as_secs_f64(),
            resume.map_or("null".into(), |r| format!("{r:.3}")),
            c.received,
            c.restarts
        ));
    }
    let json = format!(
        "{{\"broker\":\"kafka\",\"cycles\":{},\"produced\":{produced_lines},\"in_topic\":{},\"received\":{},\"distinct\":{},\"lost\":{},\"duplicates\":{duplicates},\"committed_at_end\":{},\"resume_median_s\":{median:.3},\"resume_worst_s\":{worst:.3},\"never_resumed\":{never},\"exits\":{exits},\"rows\":[{}]}}\n",
        cycles.len(),
        in_topic.len(),
        got.len(),
        counts.len(),
        lost.len(),
        committed_at_end && drained,
        json_rows.join(",")
    );
    write(&dir.join("report.md"), &md)?;
    write(&dir.join("report.json"), &json)?;
    println!("{}", md.split("| cycle |").next().unwrap_or(&md));
    println!("report: {}", dir.join("report.md").display());
    let held: HashSet<u64> = in_topic.iter().copied().collect();
    let unexpected = counts.keys().filter(|v| !held.contains(v)).count();
    if !lost.is_empty() || unexpected > 0 || !(committed_at_end && drained) || never > 0 {
        return Err(format!(
            "chaos kafka failed: {} lost (first {:?}), {unexpected} not in the topic, committed at end: {}, {never} cycles never resumed",
            lost.len(),
            lost.iter().take(5).collect::<Vec<_>>(),
            committed_at_end && drained
        ));
    }
    Ok(())
}

fn write(path: &PathBuf, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
