//! `cargo xtask chaos kafka|rabbitmq|kinesis|all [--cycles=N] [--minutes=M] [--rate=R]
//! [--seed=S] [--store=postgres] [--mixed]`:
//! faults at volume against a real broker, with one ledger at the end.
//!
//! A producer writes uniquely numbered records for the whole run (Kafka's own console
//! producer; for RabbitMQ a pika client publishing with confirms; for Kinesis a boto3 client
//! calling `PutRecords`); `flowgate run` consumes them into a JSON-lines sink, reaching the
//! broker through a toxiproxy proxy. Each cycle starts flowgate, lets it run 1–3 s, and ends
//! with a fault: SIGKILL of flowgate; or (every tenth cycle, and the last of a run of fewer
//! than ten) the broker stopped and restarted under the running pipeline, then SIGKILL; or
//! (every tenth from the fifth, and the second of a short run: a cut) a network fault through
//! the proxy — latency, a bandwidth limit, a cut longer than the Kafka session timeout,
//! connection resets, in turn — then SIGKILL; or (every tenth from the third, and the third of
//! a short run) a sink that stalls for 20 s, then SIGKILL; or, with `--store=postgres` (always
//! for Kinesis), (every tenth from the eighth) the checkpoint store restarted, then SIGKILL;
//! or, for Kafka, (every tenth from the seventh) a second member of the group joining and
//! leaving every 5 s, three times, then SIGKILL. The harness is the supervisor: a flowgate
//! that exits by itself is started again, and counted. After the last cycle the producer
//! stops, flowgate runs once more to the end and stops on SIGTERM. The ledger: every record
//! the broker accepted was received (lost = 0), duplicates counted, and the broker's own
//! tools show everything consumed (Kafka: the group's committed offsets equal the end of
//! every partition, by kafka-consumer-groups; RabbitMQ: the queue holds no message, ready or
//! unacknowledged, by `rabbitmqctl list_queues`; Kinesis: `GetRecords` after each shard's
//! checkpoint returns nothing). The report (one row per cycle: fault, time to resume, records
//! received) goes to `target/chaos/<broker>-<time>/report.{md,json}`. With `--mixed` each
//! cycle's fault is drawn at random from the seed instead.

mod kafka;
mod kinesis;
mod network;
mod rabbitmq;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::measure::{file_len, line_count};
use crate::rig::{Broker, Engine, Rig};
use network::{Net, Toxiproxy};

/// A broker the chaos run can drive: what it reads, how records are produced, and how its
/// own tools tell what it accepted and whether everything was consumed.
trait Target {
    fn broker(&self) -> Broker;
    /// Creates what the run reads (a topic, a queue); its name.
    fn prepare(&self, rig: &Rig, stamp: u64) -> Result<String, String>;
    /// The `[source]` section of the pipeline reading `stream` through the proxy (the
    /// first of [`Target::proxy`]).
    fn source(&self, stream: &str) -> String;
    /// The ports of the proxy between flowgate and the broker: where it listens, and the
    /// broker's port it forwards to.
    fn proxy(&self) -> (u16, u16);
    /// A producer fed the numbers 0, 1, 2, … on its standard input, one per line, each
    /// written to `stream`; it exits when its input ends.
    fn producer(&self, rig: &Rig, stream: &str, log: &Path) -> Result<Child, String>;
    /// Every record number the broker accepted; `fed`: how many the producer was given.
    fn accepted(&self, rig: &Rig, stream: &str, fed: u64) -> Result<Vec<u64>, String>;
    /// The broker's own tools show every record of `stream` consumed by the pipeline.
    fn consumed_to_end(&self, rig: &Rig, stream: &str) -> Result<bool, String>;
    /// How the run is set up, and the check `consumed_to_end` makes, for the report.
    fn setup(&self) -> &'static str;
    fn end_check(&self) -> &'static str;
    /// The ledger reads the checkpoints while the pipeline runs: they must be in PostgreSQL.
    fn checkpoints_in_postgres(&self) -> bool {
        false
    }
    /// The `[source]` section of a second member of the same consumer group, joining and
    /// leaving at once (no static membership): the rebalance churn cycles. `None`: the
    /// broker has no groups to churn.
    fn churn_member_source(&self, _stream: &str) -> Option<String> {
        None
    }
    /// The broker keeps what it accepted across a restart; if not, the run restarts the
    /// store instead.
    fn restarts_broker(&self) -> bool {
        !self.broker_in_memory()
    }
    /// The run starts the broker afresh without writing its state to disk (kinesis-mock),
    /// and stops it at the end; the broker is then never restarted in the run.
    fn broker_in_memory(&self) -> bool {
        false
    }
    /// The highest producer rate the rig's broker sustains beside the pipeline (records/s).
    fn max_rate(&self) -> u64 {
        u64::MAX
    }
    /// Deletes what [`Target::prepare`] created, once the ledger is written.
    fn cleanup(&self, _rig: &Rig, _stream: &str) -> Result<(), String> {
        Ok(())
    }
}

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    Kill,
    BrokerRestart,
    Network(Net),
    /// The sink stops answering 1 s after flowgate starts, for 20 s.
    SinkStall,
    /// The checkpoint store (PostgreSQL, with `--store=postgres`) stopped and restarted.
    StoreRestart,
    /// A second member of the group joins and leaves every 5 s, three times.
    Churn,
}

/// When a stalling sink answers again, from flowgate's start.
const STALL_ENDS: Duration = Duration::from_secs(21);

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL",
            Fault::BrokerRestart => "broker restart, then SIGKILL",
            Fault::Network(n) => n.name(),
            Fault::SinkStall => "sink stalled 20 s, then SIGKILL",
            Fault::StoreRestart => "store restart, then SIGKILL",
            Fault::Churn => "a member joins and leaves 3×, then SIGKILL",
        }
    }

    /// Cycle `n` of `cycles`: of every ten, the third stalls the sink, the fifth injects a
    /// network fault (each kind in turn), the seventh churns the group (Kafka), the eighth
    /// restarts the store (with PostgreSQL), the tenth restarts the broker (or, for a broker
    /// that loses data on a restart, the store); the others, and every cycle's end, SIGKILL
    /// flowgate. A run of fewer than ten cycles has a network cut second, a stalled sink
    /// third, and ends with a broker restart.
    fn of_cycle(n: usize, cycles: usize, t: &Schedule) -> Fault {
        let short = cycles < 10;
        let fault = match n % 10 {
            _ if short && n + 1 == cycles => Fault::BrokerRestart,
            1 if short => Fault::Network(Net::Cut),
            2 => Fault::SinkStall,
            4 if !short => Fault::Network(Net::ALL[(n / 10) % Net::ALL.len()]),
            6 if t.churn && !short => Fault::Churn,
            7 if t.postgres => Fault::StoreRestart,
            9 => Fault::BrokerRestart,
            _ => Fault::Kill,
        };
        match fault {
            Fault::BrokerRestart if !t.restarts_broker && t.postgres => Fault::StoreRestart,
            Fault::BrokerRestart if !t.restarts_broker => Fault::Kill,
            f => f,
        }
    }

    /// A fault drawn at random (`--mixed`) from the kinds the run can use.
    fn random(rng: &mut Rng, t: &Schedule) -> Fault {
        let mut kinds = vec![Fault::Kill, Fault::SinkStall];
        kinds.extend(Net::ALL.map(Fault::Network));
        if t.restarts_broker {
            kinds.push(Fault::BrokerRestart);
        }
        if t.postgres {
            kinds.push(Fault::StoreRestart);
        }
        if t.churn {
            kinds.push(Fault::Churn);
        }
        kinds[rng.below(kinds.len() as u64) as usize]
    }
}

/// What a run's faults can use.
struct Schedule {
    /// The checkpoints are in PostgreSQL (which can be restarted).
    postgres: bool,
    restarts_broker: bool,
    /// A second group member can churn.
    churn: bool,
}

struct Cycle {
    fault: Fault,
    /// From the fault's end (flowgate started again, the broker back, or the network fault
    /// lifted) to the next record in the sink.
    resume: Option<Duration>,
    ran: Duration,
    received: usize,
    /// Times flowgate exited by itself (a fatal error) and was started again.
    restarts: u32,
}

#[derive(Clone, Copy)]
struct Options {
    cycles: usize,
    minutes: Option<f64>,
    rate: u64,
    seed: u64,
    /// Checkpoints in PostgreSQL (restarted by some cycles) rather than the embedded store.
    postgres: bool,
    /// Each cycle's fault drawn at random from the seed, rather than in the fixed order.
    mixed: bool,
}

fn options(args: &[&str]) -> Result<(String, Options), String> {
    let mut target = "kafka".to_string();
    let mut o = Options {
        cycles: 100,
        minutes: None,
        rate: 2_000,
        seed: 0x5eed,
        postgres: false,
        mixed: false,
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
        } else if let Some(v) = a.strip_prefix("--store=") {
            o.postgres = match v {
                "postgres" => true,
                "embedded" => false,
                _ => return Err(format!("{a}: expected embedded or postgres")),
            };
        } else if *a == "--mixed" {
            o.mixed = true;
        } else if !a.starts_with("--") {
            target = a.to_string();
        } else {
            return Err(format!("chaos: unknown argument {a}"));
        }
    }
    Ok((target, o))
}

/// The PostgreSQL schema holding a run's checkpoints (with `--store=postgres`).
fn pg_schema(stream: &str) -> String {
    stream.replace('-', "_")
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
        if file_len(run.sink) > before {
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

/// Feeds `child`'s standard input the numbers 0, 1, 2, … at `rate` per second until `stop`;
/// the thread returns how many it fed.
pub(crate) fn feed(
    mut child: Child,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> Result<(Child, std::thread::JoinHandle<u64>), String> {
    let mut stdin = child.stdin.take().ok_or("the producer has no stdin")?;
    let feeder = std::thread::spawn(move || {
        let started = Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // A producer slower than `rate` blocks the pipe: the numbers then go at its pace,
            // and a stop is honoured at once rather than after the backlog of due numbers.
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while n < due && !stop.load(Ordering::Relaxed) {
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

pub(crate) fn stop_gracefully(child: &mut Child) {
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
    let targets: Vec<Box<dyn Target>> = match target.as_str() {
        "kafka" => vec![Box::new(kafka::Kafka)],
        "rabbitmq" => vec![Box::new(rabbitmq::Rabbitmq)],
        "kinesis" => vec![Box::new(kinesis::Kinesis)],
        "all" => vec![
            Box::new(kafka::Kafka),
            Box::new(rabbitmq::Rabbitmq),
            Box::new(kinesis::Kinesis),
        ],
        other => {
            return Err(format!(
                "chaos {other}: expected kafka, rabbitmq, kinesis or all"
            ));
        }
    };
    let rig = Rig::new()?;
    crate::run(
        "build flowgate",
        crate::cargo().args(["build", "-p", "flowgate-cli", "--bin", "flowgate"]),
    )?;
    for t in &targets {
        chaos_one(&rig, t.as_ref(), &o)?;
    }
    Ok(())
}

/// Where a run keeps its files.
struct RunFiles {
    dir: PathBuf,
    sink: PathBuf,
    config: PathBuf,
    /// The same pipeline with a sink that stalls (`Fault::SinkStall`).
    stall_config: PathBuf,
    log: PathBuf,
    /// The churning second member's pipeline (`Fault::Churn`), its sink and log.
    churn_config: Option<PathBuf>,
    churn_sink: PathBuf,
    churn_log: PathBuf,
}

impl RunFiles {
    /// Lines in both sinks.
    fn lines(&self) -> Result<u64, String> {
        Ok(line_count(&self.sink)? + line_count(&self.churn_sink)?)
    }
}

fn run_files(
    rig: &Rig,
    t: &dyn Target,
    stream: &str,
    stamp: u64,
    postgres: bool,
) -> Result<RunFiles, String> {
    let dir = rig
        .root()
        .join(format!("target/chaos/{}-{stamp}", t.broker().name()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sink = dir.join("sink.jsonl");
    let store = if postgres {
        let url = Broker::Postgres
            .env(rig)
            .into_iter()
            .find(|(k, _)| k == "FLOWGATE_TEST_POSTGRES_URL")
            .map(|(_, v)| v)
            .unwrap_or_default();
        format!(
            "type = \"postgres\"\nurl = \"{url}\"\nschema = \"{}\"",
            pg_schema(stream)
        )
    } else {
        format!(
            "type = \"embedded\"\npath = \"{}\"",
            dir.join("data").display()
        )
    };
    let pipeline = |source: &str, sink: &Path, store: &str, faults: &str| {
        format!(
            "name = \"{stream}\"\n\n{source}\n\n[sink]\ntype = \"jsonl\"\npath = \"{}\"\n{faults}\n\
             [store]\n{store}\n\n[runtime.commit]\nevery = \"200ms\"\n",
            sink.display(),
        )
    };
    let source = t.source(stream);
    let config = dir.join("pipeline.toml");
    let stall_config = dir.join("pipeline-stalling-sink.toml");
    write(&config, &pipeline(&source, &sink, &store, ""))?;
    write(
        &stall_config,
        &pipeline(
            &source,
            &sink,
            &store,
            "faults = { stall_after = \"1s\", stall_for = \"20s\" }\n",
        ),
    )?;
    // The second member shares PostgreSQL; with the embedded store it keeps its own (a
    // partition coming back then starts from the group's committed offset or an older
    // checkpoint of the first member: repeats, never a gap).
    let churn_sink = dir.join("sink-churn.jsonl");
    let churn_config = match t.churn_member_source(stream) {
        Some(source) => {
            let store = if postgres {
                store.clone()
            } else {
                format!(
                    "type = \"embedded\"\npath = \"{}\"",
                    dir.join("data-churn").display()
                )
            };
            let path = dir.join("pipeline-churn-member.toml");
            write(&path, &pipeline(&source, &churn_sink, &store, ""))?;
            Some(path)
        }
        None => None,
    };
    Ok(RunFiles {
        log: dir.join("flowgate.log"),
        churn_log: dir.join("flowgate-churn.log"),
        dir,
        sink,
        config,
        stall_config,
        churn_config,
        churn_sink,
    })
}

fn chaos_one(rig: &Rig, t: &dyn Target, o: &Options) -> Result<(), String> {
    if t.broker_in_memory() {
        let rig = &rig.with_kinesis_in_memory();
        rig.down(&[t.broker()])?;
        let res = chaos_on(rig, t, o);
        rig.down(&[t.broker()])?;
        return res;
    }
    chaos_on(rig, t, o)
}

fn chaos_on(rig: &Rig, t: &dyn Target, o: &Options) -> Result<(), String> {
    let o = &Options {
        postgres: o.postgres || t.checkpoints_in_postgres(),
        rate: o.rate.min(t.max_rate()),
        ..*o
    };
    let brokers: &[Broker] = if o.postgres {
        &[t.broker(), Broker::Postgres]
    } else {
        &[t.broker()]
    };
    rig.up(brokers, Engine::Native)?;
    let bin = rig.root().join("target/debug/flowgate");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stream = t.prepare(rig, stamp)?;
    let files = run_files(rig, t, &stream, stamp, o.postgres)?;
    let (listen, upstream) = t.proxy();
    let proxy = Toxiproxy::start(rig, listen, upstream, &files.dir.join("toxiproxy.log"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = t.producer(rig, &stream, &files.dir.join("producer.log"))?;
    let (mut producer_child, feeder) = feed(producer, o.rate, stop.clone())?;
    let started = Instant::now();
    eprintln!(
        "==> chaos {}: {} cycles, {stream}, report in {}",
        t.broker().name(),
        o.cycles,
        files.dir.display()
    );
    let cycles = run_cycles(rig, t, &proxy, &bin, &files, o)?;
    stop.store(true, Ordering::Relaxed);
    let fed = feeder.join().unwrap_or(0);
    let _ = producer_child.wait();
    // The last run: to the end, then a clean stop.
    let mut last = flowgate(&bin, &files.config, &files.log)?;
    let drain_started = Instant::now();
    let mut drained = false;
    while drain_started.elapsed() < Duration::from_secs(180) {
        if t.consumed_to_end(rig, &stream)? {
            drained = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop_gracefully(&mut last);
    let run = Run {
        stream: &stream,
        files: &files,
        cycles: &cycles,
        fed,
        drained,
        started,
    };
    let res = ledger(rig, t, o, &run);
    if let Err(e) = t.cleanup(rig, &stream) {
        eprintln!("    could not delete {stream}: {e}");
    }
    res
}

/// The cycles: flowgate started, run 1–3 s, then the cycle's fault.
fn run_cycles(
    rig: &Rig,
    t: &dyn Target,
    proxy: &Toxiproxy,
    bin: &Path,
    files: &RunFiles,
    o: &Options,
) -> Result<Vec<Cycle>, String> {
    let mut rng = Rng(o.seed);
    let deadline = o
        .minutes
        .map(|m| Instant::now() + Duration::from_secs_f64(m * 60.0));
    let mut cycles: Vec<Cycle> = Vec::new();
    for n in 0..o.cycles {
        if deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
        let schedule = Schedule {
            postgres: o.postgres,
            restarts_broker: t.restarts_broker(),
            churn: files.churn_config.is_some(),
        };
        let fault = if o.mixed {
            Fault::random(&mut rng, &schedule)
        } else {
            Fault::of_cycle(n, o.cycles, &schedule)
        };
        let config = match fault {
            Fault::SinkStall => &files.stall_config,
            _ => &files.config,
        };
        let before = files.lines()?;
        let t0 = Instant::now();
        let mut restarts = 0;
        let mut run = Flowgate {
            child: flowgate(bin, config, &files.log)?,
            bin,
            config,
            log: &files.log,
            sink: &files.sink,
        };
        let mut resume = wait_for_growth(
            &mut run,
            file_len(&files.sink),
            Duration::from_secs(60),
            &mut restarts,
        )?;
        let run_for = Duration::from_millis(1_000 + rng.below(2_000));
        std::thread::sleep(run_for.saturating_sub(t0.elapsed()));
        if fault != Fault::Kill {
            match fault {
                Fault::Network(net) => proxy.inject(net)?,
                Fault::SinkStall => {
                    std::thread::sleep((t0 + STALL_ENDS).saturating_duration_since(Instant::now()));
                }
                Fault::Churn => {
                    if let Some(config) = &files.churn_config {
                        churn(bin, config, &files.churn_log)?;
                    }
                }
                _ => {
                    let restarted = match fault {
                        Fault::StoreRestart => Broker::Postgres,
                        _ => t.broker(),
                    };
                    rig.down(&[restarted])?;
                    std::thread::sleep(Duration::from_secs(2));
                    rig.up(&[restarted], Engine::Native)?;
                }
            }
            resume = wait_for_growth(
                &mut run,
                file_len(&files.sink),
                Duration::from_secs(120),
                &mut restarts,
            )?;
        }
        let _ = run.child.kill();
        let _ = run.child.wait();
        let received = (files.lines()? - before) as usize;
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
    Ok(cycles)
}

/// A second member joins the group and leaves it (SIGTERM: it leaves at once) three times,
/// 5 s in and 5 s out.
fn churn(bin: &Path, config: &Path, log: &Path) -> Result<(), String> {
    for _ in 0..3 {
        let mut member = flowgate(bin, config, log)?;
        std::thread::sleep(Duration::from_secs(5));
        stop_gracefully(&mut member);
        std::thread::sleep(Duration::from_secs(5));
    }
    Ok(())
}

/// What a run produced, for the ledger.
struct Run<'a> {
    stream: &'a str,
    files: &'a RunFiles,
    cycles: &'a [Cycle],
    fed: u64,
    drained: bool,
    started: Instant,
}

/// What the ledger found.
struct Tally {
    accepted: usize,
    received: usize,
    distinct: usize,
    lost: Vec<u64>,
    unexpected: usize,
    duplicates: usize,
    consumed_to_end: bool,
    resume_median: f64,
    resume_worst: f64,
    never: usize,
    exits: u32,
}

fn tally(rig: &Rig, t: &dyn Target, run: &Run<'_>) -> Result<Tally, String> {
    let accepted = t.accepted(rig, run.stream, run.fed)?;
    let mut got = received(&run.files.sink);
    got.extend(received(&run.files.churn_sink));
    let mut counts: HashMap<u64, u32> = HashMap::new();
    for v in &got {
        *counts.entry(*v).or_default() += 1;
    }
    let lost: Vec<u64> = accepted
        .iter()
        .filter(|v| !counts.contains_key(v))
        .copied()
        .collect();
    let held: HashSet<u64> = accepted.iter().copied().collect();
    let mut resumes: Vec<f64> = run
        .cycles
        .iter()
        .filter_map(|c| c.resume.map(|d| d.as_secs_f64()))
        .collect();
    resumes.sort_by(f64::total_cmp);
    Ok(Tally {
        accepted: accepted.len(),
        received: got.len(),
        distinct: counts.len(),
        lost,
        unexpected: counts.keys().filter(|v| !held.contains(v)).count(),
        duplicates: got.len() - counts.len(),
        consumed_to_end: run.drained && t.consumed_to_end(rig, run.stream)?,
        resume_median: resumes.get(resumes.len() / 2).copied().unwrap_or(0.0),
        resume_worst: resumes.last().copied().unwrap_or(0.0),
        never: run.cycles.iter().filter(|c| c.resume.is_none()).count(),
        exits: run.cycles.iter().map(|c| c.restarts).sum(),
    })
}

fn ledger(rig: &Rig, t: &dyn Target, o: &Options, run: &Run<'_>) -> Result<(), String> {
    let x = tally(rig, t, run)?;
    let name = t.broker().name();
    let kills = run.cycles.len();
    let store = if o.postgres {
        "PostgreSQL"
    } else {
        "the embedded store"
    };
    let setup = format!("{} Checkpoints in {store}.", t.setup());
    let mut md = format!(
        "# chaos {name}\n\n`cargo xtask chaos {name} --cycles={} --rate={} --seed={}{}{}`: {} cycles in {:.0} s \
         (each ends with a SIGKILL of flowgate; the faults before it, by kind, below); {}\n\n\
         | | |\n|---|---|\n\
         | records the producer was given | {} |\n\
         | records the broker accepted | {} |\n\
         | records received | {} ({} distinct) |\n\
         | **lost** | **{}** |\n\
         | duplicates | {} ({:.2} per kill) |\n\
         | {} | {} |\n\
         | time to resume, median / worst | {:.2} s / {:.2} s |\n\
         | cycles that never resumed | {} |\n\
         | flowgate exits by itself (fatal errors), started again | {} |\n\n{}\n\
         | cycle | fault | ran | resumed in | records | flowgate exited by itself |\n|---:|---|---:|---:|---:|---:|\n",
        o.cycles,
        o.rate,
        o.seed,
        if o.postgres { " --store=postgres" } else { "" },
        if o.mixed { " --mixed" } else { "" },
        kills,
        run.started.elapsed().as_secs_f64(),
        setup,
        run.fed,
        x.accepted,
        x.received,
        x.distinct,
        x.lost.len(),
        x.duplicates,
        x.duplicates as f64 / kills.max(1) as f64,
        t.end_check(),
        if x.consumed_to_end { "yes" } else { "**no**" },
        x.resume_median,
        x.resume_worst,
        x.never,
        x.exits,
        by_fault(run.cycles),
    );
    let mut json_rows = Vec::new();
    for (i, c) in run.cycles.iter().enumerate() {
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
        "{{\"broker\":\"{name}\",\"cycles\":{kills},\"fed\":{},\"accepted\":{},\"received\":{},\"distinct\":{},\"lost\":{},\"duplicates\":{},\"consumed_to_end\":{},\"resume_median_s\":{:.3},\"resume_worst_s\":{:.3},\"never_resumed\":{},\"exits\":{},\"rows\":[{}]}}\n",
        run.fed,
        x.accepted,
        x.received,
        x.distinct,
        x.lost.len(),
        x.duplicates,
        x.consumed_to_end,
        x.resume_median,
        x.resume_worst,
        x.never,
        x.exits,
        json_rows.join(",")
    );
    let dir = &run.files.dir;
    write(&dir.join("report.md"), &md)?;
    write(&dir.join("report.json"), &json)?;
    println!("{}", md.split("| cycle |").next().unwrap_or(&md));
    println!("report: {}", dir.join("report.md").display());
    if !x.lost.is_empty() || x.unexpected > 0 || !x.consumed_to_end || x.never > 0 {
        return Err(format!(
            "chaos {name} failed: {} lost (first {:?}), {} not accepted by the broker, consumed to the end: {}, {} cycles never resumed",
            x.lost.len(),
            x.lost.iter().take(5).collect::<Vec<_>>(),
            x.unexpected,
            x.consumed_to_end,
            x.never
        ));
    }
    Ok(())
}

/// Per kind of fault: cycles, the median and worst time to resume, and exits.
fn by_fault(cycles: &[Cycle]) -> String {
    let mut kinds: Vec<Fault> = Vec::new();
    for c in cycles {
        if !kinds.contains(&c.fault) {
            kinds.push(c.fault);
        }
    }
    let mut md = String::from(
        "| fault | cycles | resume median | resume worst | flowgate exited by itself |\n|---|---:|---:|---:|---:|\n",
    );
    for k in kinds {
        let of: Vec<&Cycle> = cycles.iter().filter(|c| c.fault == k).collect();
        let mut r: Vec<f64> = of
            .iter()
            .filter_map(|c| c.resume.map(|d| d.as_secs_f64()))
            .collect();
        r.sort_by(f64::total_cmp);
        md.push_str(&format!(
            "| {} | {} | {:.2} s | {:.2} s | {} |\n",
            k.name(),
            of.len(),
            r.get(r.len() / 2).copied().unwrap_or(0.0),
            r.last().copied().unwrap_or(0.0),
            of.iter().map(|c| c.restarts).sum::<u32>()
        ));
    }
    md
}

fn write(path: &PathBuf, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(cycles: usize, s: &Schedule) -> Vec<Fault> {
        (0..cycles).map(|n| Fault::of_cycle(n, cycles, s)).collect()
    }

    #[test]
    fn every_kind_of_fault_has_its_place_in_ten_cycles() {
        let kafka = Schedule {
            postgres: true,
            restarts_broker: true,
            churn: true,
        };
        let f = faults(20, &kafka);
        assert_eq!(f[2], Fault::SinkStall);
        assert_eq!(f[4], Fault::Network(Net::ALL[0]));
        assert_eq!(f[14], Fault::Network(Net::ALL[1]));
        assert_eq!(f[6], Fault::Churn);
        assert_eq!(f[7], Fault::StoreRestart);
        assert_eq!(f[9], Fault::BrokerRestart);
        assert_eq!(f.iter().filter(|x| **x == Fault::Kill).count(), 10);
    }

    #[test]
    fn mixed_runs_draw_only_the_faults_the_run_can_use() {
        let rabbitmq = Schedule {
            postgres: false,
            restarts_broker: true,
            churn: false,
        };
        let mut rng = Rng(0x5eed);
        let drawn: Vec<Fault> = (0..200)
            .map(|_| Fault::random(&mut rng, &rabbitmq))
            .collect();
        assert!(!drawn.contains(&Fault::StoreRestart) && !drawn.contains(&Fault::Churn));
        for kind in [
            Fault::Kill,
            Fault::SinkStall,
            Fault::BrokerRestart,
            Fault::Network(Net::Reset),
        ] {
            assert!(drawn.contains(&kind), "{kind:?} drawn in 200 cycles");
        }
    }

    #[test]
    fn a_broker_that_loses_data_on_restart_has_its_store_restarted_instead() {
        let kinesis = Schedule {
            postgres: true,
            restarts_broker: false,
            churn: false,
        };
        let f = faults(10, &kinesis);
        assert_eq!(f[6], Fault::Kill);
        assert_eq!(f[7], Fault::StoreRestart);
        assert_eq!(f[9], Fault::StoreRestart);
        assert!(!f.contains(&Fault::BrokerRestart));
        let short = faults(4, &kinesis);
        assert_eq!(
            short,
            [
                Fault::Kill,
                Fault::Network(Net::Cut),
                Fault::SinkStall,
                Fault::StoreRestart
            ]
        );
    }
}
