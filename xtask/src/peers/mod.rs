//! `cargo xtask bench peers`: flowgate beside the tools a user would otherwise run, in
//! alternating rounds on the same data. Kafka: `flowgate run` (Kafka source → JSON-lines file)
//! against Kafka Connect standalone with the FileStreamSink connector (1 and 4 tasks), Kafka's
//! `kafka-consumer-perf-test` and the raw rdkafka loop of `bench kafka`, on one pre-filled topic
//! with a fresh consumer group per run; then the kill test (flowgate and Connect SIGKILLed while
//! a producer feeds their topic). RabbitMQ: `flowgate run` (RabbitMQ source → JSON-lines file)
//! against RabbitMQ's PerfTest and the raw lapin consumer of `bench rabbitmq`, each draining a
//! queue filled with the same records. Connect and PerfTest come from Maven Central
//! (`xtask/peers/*.xml`) into the rig's cache.
//!
//! Measured per run from outside the process: records/s from its start to the last record in
//! its output and from the first record to the last, CPU seconds (user + system) per million
//! records, peak RSS (VmHWM), and the records in the output, counted. Reported: medians and
//! ranges over the rounds, and ratios taken round by round.

mod kafka;
mod kill;
pub(crate) mod measure;
mod rabbitmq;

use std::path::{Path, PathBuf};
use std::process::Command;

use kafka::Ctx;
use measure::Sample;

use crate::rig::{Broker, Engine, KAFKA_VERSION, Rig};

/// RabbitMQ PerfTest, the latest release on Maven Central when this bench was written.
const PERF_TEST_VERSION: &str = "2.22.1";

struct Options {
    records: u64,
    rounds: usize,
    kills: usize,
    kill_rate: u64,
    rabbit_records: u64,
    parts: Vec<String>,
}

fn options(rest: &[&str]) -> Options {
    Options {
        records: crate::flag(rest, "--records=", 1_000_000),
        rounds: crate::flag(rest, "--rounds=", 5),
        kills: crate::flag(rest, "--kills=", 10),
        kill_rate: crate::flag(rest, "--kill-rate=", 2_000),
        rabbit_records: crate::flag(rest, "--rabbit-records=", 200_000),
        parts: crate::flag(rest, "--only=", "kafka,kill,rabbitmq".to_string())
            .split(',')
            .map(str::to_string)
            .collect(),
    }
}

pub(crate) fn bench_peers(rest: &[&str]) -> Result<(), String> {
    let o = options(rest);
    let rig = Rig::new()?;
    rig.up(&[Broker::Kafka, Broker::Rabbitmq], Engine::Native)?;
    crate::run(
        "build flowgate and the harnesses (release)",
        crate::cargo()
            .args(["build", "--release", "--bin", "flowgate"])
            .args([
                "-p",
                "flowgate-cli",
                "-p",
                "flowgate-kafka",
                "-p",
                "flowgate-rabbitmq",
                "--example",
                "bench_kafka",
                "--example",
                "bench_rabbitmq",
            ]),
    )?;
    let target = target_dir(&rig);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ctx = Ctx {
        rig: &rig,
        dir: target.join(format!("peers/{stamp}")),
        flowgate: target.join("release/flowgate"),
        bench_kafka: target.join("release/examples/bench_kafka"),
        connect_jars: maven_jars(
            &rig,
            "connect-pom.xml",
            "connect",
            KAFKA_VERSION,
            "kafka.version",
        )?,
        stamp,
    };
    let res = run_parts(&ctx, &o, &target);
    kafka::delete_groups(&rig, stamp);
    let _ = std::fs::remove_dir_all(&ctx.dir);
    res
}

fn run_parts(ctx: &Ctx<'_>, o: &Options, target: &Path) -> Result<(), String> {
    let has = |p: &str| o.parts.iter().any(|x| x == p);
    if has("kafka") {
        kafka_throughput(ctx, o)?;
    }
    if has("kill") {
        kill_table(ctx, o)?;
    }
    if has("rabbitmq") {
        rabbitmq_throughput(ctx, o, target)?;
    }
    Ok(())
}

/// `$CARGO_TARGET_DIR`, else the workspace's `target`.
fn target_dir(rig: &Rig) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => rig.root().join(d),
        _ => rig.root().join("target"),
    }
}

/// The jars of `xtask/peers/<pom>` at `version`, fetched with Maven once into the rig's cache.
fn maven_jars(
    rig: &Rig,
    pom: &str,
    name: &str,
    version: &str,
    property: &str,
) -> Result<PathBuf, String> {
    let jars = rig.cache().join(format!("{name}-{version}")).join("jars");
    if std::fs::read_dir(&jars).is_ok_and(|d| d.count() > 5) {
        return Ok(jars);
    }
    crate::rig::need_command("mvn", &["maven"])?;
    crate::run(
        &format!(
            "fetch {name} {version} from Maven Central into {}",
            jars.display()
        ),
        Command::new("mvn")
            .args(["-q", "-B", "-f"])
            .arg(rig.root().join("xtask/peers").join(pom))
            .arg("dependency:copy-dependencies")
            .arg(format!("-D{property}={version}"))
            .arg(format!("-DoutputDirectory={}", jars.display()))
            .arg("-DincludeScope=runtime"),
    )
    .map_err(|e| {
        format!(
            "{e}: check the network and Maven (`mvn -v`), or put the jars in {}",
            jars.display()
        )
    })?;
    Ok(jars)
}

/// One row of a table: a contender and its runs.
struct Row {
    name: String,
    runs: Vec<Sample>,
}

const KAFKA_CONTENDERS: [&str; 6] = [
    "flowgate",
    "connect-1",
    "connect-4",
    "perf-test",
    "raw",
    "raw-tuned",
];

fn kafka_throughput(ctx: &Ctx<'_>, o: &Options) -> Result<(), String> {
    let topic = format!("peers-{}-throughput", ctx.stamp);
    eprintln!(
        "==> fill {topic}: {} records of 100 bytes, 4 partitions",
        o.records
    );
    crate::output(
        Command::new(&ctx.bench_kafka)
            .args(["fill", &topic, &o.records.to_string()])
            .env("FLOWGATE_TEST_KAFKA_BOOTSTRAP", kafka::BOOTSTRAP),
    )?;
    let res = kafka_rounds(ctx, o, &topic);
    let _ = crate::output(
        Command::new(&ctx.bench_kafka)
            .args(["drop", &topic, "0"])
            .env("FLOWGATE_TEST_KAFKA_BOOTSTRAP", kafka::BOOTSTRAP),
    );
    let rows = res?;
    println!(
        "\n### Kafka: {} records of 100 bytes, 4 partitions, {} rounds (medians; range in brackets)\n",
        o.records, o.rounds
    );
    print_rows(&rows);
    let by = |name: &str| rows.iter().find(|r| r.name == name);
    if let (Some(fg), Some(c1), Some(c4), Some(pt), Some(raw)) = (
        by("flowgate"),
        by("connect-1"),
        by("connect-4"),
        by("perf-test"),
        by("raw-tuned"),
    ) {
        println!("\n| ratio (round by round) | median | range |\n|---|---:|---:|");
        for (what, other) in [
            ("Connect, 1 task", c1),
            ("Connect, 4 tasks", c4),
            ("kafka-consumer-perf-test", pt),
            ("raw rdkafka loop (tuned)", raw),
        ] {
            ratio_row(&format!("flowgate / {what}, steady"), fg, other, |s| {
                s.steady
            });
            ratio_row(&format!("flowgate / {what}, from start"), fg, other, |s| {
                s.rate
            });
        }
        ratio_row("Connect (1 task) / flowgate, peak RSS", c1, fg, |s| {
            s.rss_mib
        });
        ratio_row("Connect (1 task) / flowgate, CPU per record", c1, fg, |s| {
            s.cpu_per_m
        });
        ratio_row(
            "kafka-consumer-perf-test / flowgate, peak RSS",
            pt,
            fg,
            |s| s.rss_mib,
        );
        ratio_row(
            "kafka-consumer-perf-test / flowgate, CPU per record",
            pt,
            fg,
            |s| s.cpu_per_m,
        );
    }
    Ok(())
}

fn kafka_rounds(ctx: &Ctx<'_>, o: &Options, topic: &str) -> Result<Vec<Row>, String> {
    let mut rows: Vec<Row> = KAFKA_CONTENDERS
        .iter()
        .map(|n| Row {
            name: n.to_string(),
            runs: Vec::new(),
        })
        .collect();
    for round in 0..o.rounds {
        for row in rows.iter_mut() {
            let n = o.records;
            let s = match row.name.as_str() {
                "flowgate" => kafka::flowgate(ctx, topic, n, round)?,
                "connect-1" => kafka::connect(ctx, topic, n, round, 1)?,
                "connect-4" => kafka::connect(ctx, topic, n, round, 4)?,
                "perf-test" => kafka::perf_test(ctx, topic, n, round)?,
                mode => kafka::raw(ctx, mode, topic, n)?,
            };
            progress(round, &row.name, &s);
            row.runs.push(s);
        }
    }
    Ok(rows)
}

fn progress(round: usize, name: &str, s: &Sample) {
    eprintln!(
        "    round {round} {name:<20} {:>10.0} records/s from start, {:>10.0} steady, {:>6.2} CPU s per M, {:>7.1} MiB, {} records",
        s.rate, s.steady, s.cpu_per_m, s.rss_mib, s.records
    );
}

fn stats(runs: &[Sample], f: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    let v: Vec<f64> = runs.iter().map(f).collect();
    let (lo, hi) = crate::range(&v);
    (crate::median(&v), lo, hi)
}

fn print_rows(rows: &[Row]) {
    println!(
        "| contender | records/s, start → last record | steady records/s, first → last | CPU s per million records | peak RSS, MiB | records in the output |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let cell = |f: &dyn Fn(&Sample) -> f64, digits: usize| {
            let (m, lo, hi) = stats(&r.runs, f);
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        };
        let mut counts: Vec<String> = r.runs.iter().map(|s| s.records.to_string()).collect();
        counts.dedup();
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            cell(&|s| s.rate, 0),
            cell(&|s| s.steady, 0),
            cell(&|s| s.cpu_per_m, 2),
            cell(&|s| s.rss_mib, 1),
            counts.join(", ")
        );
    }
}

/// `a / b` of a figure, round by round: median and range.
fn ratio_row(what: &str, a: &Row, b: &Row, f: impl Fn(&Sample) -> f64) {
    let v: Vec<f64> = a
        .runs
        .iter()
        .zip(&b.runs)
        .map(|(x, y)| f(x) / f(y))
        .collect();
    let (lo, hi) = crate::range(&v);
    println!("| {what} | {:.2} | {lo:.2}–{hi:.2} |", crate::median(&v));
}

fn kill_table(ctx: &Ctx<'_>, o: &Options) -> Result<(), String> {
    let mut reports = Vec::new();
    for c in [
        kill::Contender::Flowgate,
        kill::Contender::Connect(None),
        kill::Contender::Connect(Some(1000)),
    ] {
        reports.push(kill::run(ctx, c, o.kills, o.kill_rate)?);
    }
    let _ = crate::output(
        Command::new(&ctx.bench_kafka)
            .args(["drop", &format!("peers-{}-kill", ctx.stamp), "0"])
            .env("FLOWGATE_TEST_KAFKA_BOOTSTRAP", kafka::BOOTSTRAP),
    );
    println!(
        "\n### Kill test: {} SIGKILLs each, a producer at {} records/s, 4 partitions\n",
        o.kills, o.kill_rate
    );
    println!(
        "| contender | records produced | lines written | lost | repeated | repeated per kill | restart → first record, median (range) | restart → first new record, median (range) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &reports {
        let secs = |v: &[Option<f64>]| {
            let got: Vec<f64> = v.iter().flatten().copied().collect();
            let (lo, hi) = crate::range(&got);
            let never = v.len() - got.len();
            format!(
                "{:.2} s ({lo:.2}–{hi:.2}){}",
                crate::median(&got),
                if never > 0 {
                    format!(", {never} never")
                } else {
                    String::new()
                }
            )
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} |",
            r.contender.label(),
            r.fed,
            r.written,
            r.lost,
            r.repeats,
            r.repeats as f64 / r.kills.max(1) as f64,
            secs(&r.resume_any),
            secs(&r.resume_new)
        );
    }
    Ok(())
}

fn rabbitmq_throughput(ctx: &Ctx<'_>, o: &Options, target: &Path) -> Result<(), String> {
    let perf_test = maven_jars(
        ctx.rig,
        "perf-test-pom.xml",
        "perf-test",
        PERF_TEST_VERSION,
        "perftest.version",
    );
    if let Err(e) = &perf_test {
        println!(
            "\n(RabbitMQ PerfTest {PERF_TEST_VERSION} could not be fetched, so only the raw lapin loop is measured: {e})"
        );
    }
    let r = rabbitmq::Rabbit {
        ctx,
        bench: target.join("release/examples/bench_rabbitmq"),
        perf_test: perf_test.ok(),
    };
    let mut rows: Vec<Row> = ["flowgate", "perf-test", "raw-lapin"]
        .iter()
        .filter(|n| **n != "perf-test" || r.perf_test.is_some())
        .map(|n| Row {
            name: n.to_string(),
            runs: Vec::new(),
        })
        .collect();
    let n = o.rabbit_records;
    for round in 0..o.rounds {
        for row in rows.iter_mut() {
            let queue = format!("peers-{}-{}-{round}", ctx.stamp, row.name);
            r.fill(&queue, n)?;
            let s = match (row.name.as_str(), &r.perf_test) {
                ("flowgate", _) => r.flowgate(&queue, n),
                ("perf-test", Some(jars)) => r.perf_test(jars, &queue, n),
                _ => r.raw(&queue, n),
            };
            r.delete(&queue);
            let s = s?;
            progress(round, &row.name, &s);
            row.runs.push(s);
        }
    }
    println!(
        "\n### RabbitMQ: a classic queue of {n} messages of 100 bytes, {} rounds (medians; range in brackets)\n",
        o.rounds
    );
    print_rows(&rows);
    println!("\n| ratio (round by round) | median | range |\n|---|---:|---:|");
    let fg = &rows[0];
    for other in &rows[1..] {
        ratio_row(
            &format!("flowgate / {}, steady", other.name),
            fg,
            other,
            |s| s.steady,
        );
        ratio_row(
            &format!("flowgate / {}, from start", other.name),
            fg,
            other,
            |s| s.rate,
        );
        ratio_row(
            &format!("{} / flowgate, peak RSS", other.name),
            other,
            fg,
            |s| s.rss_mib,
        );
        ratio_row(
            &format!("{} / flowgate, CPU per record", other.name),
            other,
            fg,
            |s| s.cpu_per_m,
        );
    }
    Ok(())
}
