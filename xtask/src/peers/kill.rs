//! The kill test: a contender consumes a topic fed by a live producer (Kafka's console
//! producer, numbered records), is SIGKILLed every few seconds and started again; at the end it
//! runs once more until every number is in its output. Counted: records lost, records written
//! more than once, and after each restart the time to the first record written and to the
//! first record not written before.

use std::collections::HashSet;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::kafka::{self, BOOTSTRAP, ConnectSetup, Ctx};
use super::measure::{self, Tail};
use crate::rig::Broker;

/// Which contender, and how it is set up.
#[derive(Clone, Copy)]
pub(super) enum Contender {
    Flowgate,
    /// Connect with `offset.flush.interval.ms` (None: its default, 60 s).
    Connect(Option<u64>),
}

impl Contender {
    pub(super) fn label(self) -> String {
        match self {
            Contender::Flowgate => "flowgate (defaults: embedded store, 10 s session)".into(),
            Contender::Connect(None) => {
                "Connect, FileStreamSink, 1 task (defaults: offset.flush.interval.ms 60 s, 45 s session)".into()
            }
            Contender::Connect(Some(ms)) => {
                format!("Connect, FileStreamSink, 1 task, offset.flush.interval.ms {ms}")
            }
        }
    }

    fn slug(self) -> String {
        match self {
            Contender::Flowgate => "flowgate".into(),
            Contender::Connect(None) => "connect".into(),
            Contender::Connect(Some(ms)) => format!("connect-flush{ms}"),
        }
    }
}

/// What one contender's kill test found.
pub(super) struct Report {
    pub(super) contender: Contender,
    pub(super) kills: usize,
    pub(super) fed: u64,
    pub(super) written: u64,
    pub(super) lost: u64,
    pub(super) repeats: u64,
    /// Seconds from each restart after a kill to the first record written / to the first
    /// record not written before (None: not within 120 s).
    pub(super) resume_any: Vec<Option<f64>>,
    pub(super) resume_new: Vec<Option<f64>>,
}

/// The output so far: every number seen, and how many lines.
struct Ledger {
    tail: Tail,
    seen: HashSet<u64>,
    lines: u64,
}

impl Ledger {
    /// Reads what was appended; whether any line, and whether any new number, came in.
    fn poll(&mut self) -> (bool, bool) {
        let values = self.tail.new_values();
        self.lines += values.len() as u64;
        let mut new = false;
        for v in &values {
            new |= self.seen.insert(*v);
        }
        (!values.is_empty(), new)
    }
}

pub(super) fn run(ctx: &Ctx<'_>, c: Contender, kills: usize, rate: u64) -> Result<Report, String> {
    let slug = c.slug();
    let topic = format!("peers-{}-kill-{slug}", ctx.stamp);
    create_topic(ctx, &topic)?;
    let dir = ctx.run_dir(&format!("kill-{slug}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = ctx
        .rig
        .kafka_console_producer(&topic, &dir.join("producer.log"))?;
    let (mut producer, feeder) = crate::chaos::feed(producer, rate, stop.clone())?;
    let start = || -> Result<Child, String> {
        let mut cmd = match c {
            Contender::Flowgate => {
                let config = dir.join("pipeline.toml");
                let out = dir.join("out.jsonl");
                let group = format!("peers-kill-flowgate-{}-g", ctx.stamp);
                kafka::write(&config, &kafka::flowgate_config(&dir, &topic, &group, &out))?;
                kafka::flowgate_cmd(ctx, &config, &dir.join("flowgate.log"))?
            }
            Contender::Connect(flush_ms) => {
                let name = format!("peers-kill-{slug}-{}-c", ctx.stamp);
                let setup = ConnectSetup {
                    topic: &topic,
                    name: &name,
                    tasks: 1,
                    flush_ms,
                };
                kafka::connect_cmd(ctx, &dir, &setup)?
            }
        };
        cmd.spawn().map_err(|e| format!("cannot start {slug}: {e}"))
    };
    let out = match c {
        Contender::Flowgate => dir.join("out.jsonl"),
        Contender::Connect(_) => dir.join("out.txt"),
    };
    let mut ledger = Ledger {
        tail: Tail::new(&out),
        seen: HashSet::new(),
        lines: 0,
    };
    let (mut resume_any, mut resume_new) = (Vec::new(), Vec::new());
    for cycle in 0..kills {
        let mut child = start()?;
        let (any, new) = wait_resume(&mut ledger, Duration::from_secs(120));
        // Keep consuming for 3 s after the first new record, then SIGKILL.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            ledger.poll();
            std::thread::sleep(Duration::from_millis(20));
        }
        measure::kill(&mut child);
        ledger.poll();
        let show = |d: Option<f64>| d.map_or("never".to_string(), |s| format!("{s:.2} s"));
        eprintln!(
            "    {slug} kill {cycle:>2}: first record after {}, first new record after {}, {} lines so far",
            show(any),
            show(new),
            ledger.lines
        );
        // The first start follows no kill.
        if cycle > 0 {
            resume_any.push(any);
            resume_new.push(new);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let fed = feeder.join().unwrap_or(0);
    let _ = producer.wait();
    // The last run: until every number is in the output.
    let mut child = start()?;
    let (any, new) = wait_resume(&mut ledger, Duration::from_secs(120));
    resume_any.push(any);
    resume_new.push(new);
    let deadline = Instant::now() + Duration::from_secs(300);
    while (0..fed).any(|v| !ledger.seen.contains(&v)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        ledger.poll();
    }
    measure::kill(&mut child);
    ledger.poll();
    let lost = (0..fed).filter(|v| !ledger.seen.contains(v)).count() as u64;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Report {
        contender: c,
        kills,
        fed,
        written: ledger.lines,
        lost,
        repeats: ledger.lines - ledger.seen.len() as u64,
        resume_any,
        resume_new,
    })
}

/// Seconds to the first line written, and to the first new number, after a (re)start.
fn wait_resume(ledger: &mut Ledger, limit: Duration) -> (Option<f64>, Option<f64>) {
    let started = Instant::now();
    let (mut any, mut new) = (None, None);
    while new.is_none() && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
        let (a, n) = ledger.poll();
        let t = started.elapsed().as_secs_f64();
        if a && any.is_none() {
            any = Some(t);
        }
        if n {
            new = Some(t);
        }
    }
    (any, new)
}

pub(super) fn create_topic(ctx: &Ctx<'_>, topic: &str) -> Result<(), String> {
    crate::run(
        &format!("create the topic {topic}"),
        ctx.rig.kafka_java(&ctx.rig.state_dir(Broker::Kafka)).args([
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server",
            BOOTSTRAP,
            "--create",
            "--topic",
            topic,
            "--partitions",
            "4",
            "--replication-factor",
            "1",
        ]),
    )
}
