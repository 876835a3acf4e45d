//! `cargo xtask chaos kafka|rabbitmq|kinesis|all [--cycles=N] [--minutes=M] [--rate=R]
//! [--seed=S] [--store=embedded|postgres|redis] [--dedup] [--sink=jsonl|table] [--mixed]
//! [--overlap]`:
//! faults at volume against a real broker, with one ledger at the end.
//!
//! A producer writes uniquely numbered records for the whole run (Kafka's own console
//! producer; for RabbitMQ a pika client publishing with confirms, each number its message id;
//! for Kinesis a boto3 client calling `PutRecords`); `flowgate run` consumes them into a
//! JSON-lines sink (or, with `--sink=table`, the PostgreSQL table sink), reaching the broker
//! through a toxiproxy proxy. Each cycle starts flowgate, lets it run 1–3 s, and ends with a
//! fault: SIGKILL of flowgate; or (every tenth cycle, and the last of a run of fewer than ten)
//! the broker stopped and restarted under the running pipeline, then SIGKILL; or (every tenth
//! from the fifth, and the second of a short run: a cut) a network fault through the proxy —
//! latency, a bandwidth limit, a cut longer than the Kafka session timeout, connection resets,
//! in turn — then SIGKILL; or (every tenth from the third, and the third of a short run) a
//! sink that stalls for 20 s, then SIGKILL; or, with a server store (PostgreSQL or Redis),
//! (every tenth from the eighth) the store restarted, then SIGKILL; or, for Kafka, (every
//! tenth from the seventh) a second member of the group joining and leaving every 5 s, three
//! times, then SIGKILL. The harness is the supervisor: a flowgate that exits by itself is
//! started again, and counted. After the last cycle the producer stops, flowgate runs once
//! more to the end and stops on SIGTERM. The ledger: every record the broker accepted was
//! received (lost = 0); duplicates counted per cycle and, with `--dedup`, held to the dedup
//! window per SIGKILL, fault or exit ([`DEDUP_CONCURRENCY`] × [`DEDUP_BATCH`]), into the table sink
//! to none; and the broker's own tools show everything consumed (Kafka: the group's committed
//! offsets equal the end of every partition, by kafka-consumer-groups; RabbitMQ: the queue
//! holds no message, ready or unacknowledged, by `rabbitmqctl list_queues`; Kinesis:
//! `GetRecords` after each shard's checkpoint returns nothing). The report (one row per cycle:
//! fault, time to resume, records received, duplicates) goes to
//! `target/chaos/<broker>-<time>/report.{md,json}`. With `--mixed` each cycle's fault is drawn
//! at random from the seed instead; with `--overlap` a network fault (each kind in turn) starts
//! with every broker or store restart.

mod kafka;
mod kinesis;
mod ledger;
mod network;
mod output;
mod rabbitmq;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::rig::{Broker, Engine, Rig};
use ledger::{Run, ledger};
use network::{Net, Toxiproxy};
use output::{Mark, Output};

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
    /// The broker's own tools show every record of `stream` consumed by the pipeline of
    /// `config`.
    fn consumed_to_end(&self, rig: &Rig, stream: &str, config: &Path) -> Result<bool, String>;
    /// How the run is set up, and the check `consumed_to_end` makes, for the report.
    fn setup(&self) -> &'static str;
    fn end_check(&self) -> &'static str;
    /// The ledger reads the checkpoints while the pipeline runs: they must be in a store
    /// another process can read (PostgreSQL or Redis).
    fn needs_shared_store(&self) -> bool {
        false
    }
    /// The `dedup.key` of the pipeline with `--dedup`.
    fn dedup_key(&self) -> &'static str {
        "source_position"
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
    /// The store (PostgreSQL or Redis, with `--store=postgres|redis`) stopped and restarted.
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
            7 if t.store => Fault::StoreRestart,
            9 => Fault::BrokerRestart,
            _ => Fault::Kill,
        };
        match fault {
            Fault::BrokerRestart if !t.restarts_broker && t.store => Fault::StoreRestart,
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
        if t.store {
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
    /// The store is a server (PostgreSQL or Redis), which can be restarted.
    store: bool,
    restarts_broker: bool,
    /// A second group member can churn.
    churn: bool,
}

struct Cycle {
    fault: Fault,
    /// With `--overlap`: the network fault injected as the restart began.
    overlap: Option<Net>,
    /// From the fault's end (flowgate started again, the broker back, or the network fault
    /// lifted) to the next record in the sink.
    resume: Option<Duration>,
    ran: Duration,
    /// Where the sink stood when the cycle started.
    from: Mark,
    /// Times flowgate exited by itself (a fatal error) and was started again.
    restarts: u32,
}

impl Cycle {
    /// The cycle's fault, with the network fault overlapping it.
    fn label(&self) -> String {
        let name = self.fault.name();
        match self.overlap {
            Some(net) => format!(
                "{} and {net_name} at once, then SIGKILL",
                name.trim_end_matches(", then SIGKILL"),
                net_name = net.name()
            ),
            None => name.to_string(),
        }
    }
}

#[derive(Clone, Copy)]
struct Options {
    cycles: usize,
    minutes: Option<f64>,
    rate: u64,
    seed: u64,
    /// Where checkpoints and dedup marks live (`--store`); `None`: the embedded store, or
    /// PostgreSQL where the run needs a server.
    store: Option<Store>,
    /// Dedup on (`--dedup`): the ledger holds each cycle's duplicates to the window.
    dedup: bool,
    /// Into the PostgreSQL table sink (`--sink=table`), with dedup: no duplicate at all.
    table: bool,
    /// Each cycle's fault drawn at random from the seed, rather than in the fixed order.
    mixed: bool,
    /// Each broker or store restart with a network fault at once (each kind in turn).
    overlap: bool,
}

impl Options {
    fn store(&self) -> Store {
        self.store.unwrap_or(Store::Embedded)
    }

    /// The options for `t`: the store chosen, dedup with the table sink, the rate capped.
    fn resolve(&self, t: &dyn Target) -> Result<Options, String> {
        let name = t.broker().name();
        let dedup = self.dedup || self.table;
        let store = match self.store {
            Some(s) => s,
            None if dedup || t.needs_shared_store() => Store::Postgres,
            None => Store::Embedded,
        };
        if self.table && store != Store::Postgres {
            return Err(format!(
                "chaos {name}: --sink=table writes rows and dedup marks in one PostgreSQL transaction: \
                 use --store=postgres (or leave --store out)"
            ));
        }
        // The ledger reads the checkpoints while flowgate runs; a churning second member
        // must see the first's dedup marks.
        let why = if t.needs_shared_store() {
            Some("its ledger reads the checkpoints while flowgate runs")
        } else if dedup && t.churn_member_source("").is_some() {
            Some("with --dedup, the churning second member must see the first's dedup marks")
        } else {
            None
        };
        if let (Some(why), Store::Embedded) = (why, store) {
            return Err(format!(
                "chaos {name}: {why}, which the embedded store (one process) cannot serve: use \
                 --store=postgres or --store=redis"
            ));
        }
        Ok(Options {
            store: Some(store),
            dedup,
            rate: self.rate.min(t.max_rate()),
            ..*self
        })
    }
}

/// A child process killed and reaped when dropped: a run that fails half-way leaves no
/// flowgate, producer or group member running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Where the sink stands, asked again for up to 10 s while it cannot tell (PostgreSQL
/// holding the table just restarted, say).
fn mark(rig: &Rig, output: &Output) -> Result<Mark, String> {
    let mut res = output.mark(rig);
    for _ in 0..10 {
        if res.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        res = output.mark(rig);
    }
    res
}

/// Where a run keeps checkpoints and dedup marks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Store {
    Embedded,
    Postgres,
    Redis,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Embedded => "embedded",
            Store::Postgres => "postgres",
            Store::Redis => "redis",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Store::Embedded => "the embedded store",
            Store::Postgres => "PostgreSQL",
            Store::Redis => "Redis",
        }
    }

    /// The rig's server holding the store, if it is one.
    fn server(self) -> Option<Broker> {
        match self {
            Store::Embedded => None,
            Store::Postgres => Some(Broker::Postgres),
            Store::Redis => Some(Broker::Redis),
        }
    }
}

/// With `--dedup`: sink batches in flight at most. With [`DEDUP_BATCH`], the duplicate
/// window per crash (docs/guarantees.md).
const DEDUP_CONCURRENCY: u64 = 8;
/// With `--dedup`: records per sink batch at most.
const DEDUP_BATCH: u64 = 100;

fn options(args: &[&str]) -> Result<(String, Options), String> {
    let mut target = "kafka".to_string();
    let mut o = Options {
        cycles: 100,
        minutes: None,
        rate: 2_000,
        seed: 0x5eed,
        store: None,
        dedup: false,
        table: false,
        mixed: false,
        overlap: false,
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
            o.store = Some(match v {
                "embedded" => Store::Embedded,
                "postgres" => Store::Postgres,
                "redis" => Store::Redis,
                _ => return Err(format!("{a}: expected embedded, postgres or redis")),
            });
        } else if let Some(v) = a.strip_prefix("--sink=") {
            o.table = match v {
                "table" => true,
                "jsonl" => false,
                _ => return Err(format!("{a}: expected jsonl or table")),
            };
        } else if *a == "--dedup" {
            o.dedup = true;
        } else if *a == "--mixed" {
            o.mixed = true;
        } else if *a == "--overlap" {
            o.overlap = true;
        } else if !a.starts_with("--") {
            target = a.to_string();
        } else {
            return Err(format!("chaos: unknown argument {a}"));
        }
    }
    Ok((target, o))
}

/// The PostgreSQL schema holding a run's checkpoints, dedup marks and rows (with
/// `--store=postgres`).
fn pg_schema(stream: &str) -> String {
    stream.replace('-', "_")
}

/// Waits until the sink writes again; how long that took (its [`Output::progress`] is
/// polled: reading a sink of millions of records would slow the measurement down). Acts as a
/// supervisor meanwhile: a flowgate that exits (a fatal error) is started again, and counted
/// in `restarts`.
fn wait_for_growth(
    run: &mut Flowgate<'_>,
    limit: Duration,
    restarts: &mut u32,
) -> Result<Option<Duration>, String> {
    let mut before = run.output.progress(run.rig);
    let started = Instant::now();
    while started.elapsed() < limit {
        match (before, run.output.progress(run.rig)) {
            (Some(b), Some(now)) if now > b => return Ok(Some(started.elapsed())),
            // The store holding the table was away: growth counts from its first answer.
            (None, now) => before = now,
            _ => {}
        }
        if let Ok(Some(status)) = run.child.try_wait() {
            eprintln!("    flowgate exited ({status}); starting it again");
            *restarts += 1;
            run.child = Reaped(flowgate(run.bin, run.config, run.log)?);
        }
        std::thread::sleep(run.output.poll_every());
    }
    Ok(None)
}

/// A running `flowgate run` and how to start it again.
struct Flowgate<'a> {
    child: Reaped,
    bin: &'a Path,
    config: &'a Path,
    log: &'a Path,
    output: &'a Output,
    rig: &'a Rig,
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
    for t in &targets {
        o.resolve(t.as_ref())?;
    }
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
    /// Where the pipeline (and the churning member) writes.
    output: Output,
    config: PathBuf,
    /// The same pipeline with a sink that stalls (`Fault::SinkStall`).
    stall_config: PathBuf,
    log: PathBuf,
    /// The churning second member's pipeline (`Fault::Churn`) and log.
    churn_config: Option<PathBuf>,
    churn_log: PathBuf,
}

/// The rig's URL of `server` (`FLOWGATE_TEST_<NAME>_URL`).
fn server_url(rig: &Rig, server: Broker) -> Result<String, String> {
    let key = format!("FLOWGATE_TEST_{}_URL", server.name().to_uppercase());
    server
        .env(rig)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .ok_or_else(|| format!("the rig gives no {key} for {}", server.name()))
}

/// The `[store]` section of a run's pipelines (`own`: the embedded store's directory).
fn store_toml(rig: &Rig, o: &Options, stream: &str, own: &Path) -> Result<String, String> {
    Ok(match o.store() {
        Store::Embedded => format!("type = \"embedded\"\npath = \"{}\"", own.display()),
        Store::Postgres => format!(
            "type = \"postgres\"\nurl = \"{}\"\nschema = \"{}\"",
            server_url(rig, Broker::Postgres)?,
            pg_schema(stream)
        ),
        Store::Redis => format!(
            "type = \"redis\"\nurl = \"{}\"\nprefix = \"{stream}\"",
            server_url(rig, Broker::Redis)?
        ),
    })
}

fn run_files(
    rig: &Rig,
    t: &dyn Target,
    stream: &str,
    stamp: u64,
    o: &Options,
) -> Result<RunFiles, String> {
    let dir = rig
        .root()
        .join(format!("target/chaos/{}-{stamp}", t.broker().name()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let output = if o.table {
        Output::Table {
            schema: pg_schema(stream),
            pipeline: stream.to_string(),
        }
    } else {
        Output::Jsonl {
            main: dir.join("sink.jsonl"),
            churn: dir.join("sink-churn.jsonl"),
        }
    };
    let dedup = if o.dedup {
        format!(
            "[dedup]\nkey = \"{}\"\n\n[runtime.batch]\nmax_records = {DEDUP_BATCH}\n\n\
             [runtime.concurrency]\nmax = {DEDUP_CONCURRENCY}\n\n",
            t.dedup_key()
        )
    } else {
        String::new()
    };
    let pipeline = |source: &str, sink: &str, store: &str| {
        format!(
            "name = \"{stream}\"\n\n{source}\n\n{sink}\n[store]\n{store}\n\n{dedup}\
             [runtime.commit]\nevery = \"200ms\"\n"
        )
    };
    let source = t.source(stream);
    let store = store_toml(rig, o, stream, &dir.join("data"))?;
    let config = dir.join("pipeline.toml");
    let stall_config = dir.join("pipeline-stalling-sink.toml");
    write(
        &config,
        &pipeline(&source, &output.sink_toml(false, ""), &store),
    )?;
    write(
        &stall_config,
        &pipeline(
            &source,
            &output.sink_toml(
                false,
                "faults = { stall_after = \"1s\", stall_for = \"20s\" }\n",
            ),
            &store,
        ),
    )?;
    // The second member shares a server store; with the embedded store it keeps its own (a
    // partition coming back then starts from the group's committed offset or an older
    // checkpoint of the first member: repeats, never a gap).
    let churn_config = match t.churn_member_source(stream) {
        Some(source) => {
            let store = store_toml(rig, o, stream, &dir.join("data-churn"))?;
            let path = dir.join("pipeline-churn-member.toml");
            write(
                &path,
                &pipeline(&source, &output.sink_toml(true, ""), &store),
            )?;
            Some(path)
        }
        None => None,
    };
    Ok(RunFiles {
        log: dir.join("flowgate.log"),
        churn_log: dir.join("flowgate-churn.log"),
        dir,
        output,
        config,
        stall_config,
        churn_config,
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
    let o = &o.resolve(t)?;
    let mut brokers = vec![t.broker()];
    brokers.extend(o.store().server());
    rig.up(&brokers, Engine::Native)?;
    let bin = rig.root().join("target/debug/flowgate");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stream = t.prepare(rig, stamp)?;
    let files = run_files(rig, t, &stream, stamp, o)?;
    let (listen, upstream) = t.proxy();
    let proxy = Toxiproxy::start(rig, listen, upstream, &files.dir.join("toxiproxy.log"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = t.producer(rig, &stream, &files.dir.join("producer.log"))?;
    let (producer_child, feeder) = feed(producer, o.rate, stop.clone())?;
    let mut producer_child = Reaped(producer_child);
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
    let drain_from = mark(rig, &files.output)?;
    let mut last = Reaped(flowgate(&bin, &files.config, &files.log)?);
    let drain_started = Instant::now();
    let mut drained = false;
    while drain_started.elapsed() < Duration::from_secs(180) {
        match t.consumed_to_end(rig, &stream, &files.config) {
            Ok(true) => {
                drained = true;
                break;
            }
            Ok(false) => {}
            Err(e) => eprintln!("    cannot tell yet whether everything was consumed: {e}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop_gracefully(&mut last);
    let run = Run {
        stream: &stream,
        dir: &files.dir,
        config: &files.config,
        output: &files.output,
        cycles: &cycles,
        drain_from,
        fed,
        drained,
        started,
    };
    let res = ledger(rig, t, o, &run);
    if res.is_err() {
        // The evidence stays: the broker's records and the store's checkpoints, marks, rows.
        let kept = match o.store() {
            Store::Embedded => format!("{}", files.dir.join("data").display()),
            Store::Postgres => format!("PostgreSQL's schema {}", pg_schema(&stream)),
            Store::Redis => format!("Redis's keys {stream}:*"),
        };
        eprintln!("    kept for inspection: {stream} in the broker, and {kept}");
        return res;
    }
    if let Err(e) = t.cleanup(rig, &stream) {
        eprintln!("    could not delete {stream}: {e}");
    }
    if let Err(e) = drop_store(rig, o.store(), &stream) {
        eprintln!("    could not delete the run's {}: {e}", o.store().label());
    }
    res
}

/// Deletes what the run kept in a server store (a 100-cycle run leaves millions of rows
/// and marks), once the ledger is written.
fn drop_store(rig: &Rig, store: Store, stream: &str) -> Result<(), String> {
    match store {
        Store::Embedded => Ok(()),
        Store::Postgres => crate::output(rig.client(Broker::Postgres)?.args([
            "-c",
            &format!(
                "SET client_min_messages TO warning; DROP SCHEMA IF EXISTS {} CASCADE",
                pg_schema(stream)
            ),
        ]))
        .map(drop),
        Store::Redis => {
            // SCAN, not KEYS: a run leaves millions of marks, and KEYS would block Redis.
            let keys = crate::output(rig.client(Broker::Redis)?.args([
                "--scan",
                "--pattern",
                &format!("{stream}:*"),
            ]))?;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            for chunk in keys.chunks(10_000) {
                let out = crate::output(rig.client(Broker::Redis)?.arg("UNLINK").args(chunk))?;
                // redis-cli exits 0 on a server error, and says so.
                if out.starts_with("ERR") || out.contains("(error)") {
                    return Err(format!("redis-cli UNLINK: {}", out.trim()));
                }
            }
            Ok(())
        }
    }
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
    let mut overlaps = 0;
    for n in 0..o.cycles {
        if deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
        let schedule = Schedule {
            store: o.store().server().is_some(),
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
        let overlap = match fault {
            Fault::BrokerRestart | Fault::StoreRestart if o.overlap => {
                overlaps += 1;
                Some(Net::ALL[(overlaps - 1) % Net::ALL.len()])
            }
            _ => None,
        };
        let from = mark(rig, &files.output)?;
        let t0 = Instant::now();
        let mut restarts = 0;
        let mut run = Flowgate {
            child: Reaped(flowgate(bin, config, &files.log)?),
            bin,
            config,
            log: &files.log,
            output: &files.output,
            rig,
        };
        let mut resume = wait_for_growth(&mut run, Duration::from_secs(60), &mut restarts)?;
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
                        Fault::StoreRestart => o.store().server().ok_or(
                            "a store restart was scheduled without a server store (a bug of the schedule)",
                        )?,
                        _ => t.broker(),
                    };
                    let restart = || -> Result<(), String> {
                        rig.down(&[restarted])?;
                        std::thread::sleep(Duration::from_secs(2));
                        rig.up(&[restarted], Engine::Native)
                    };
                    match overlap {
                        Some(net) => std::thread::scope(|s| {
                            let network = s.spawn(|| proxy.inject(net));
                            let restarted = restart();
                            let network = network.join().unwrap_or_else(|_| {
                                Err("the network fault's thread panicked".into())
                            });
                            restarted.and(network)
                        })?,
                        None => restart()?,
                    }
                }
            }
            resume = wait_for_growth(&mut run, Duration::from_secs(120), &mut restarts)?;
        }
        let _ = run.child.kill();
        let _ = run.child.wait();
        let to = mark(rig, &files.output)?;
        // Row ids count rolled-back inserts too: for the table sink an estimate.
        let received = (to.0 + to.1).saturating_sub(from.0 + from.1);
        eprintln!(
            "    cycle {n:>3} {:<30} ran {:>5.1}s, resumed in {}, {received} records{}",
            match overlap {
                Some(net) => format!("{} + {}", fault.name(), net.name()),
                None => fault.name().to_string(),
            },
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
            overlap,
            resume,
            ran: t0.elapsed(),
            from,
            restarts,
        });
    }
    Ok(cycles)
}

/// A second member joins the group and leaves it (SIGTERM: it leaves at once) three times,
/// 5 s in and 5 s out.
fn churn(bin: &Path, config: &Path, log: &Path) -> Result<(), String> {
    for _ in 0..3 {
        let mut member = Reaped(flowgate(bin, config, log)?);
        std::thread::sleep(Duration::from_secs(5));
        stop_gracefully(&mut member);
        std::thread::sleep(Duration::from_secs(5));
    }
    Ok(())
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
            store: true,
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
            store: false,
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
            store: true,
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
