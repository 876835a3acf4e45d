//! The Kafka contenders: `flowgate run` (Kafka source → JSON-lines file), Kafka Connect
//! standalone (FileStreamSink), Kafka's consumer-perf-test and the raw rdkafka loop of the Kafka
//! bench, each reading the same pre-filled topic with a fresh consumer group.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::measure::{self, Sample, Writer};
use crate::rig::{Broker, Rig};

pub(super) const BOOTSTRAP: &str = "127.0.0.1:9092";

/// The JVM settings of Kafka's own launchers (`kafka-run-class.sh`).
const JVM_PERFORMANCE: [&str; 7] = [
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
];

/// What every contender of a run shares.
pub(super) struct Ctx<'a> {
    pub(super) rig: &'a Rig,
    /// The run's directory (outputs, configurations, logs), removed at the end.
    pub(super) dir: PathBuf,
    pub(super) flowgate: PathBuf,
    pub(super) bench_kafka: PathBuf,
    pub(super) connect_jars: PathBuf,
    pub(super) stamp: u64,
}

impl Ctx<'_> {
    /// A fresh directory for one run of one contender.
    pub(super) fn run_dir(&self, name: &str) -> Result<PathBuf, String> {
        let d = self.dir.join(name);
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        Ok(d)
    }
}

/// `flowgate run -c CONFIG` with warnings only on its standard error, into `log`.
pub(super) fn flowgate_cmd(ctx: &Ctx<'_>, config: &Path, log: &Path) -> Result<Command, String> {
    let mut cmd = Command::new(&ctx.flowgate);
    cmd.args(["run", "-c"])
        .arg(config)
        .env("FLOWGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(log)?);
    Ok(cmd)
}

pub(super) fn log_file(path: &Path) -> Result<fs::File, String> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// A pipeline `topic` → JSON-lines file `out`, the defaults otherwise (embedded store).
pub(super) fn flowgate_config(dir: &Path, topic: &str, group: &str, out: &Path) -> String {
    format!(
        "name = \"{group}\"\n\n[source]\ntype = \"kafka\"\nbootstrap_servers = \"{BOOTSTRAP}\"\n\
         topics = [\"{topic}\"]\ngroup_id = \"{group}\"\n\n[sink]\ntype = \"jsonl\"\npath = \"{}\"\n\n\
         [store]\ntype = \"embedded\"\npath = \"{}\"\n",
        out.display(),
        dir.join("data").display()
    )
}

pub(super) fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub(super) fn flowgate(
    ctx: &Ctx<'_>,
    topic: &str,
    records: u64,
    round: usize,
) -> Result<Sample, String> {
    let dir = ctx.run_dir("flowgate")?;
    let out = dir.join("out.jsonl");
    let config = dir.join("pipeline.toml");
    let group = format!("peers-flowgate-{}-{round}", ctx.stamp);
    write(&config, &flowgate_config(&dir, topic, &group, &out))?;
    let w = Writer {
        name: "flowgate",
        out: &out,
        records,
        timeout: Duration::from_secs(300),
    };
    let s = measure::measure_writer(&w, &mut flowgate_cmd(ctx, &config, &dir.join("log"))?);
    let _ = fs::remove_dir_all(&dir);
    s
}

/// Connect's worker and connector properties; `flush_ms`: `offset.flush.interval.ms` (None:
/// Connect's default, 60 s).
pub(super) struct ConnectSetup<'a> {
    pub(super) topic: &'a str,
    pub(super) name: &'a str,
    pub(super) tasks: u32,
    pub(super) flush_ms: Option<u64>,
}

/// `ConnectStandalone worker.properties connector.properties` writing `dir/out.txt`, with the
/// heap of Connect's launcher (`connect-standalone.sh`: `-Xms256M -Xmx2G`).
pub(super) fn connect_cmd(
    ctx: &Ctx<'_>,
    dir: &Path,
    s: &ConnectSetup<'_>,
) -> Result<Command, String> {
    let flush = s.flush_ms.map_or(String::new(), |ms| {
        format!("offset.flush.interval.ms={ms}\n")
    });
    let worker = format!(
        "bootstrap.servers={BOOTSTRAP}\n\
         key.converter=org.apache.kafka.connect.storage.StringConverter\n\
         value.converter=org.apache.kafka.connect.storage.StringConverter\n\
         offset.storage.file.filename={}\n\
         listeners=http://127.0.0.1:18083\n{flush}",
        dir.join("connect.offsets").display()
    );
    let connector = format!(
        "name={}\nconnector.class=org.apache.kafka.connect.file.FileStreamSinkConnector\n\
         tasks.max={}\ntopics={}\nfile={}\n",
        s.name,
        s.tasks,
        s.topic,
        dir.join("out.txt").display()
    );
    let log4j = format!(
        "status = warn\nappender.file.type = File\nappender.file.name = file\n\
         appender.file.fileName = {}\nappender.file.layout.type = PatternLayout\n\
         appender.file.layout.pattern = [%d] %p %m (%c)%n\nrootLogger.level = warn\n\
         rootLogger.appenderRef.file.ref = file\n",
        dir.join("connect.log").display()
    );
    write(&dir.join("worker.properties"), &worker)?;
    write(&dir.join("connector.properties"), &connector)?;
    write(&dir.join("log4j2.properties"), &log4j)?;
    let mut cmd = Command::new("java");
    cmd.args(["-Xms256M", "-Xmx2G"])
        .args(JVM_PERFORMANCE)
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            dir.join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", ctx.connect_jars.display()))
        .arg("org.apache.kafka.connect.cli.ConnectStandalone")
        .arg(dir.join("worker.properties"))
        .arg(dir.join("connector.properties"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("connect.stderr"))?);
    Ok(cmd)
}

pub(super) fn connect(
    ctx: &Ctx<'_>,
    topic: &str,
    records: u64,
    round: usize,
    tasks: u32,
) -> Result<Sample, String> {
    let label = format!("connect-{tasks}");
    let dir = ctx.run_dir(&label)?;
    let name = format!("peers-{label}-{}-{round}", ctx.stamp);
    let setup = ConnectSetup {
        topic,
        name: &name,
        tasks,
        flush_ms: None,
    };
    let mut cmd = connect_cmd(ctx, &dir, &setup)?;
    let w = Writer {
        name: &label,
        out: &dir.join("out.txt"),
        records,
        timeout: Duration::from_secs(600),
    };
    let s = measure::measure_writer(&w, &mut cmd);
    let _ = fs::remove_dir_all(&dir);
    s
}

/// Kafka's `kafka-consumer-perf-test` (`ConsumerPerformance`, heap `-Xmx512M` as its launcher
/// sets), a fresh group. Its own figures give the rates: the time to the last record from the
/// process's start (its `end.time`, against the clock read at the start) and, as the steady
/// rate, `fetch.nMsg.sec` (from the group's assignment to the last record).
pub(super) fn perf_test(
    ctx: &Ctx<'_>,
    topic: &str,
    records: u64,
    round: usize,
) -> Result<Sample, String> {
    let group = format!("peers-perf-test-{}-{round}", ctx.stamp);
    let mut cmd = ctx.rig.kafka_java(&ctx.rig.state_dir(Broker::Kafka));
    cmd.arg("-Xmx512M")
        .args(JVM_PERFORMANCE)
        .arg("-Duser.timezone=UTC")
        .arg("org.apache.kafka.tools.ConsumerPerformance")
        .args([
            "--bootstrap-server",
            BOOTSTRAP,
            "--topic",
            topic,
            "--group",
            &group,
        ])
        .args(["--messages", &records.to_string(), "--timeout", "60000"])
        .args(["--date-format", "HH:mm:ss.SSS"]);
    let started_ms = ms_of_day();
    let (out, cpu, rss) = measure::run_tool(&mut cmd, "kafka-consumer-perf-test")?;
    // start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec,
    // rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec
    let line = out
        .lines()
        .rev()
        .find(|l| l.split(',').count() >= 10)
        .ok_or_else(|| format!("kafka-consumer-perf-test: no result line in {out:?}"))?;
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let (Some(end), Some(n), Some(steady)) = (parse_ms_of_day(f[1]), num(4), num(9)) else {
        return Err(format!("kafka-consumer-perf-test: cannot read {line:?}"));
    };
    let secs = (end - started_ms).rem_euclid(86_400_000.0) / 1000.0;
    Ok(Sample {
        rate: n / secs,
        steady,
        cpu_per_m: cpu * 1e6 / n,
        rss_mib: rss,
        records: n as u64,
    })
}

/// Milliseconds since midnight, UTC.
fn ms_of_day() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() % 86_400_000) as f64)
}

/// `HH:mm:ss.SSS` → milliseconds since midnight.
fn parse_ms_of_day(s: &str) -> Option<f64> {
    let (hms, ms) = s.split_once('.')?;
    let mut parts = hms.split(':').map(|p| p.parse::<f64>().ok());
    let (h, m, sec) = (parts.next()??, parts.next()??, parts.next()??);
    Some(((h * 60.0 + m) * 60.0 + sec) * 1000.0 + ms.parse::<f64>().ok()?)
}

/// The raw rdkafka loop of the Kafka bench (`bench_kafka MODE`): its own rates (from the
/// client's creation, and from the first record), the process's CPU and peak RSS.
pub(super) fn raw(ctx: &Ctx<'_>, mode: &str, topic: &str, records: u64) -> Result<Sample, String> {
    let mut cmd = Command::new(&ctx.bench_kafka);
    cmd.args([mode, topic, &records.to_string()])
        .env("FLOWGATE_TEST_KAFKA_BOOTSTRAP", BOOTSTRAP);
    let (out, cpu, rss) = measure::run_tool(&mut cmd, &format!("bench_kafka {mode}"))?;
    // `mode records seconds rate steady-rate seconds-to-first cpu-µs-per-record`
    let f: Vec<f64> = out
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    match f.as_slice() {
        [n, _, rate, steady, ..] => Ok(Sample {
            rate: *rate,
            steady: *steady,
            cpu_per_m: cpu * 1e6 / n,
            rss_mib: rss,
            records: *n as u64,
        }),
        _ => Err(format!("bench_kafka {mode}: unexpected output {out:?}")),
    }
}

/// Deletes the consumer groups whose names hold `-{stamp}-` (their committed offsets), with
/// Kafka's consumer-groups tool.
pub(super) fn delete_groups(rig: &Rig, stamp: u64) {
    let tool = || {
        let mut cmd = rig.kafka_java(&rig.state_dir(Broker::Kafka));
        cmd.arg("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand")
            .args(["--bootstrap-server", BOOTSTRAP])
            .stderr(Stdio::null());
        cmd
    };
    let Ok(out) = tool().arg("--list").output() else {
        return;
    };
    let mark = format!("-{stamp}-");
    let groups: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|g| g.contains(&mark))
        .map(str::to_string)
        .collect();
    if groups.is_empty() {
        return;
    }
    let mut cmd = tool();
    cmd.arg("--delete");
    for g in &groups {
        cmd.args(["--group", g]);
    }
    let _ = cmd.stdout(Stdio::null()).status();
}
