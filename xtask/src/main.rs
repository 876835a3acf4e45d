//! flowgate's task runner. `cargo xtask help` lists the tasks.
//!
//! Few dependencies on purpose: std, and plotters for the figures of `bench patterns`.

mod chaos;
mod examples;
mod measure;
mod patterns;
mod peers;
mod rig;
mod versions;

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use rig::{Broker, Engine, Rig};

const HELP: &str = "\
cargo xtask <task>

  test                     fmt check, clippy -D warnings, dependency rules, rustdoc with
                           -D warnings, the alert rules' promtool checks and unit tests, unit and in-process tests, then
                           the real-broker tests against `brokers up` (always followed by
                           `brokers down`)
  brokers up [--only a,b] [--engine native|docker]
                           start Kafka, RabbitMQ, Kinesis (kinesis-mock), PostgreSQL, Redis,
                           DynamoDB (moto)
                           and a Prometheus server (scraping 127.0.0.1:19464 with the shipped
                           rules) on 127.0.0.1, wait until each answers, print
                           FLOWGATE_TEST_* vars
  brokers down|status      stop what `up` started (by PID file) / show what runs
  brokers logs NAME        the last lines of a broker's logs
  brokers env              print the FLOWGATE_TEST_* variables
  kafka TOOL [ARGS..]      run a Kafka command-line tool from the rig's jars: consumer-groups,
                           topics, console-producer, console-consumer, producer-perf-test,
                           consumer-perf-test, broker-api-versions
  rabbitmqctl|psql|redis-cli [ARGS..]
                           the broker's own client against the rig (node name and cookie,
                           port, database filled in), e.g. `rabbitmqctl list_queues`
  bench runtime            generator -> null sink through a raw loop and through the runtime
                           (records/s side by side, ratios; with and without the endpoint
                           scraped every second) and instructions per record (callgrind,
                           median of 3 runs: --callgrind-reps=N)
  bench kafka              a pre-filled 4-partition topic read by a raw rdkafka loop and by the
                           flowgate Kafka source (with and without dedup), side by side; then
                           the consumer's RSS behind a 10x slower sink while the backlog grows,
                           and end-to-end latency at fixed rates. --records=N --rounds=N
                           --rss-records=N --throughput-only, --latency-only (each
                           latency row runs min(rounds, 5) times)
  bench rabbitmq           raw lapin publisher and consumer against the flowgate RabbitMQ sink
                           and source on a classic queue, side by side. --records=N --rounds=N
  bench kinesis            a raw GetRecords loop against the flowgate Kinesis source on a
                           4-shard stream of kinesis-mock, alternately. --records=N --rounds=N
  bench http               a raw reqwest loop against the flowgate HTTP sink (same concurrency
                           and batch size) to a local endpoint answering at once and after
                           5 ms, alternately. --records=N --rounds=N
  chaos kafka|rabbitmq|kinesis|all [--cycles=N] [--minutes=M] [--rate=R] [--seed=S]
        [--store=embedded|postgres|redis] [--dedup] [--sink=jsonl|table] [--mixed] [--overlap]
                           faults at volume against the rig's broker: a numbered producer for
                           the whole run, flowgate SIGKILLed every cycle (every tenth after a
                           broker restart under it, every tenth from the fifth after a network
                           fault through toxiproxy: latency, bandwidth, a 15 s cut, resets;
                           every tenth from the third with a sink stalled 20 s; on Kafka every
                           tenth from the seventh after a second member joined and left 3x;
                           with a server store (--store=postgres or redis; PostgreSQL by
                           default for Kinesis, --dedup and --sink=table), every tenth from
                           the eighth after a restart of the store), then a ledger: nothing
                           lost, duplicates counted (with --dedup at most 800 records of a
                           cycle written again per SIGKILL, fault or exit in it; into the
                           PostgreSQL table sink, --sink=table, none),
                           everything consumed by the broker's own tools
                           (kafka-consumer-groups, rabbitmqctl list_queues, Kinesis
                           GetRecords after each checkpoint); report in target/chaos/.
                           Default 100 cycles; --mixed draws each cycle's fault at random
                           from the seed; --overlap starts a network fault (each kind in
                           turn) with every broker or store restart
  kafka-versions [--versions=A,B] [--cycles=N]
                           the Kafka adapter's broker tests, the CLI's SIGKILL tests and a
                           short chaos run against each Apache Kafka release (default
                           3.9.1,4.4.0; the rig runs 4.1.1), one after another; report in
                           target/bench-report/kafka-versions.md
  bench patterns [spike|slow-sink|throttle|storm|all] [--scale=F] [--docs]
                           the patterns users meet, drawn over time from flowgate's /metrics
                           and RSS: a 2x producer spike (overflow block vs shed_oldest), a 10x
                           slower sink on Kafka (lag, RSS, rebalances), a throttling sink
                           (adaptive vs fixed concurrency), a member joining and leaving every
                           5 s (classic vs KIP-848). SVG and CSV in target/bench-report/;
                           --docs copies the SVGs to docs/img/. About 15 minutes for all
  bench peers              flowgate beside its peers on the same data, alternating rounds:
                           Kafka Connect standalone (FileStreamSink, 1 and 4 tasks),
                           kafka-consumer-perf-test and the raw rdkafka loop on a pre-filled
                           topic; the kill test (flowgate and Connect SIGKILLed under a live
                           producer: lost, repeated, time to resume); RabbitMQ PerfTest and the
                           raw lapin loop on a pre-filled queue. --records=N --rounds=N --kills=N
                           --kill-rate=R --rabbit-records=N --only=kafka,kill,rabbitmq
  bench stores             checkpoint commits and dedup checks per second, one key per call vs
                           many, on the embedded store, PostgreSQL and Redis. --seconds=N
  help                     this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let res = match args.as_slice() {
        ["test"] => test(),
        ["brokers", rest @ ..] => brokers(rest),
        ["kafka", tool, rest @ ..] => kafka_tool(tool, rest),
        [client @ ("rabbitmqctl" | "psql" | "redis-cli"), rest @ ..] => rig_client(client, rest),
        ["bench", "runtime", rest @ ..] => bench_runtime(rest),
        ["bench", "kafka", rest @ ..] => bench_kafka(rest),
        ["bench", "rabbitmq", rest @ ..] => bench_rabbitmq(rest),
        ["bench", "stores", rest @ ..] => bench_stores(rest),
        ["bench", "kinesis", rest @ ..] => bench_kinesis(rest),
        ["chaos", rest @ ..] => chaos::chaos(rest),
        ["kafka-versions", rest @ ..] => versions::kafka_versions(rest),
        ["bench", "http", rest @ ..] => bench_http(rest),
        ["bench", "patterns", rest @ ..] => patterns::patterns(rest),
        ["bench", "peers", rest @ ..] => peers::bench_peers(rest),
        ["help"] | [] => {
            print!("{HELP}");
            Ok(())
        }
        other => Err(format!("unknown task {other:?}\n\n{HELP}")),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(step: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("\n==> {step}");
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("{step}: cannot start: {e}"))?;
    eprintln!(
        "==> {step}: {} in {:.1}s",
        if status.success() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!("{step} failed ({status})"))
    }
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn test() -> Result<(), String> {
    let started = Instant::now();
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "cargo clippy -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    dependency_rules()?;
    run(
        "cargo doc -D warnings",
        cargo()
            .args(["doc", "--workspace", "--no-deps", "--all-features", "--lib"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    let rig = Rig::new()?;
    alert_rules(&rig)?;
    // `flowgate top` is tested in a real terminal.
    rig::need_command("tmux", &["tmux"])?;
    run(
        "cargo test (unit, conformance, runtime, crash)",
        cargo().args(["test", "--workspace"]),
    )?;
    // The deploy files and example pipelines, strictly (kubernetes-validate, KEDA's CRD,
    // promtool, `flowgate validate` with the binary the tests just built).
    run(
        "deploy/check.sh",
        Command::new("bash")
            .arg("deploy/check.sh")
            .env("FLOWGATE_BIN", rig.root().join("target/debug/flowgate"))
            .current_dir(rig.root()),
    )?;
    eprintln!("\n==> brokers up");
    let up_started = Instant::now();
    let res = rig.up(&rig::ALL, Engine::Native).and_then(|()| {
        eprintln!(
            "==> brokers up: ok in {:.1}s",
            up_started.elapsed().as_secs_f64()
        );
        let mut cmd = cargo();
        cmd.args([
            "test",
            "-p",
            "flowgate-rig-tests",
            "-p",
            "flowgate-kafka",
            "-p",
            "flowgate-rabbitmq",
            "-p",
            "flowgate-checkpoint",
            "-p",
            "flowgate-kinesis",
            "--features",
            "flowgate-rig-tests/brokers,flowgate-kafka/broker-tests,flowgate-rabbitmq/broker-tests,flowgate-checkpoint/broker-tests,flowgate-kinesis/broker-tests",
            "--",
            "--test-threads",
            "2",
        ]);
        let env = rig.env_all(&rig::ALL);
        cmd.envs(env.iter().cloned());
        run("cargo test (real brokers)", &mut cmd)?;
        // The runnable programs of examples/, each against the brokers it needs.
        examples::run_examples(&env)?;
        // Scenarios that drive the `flowgate` binary against the brokers (SIGKILL loops).
        let mut cli = cargo();
        cli.args([
            "test",
            "-p",
            "flowgate-cli",
            "--features",
            "broker-tests",
            "--test",
            "kafka_crash",
            "--test",
            "rabbitmq_crash",
            "--test",
            "postgres_crash",
            "--test",
            "kinesis_workers",
            "--test",
            "kcl_import",
            "--test",
            "prometheus",
            "--test",
            "top",
        ]);
        cli.envs(env);
        run("cargo test (CLI against real brokers)", &mut cli)?;
        // A short chaos run on each broker (the full ones: 100 cycles each), each with dedup
        // and its duplicates held to account: into the table sink (none at all), through the
        // dedup window with Redis, and with PostgreSQL.
        [
            &["kafka", "--cycles=4", "--sink=table"][..],
            &["rabbitmq", "--cycles=4", "--dedup", "--store=redis"],
            &["kinesis", "--cycles=4", "--dedup", "--store=postgres"],
        ]
        .iter()
        .try_for_each(|args| {
            eprintln!("\n==> chaos {}", args.join(" "));
            chaos::chaos(args)
        })
    });
    eprintln!("\n==> brokers down");
    let down = rig.down(&rig::ALL);
    res?;
    down?;
    eprintln!(
        "\n==> all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The shipped alert rules parse and pass their unit tests (`promtool` from Debian's
/// `prometheus` package).
fn alert_rules(rig: &Rig) -> Result<(), String> {
    let promtool = rig.prometheus_tool("promtool")?;
    let dir = rig.root().join("deploy/prometheus");
    run(
        "promtool check rules",
        Command::new(&promtool)
            .args(["check", "rules", "flowgate-rules.yml"])
            .current_dir(&dir),
    )?;
    run(
        "promtool test rules",
        Command::new(&promtool)
            .args(["test", "rules", "flowgate-rules.test.yml"])
            .current_dir(&dir),
    )
}

fn brokers(args: &[&str]) -> Result<(), String> {
    let rig = Rig::new()?;
    let mut only: Vec<Broker> = rig::ALL.to_vec();
    let mut engine = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match *a {
            "--only" => {
                let list = it
                    .next()
                    .ok_or("--only needs a list, e.g. --only kafka,redis")?;
                only = list
                    .split(',')
                    .map(Broker::parse)
                    .collect::<Result<_, _>>()?;
            }
            "--engine" => {
                engine = Some(match it.next().copied() {
                    Some("native") => Engine::Native,
                    Some("docker") => Engine::Docker,
                    other => return Err(format!("--engine native|docker, not {other:?}")),
                });
            }
            other if args.first() == Some(&"logs") => {
                return rig.logs(Broker::parse(other)?);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{HELP}")),
        }
    }
    match args.first().copied() {
        Some("up") => {
            let engine = engine.unwrap_or_else(Rig::default_engine);
            let started = Instant::now();
            eprintln!(
                "==> brokers up ({engine:?} engine): {}",
                only.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
            );
            rig.up(&only, engine)?;
            eprintln!("==> all ready in {:.1}s", started.elapsed().as_secs_f64());
            for (k, v) in rig.env_all(&only) {
                println!("export {k}={v}");
            }
            Ok(())
        }
        Some("down") => rig.down(&only),
        Some("status") => rig.status(),
        Some("env") => {
            for (k, v) in rig.env_all(&only) {
                println!("export {k}={v}");
            }
            Ok(())
        }
        Some("logs") => {
            Err("brokers logs NAME: which broker? kafka, rabbitmq, kinesis, postgres, redis, dynamodb, prometheus".into())
        }
        _ => Err(format!(
            "brokers: up, down, status, logs NAME or env\n\n{HELP}"
        )),
    }
}

fn kafka_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    let rig = Rig::new()?;
    let class = match tool {
        "consumer-groups" => "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        "topics" => "org.apache.kafka.tools.TopicCommand",
        "console-producer" => rig.kafka_class(rig::CONSOLE_PRODUCER)?,
        "console-consumer" => "org.apache.kafka.tools.consumer.ConsoleConsumer",
        "producer-perf-test" => "org.apache.kafka.tools.ProducerPerformance",
        "consumer-perf-test" => "org.apache.kafka.tools.ConsumerPerformance",
        "broker-api-versions" => "org.apache.kafka.tools.BrokerApiVersionsCommand",
        other => return Err(format!("unknown Kafka tool {other:?}\n\n{HELP}")),
    };
    let status = rig
        .kafka_java(&rig.state_dir(Broker::Kafka))
        .arg(class)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run java: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{tool} failed ({status})"))
    }
}

fn rig_client(client: &str, args: &[&str]) -> Result<(), String> {
    let rig = Rig::new()?;
    let broker = match client {
        "rabbitmqctl" => Broker::Rabbitmq,
        "psql" => Broker::Postgres,
        _ => Broker::Redis,
    };
    let status = rig
        .client(broker)?
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {client}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{client} failed ({status})"))
    }
}

/// flowgate-core and flowgate-runtime depend on no broker client and on no store; adapters
/// and stores depend on core only, and each broker client lives in its own adapter.
fn dependency_rules() -> Result<(), String> {
    eprintln!("\n==> dependency rules (cargo tree)");
    const BROKER_CLIENTS: [&str; 8] = [
        "rdkafka",
        "lapin",
        "aws-sdk-kinesis",
        "aws-sdk-dynamodb",
        "aws-config",
        "redb",
        "sqlx",
        "reqwest",
    ];
    const FLOWGATE: [&str; 7] = [
        "flowgate-runtime",
        "flowgate-checkpoint",
        "flowgate-kafka",
        "flowgate-rabbitmq",
        "flowgate-kinesis",
        "flowgate-http",
        "flowgate-cli",
    ];
    // (crate, the broker client or store engine it may use)
    let rules: [(&str, &[&str]); 7] = [
        ("flowgate-core", &[]),
        ("flowgate-runtime", &[]),
        (
            "flowgate-checkpoint",
            &["redb", "aws-sdk-dynamodb", "aws-config"],
        ),
        ("flowgate-kafka", &["rdkafka"]),
        ("flowgate-rabbitmq", &["lapin"]),
        ("flowgate-kinesis", &["aws-sdk-kinesis", "aws-config"]),
        ("flowgate-http", &["reqwest"]),
    ];
    for (krate, allowed) in rules {
        let tree = output(cargo().args([
            "tree",
            "-p",
            krate,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--all-features",
        ]))?;
        let names: Vec<&str> = tree
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for other in FLOWGATE {
            if other != krate && names.contains(&other) {
                return Err(format!(
                    "{krate} must depend on flowgate-core only, not on {other}"
                ));
            }
        }
        for client in BROKER_CLIENTS {
            if !allowed.contains(&client) && names.contains(&client) {
                return Err(format!(
                    "{krate} must not depend on {client} (found in `cargo tree -p {krate}`): broker clients live in their own adapter"
                ));
            }
        }
    }
    eprintln!("==> dependency rules: ok");
    Ok(())
}

const MODES: [&str; 8] = [
    "raw",
    "runtime",
    "runtime-endpoint",
    "runtime-checkpoint",
    "runtime-checkpoint-dedup",
    "runtime-checkpoint-dedup-keys",
    "sink-1ms",
    "sink-1ms-checkpoint-dedup",
];

fn bench_runtime(rest: &[&str]) -> Result<(), String> {
    let records: u64 = flag(rest, "--records=", 4_000_000);
    let rounds: usize = flag(rest, "--rounds=", 5);
    run(
        "build the harness",
        cargo().args(["build", "--release", "--example", "bench_runtime"]),
    )?;
    let bin = "target/release/examples/bench_runtime";
    let mut results: Vec<(String, Vec<f64>)> =
        MODES.iter().map(|m| (m.to_string(), Vec::new())).collect();
    eprintln!(
        "\n==> throughput: {records} records of 100 bytes, 4 partitions, {rounds} interleaved rounds"
    );
    for round in 0..rounds {
        for (mode, rates) in results.iter_mut() {
            // One durable key per record, or a 1 ms sink: fewer records keep the run short.
            let n = if mode.ends_with("keys") || mode.starts_with("sink") {
                records / 8
            } else {
                records
            };
            let out = output(Command::new(bin).args([mode.as_str(), &n.to_string()]))?;
            let rate: f64 = out
                .split_whitespace()
                .nth(3)
                .and_then(|r| r.parse().ok())
                .ok_or(format!("bad output {out:?}"))?;
            eprintln!("    round {round} {mode:<26} {rate:>12.0} records/s");
            rates.push(rate);
        }
    }
    let raw = median(&results[0].1);
    let rt = median(&results[1].1);
    let sink_1ms = median(&results[6].1);
    println!(
        "\n| mode | records/s (median of {rounds}) | vs raw loop | vs runtime | vs sink-1ms |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (mode, rates) in &results {
        let m = median(rates);
        println!(
            "| {mode} | {m:.0} | {:.3} | {:.3} | {:.3} |",
            m / raw,
            m / rt,
            m / sink_1ms
        );
    }
    callgrind(bin, flag(rest, "--callgrind-reps=", 3))
}

fn bench_kafka(rest: &[&str]) -> Result<(), String> {
    let records: u64 = flag(rest, "--records=", 1_000_000);
    let rounds: usize = flag(rest, "--rounds=", 5);
    let rig = Rig::new()?;
    rig.up(&[Broker::Kafka], Engine::Native)?;
    let env = rig.env_all(&[Broker::Kafka]);
    run(
        "build the harness",
        cargo().args([
            "build",
            "--release",
            "-p",
            "flowgate-kafka",
            "--example",
            "bench_kafka",
        ]),
    )?;
    let bin = "target/release/examples/bench_kafka";
    let topic = format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    );
    // The bench's topics hold gigabytes (10 M records for the memory runs): gone afterwards.
    let drop_topics = || {
        output(
            Command::new(bin)
                .args(["drop", &topic, "0"])
                .envs(env.iter().cloned()),
        )
        .map(|_| ())
    };
    if rest.contains(&"--latency-only") {
        bench_kafka_latency(bin, &env, &topic, rounds.min(5), &rig.kafka_log_dir())?;
        return drop_topics();
    }
    let n = records.to_string();
    output(
        Command::new(bin)
            .args(["fill", &topic, &n])
            .envs(env.iter().cloned()),
    )?;
    // `@N`: the source's prefetch_records (librdkafka's queued.min.messages) set to N.
    let modes = [
        "raw",
        "raw-tuned",
        "raw-stream",
        "flowgate",
        "flowgate-dedup",
        "flowgate@30000",
        "flowgate-endpoint",
    ];
    let runs = interleaved_fields(bin, &modes, rounds, &env, |_| topic.clone(), &n)?;
    // Fields: rate (creation → last record), steady rate (first → last), seconds to the first
    // record, CPU µs per record.
    let col = |i: usize, f: usize| {
        median(
            &runs[i]
                .iter()
                .map(|r| r.get(f).copied().unwrap_or(f64::NAN))
                .collect::<Vec<_>>(),
        )
    };
    // Ratios against `raw` (librdkafka's defaults: its 1 s fetch backoff makes some rounds
    // run at half speed) and against `raw-tuned` (10 ms backoff, steady).
    println!(
        "\n| mode ({records} records of 100 bytes, 4 partitions; medians of {rounds}) | records/s | vs raw | vs raw-tuned | first → last record, records/s | vs raw | vs raw-tuned | CPU µs/record | vs raw |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, mode) in modes.iter().enumerate() {
        println!(
            "| {mode} | {:.0} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3} | {:.2} | {:.2} |",
            col(i, 0),
            col(i, 0) / col(0, 0),
            col(i, 0) / col(1, 0),
            col(i, 1),
            col(i, 1) / col(0, 1),
            col(i, 1) / col(1, 1),
            col(i, 3),
            col(i, 3) / col(0, 3)
        );
    }
    if rest.contains(&"--throughput-only") {
        return drop_topics();
    }
    // Memory: a producer at 400,000 records/s outruns a sink at 40,000 records/s until the
    // backlog holds `rss_records`; the consumer's RSS is sampled every 100 ms.
    let rss_records: u64 = flag(rest, "--rss-records=", 10_000_000);
    println!("\n| slow sink (producer 400,000/s, sink 40,000/s) | result |");
    println!("|---|---|");
    for (label, mode, inflight) in [
        ("runtime defaults", "slow-rss", "10000"),
        ("max_in_flight_per_partition = 2000", "slow-rss", "2000"),
        ("prefetch_records = 30000", "slow-rss@30000", "10000"),
    ] {
        let out = output(
            Command::new(bin)
                .args([
                    mode,
                    &format!("{topic}-rss-{inflight}-{}", label.len()),
                    &rss_records.to_string(),
                    "400000",
                ])
                .env("BENCH_INFLIGHT", inflight)
                .envs(env.iter().cloned()),
        )?;
        println!("| {label} | {} |", out.trim());
    }
    bench_kafka_latency(bin, &env, &topic, rounds.min(5), &rig.kafka_log_dir())?;
    drop_topics()
}

/// End-to-end capacity, then latency at fixed rates and at half the capacity, `rounds` runs
/// of each of the pipeline and the raw loop, alternately.
fn bench_kafka_latency(
    bin: &str,
    env: &[(String, String)],
    topic: &str,
    rounds: usize,
    log_dir: &Path,
) -> Result<(), String> {
    // Where the broker's log is: on a disk, the kernel writes each run's hundreds of megabytes
    // back (30 s after they were written, so during a later run), and that shares the cores
    // and the disk with the producer, the broker and the consumer under test.
    let fs_type = String::from_utf8_lossy(
        &Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(log_dir)
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .trim()
    .to_string();
    println!(
        "\nThe broker's log: {} (file system: {})",
        log_dir.display(),
        if fs_type.is_empty() {
            "unknown"
        } else {
            &fs_type
        }
    );
    if fs_type != "tmpfs" {
        println!(
            "(its writeback shares the machine with the runs; `FLOWGATE_RIG_KAFKA_LOG_DIR=/dev/shm/flowgate-kafka cargo xtask brokers up --only kafka` puts it in memory)"
        );
    }
    // Capacity end to end: the latency pipeline behind a producer sending as fast as it can.
    // On this machine the producer, the broker and the consumer share 2 cores, so this is what
    // the machine delivers end to end, below what the consumer reads alone (table above).
    let field = |out: &str, name: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // Each run's topic (up to a gigabyte) is dropped as soon as the run ends, so that the disk
    // holds one at a time and its deletion is over before the next run starts.
    let run_and_drop = |cmd: &mut Command, run_topic: &str| -> Result<String, String> {
        let out = output(cmd.envs(env.iter().cloned()))?;
        output(
            Command::new(bin)
                .args(["drop", run_topic, "0"])
                .envs(env.iter().cloned()),
        )?;
        std::thread::sleep(std::time::Duration::from_secs(3));
        Ok(out)
    };
    // A broker just started runs its code interpreted until the JIT compiles it: the first
    // capacity run after `up` measured 527,000/s where the next ones measured 696,000 and
    // more (2026-11-28). One run (0) warms it up and is not counted.
    let mut caps = Vec::new();
    for i in 0..4 {
        let run_topic = format!("{topic}-cap-{i}");
        let out = run_and_drop(
            Command::new(bin)
                .args(["capacity", &run_topic, "3000000"])
                .env("BENCH_LINGER_US", "0"),
            &run_topic,
        )?;
        let rate = field(&out, "delivered_per_s=");
        if i == 0 {
            println!("(warm-up run, not counted: {rate:.0} records/s)");
        } else {
            caps.push(rate);
        }
    }
    let capacity = median(&caps);
    let half = ((capacity / 2.0 / 10_000.0).round() * 10_000.0).max(10_000.0) as u64;
    println!(
        "\n| end-to-end capacity (unpaced producer, 3,000,000 records) | runs, records/s | median | half |"
    );
    println!("|---|---|---:|---:|");
    println!(
        "| flowgate, batch linger 0 | {} | {capacity:.0} | {half} |",
        caps.iter()
            .map(|c| format!("{c:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Latency: producer send -> sink write, with a stamped payload, at fixed rates and at half
    // the capacity, the pipeline set for latency (`batch.linger` 0: a partial batch leaves as
    // soon as its lane is free; batches still fill while the sink is busy), and the same
    // through a raw consumer loop (what the client alone adds here). The topics carry the
    // broker's append time, which gives the broker -> sink part (the consumer's own). The
    // producer shares the 2 cores with the broker and the consumer, so single runs' p99 vary a
    // lot: `rounds` runs each, alternately, the medians reported. Each run also shows how busy
    // the machine's two cores were and how much of their time went waiting for the disk.
    println!(
        "\n| end-to-end latency, batch linger 0 | flowgate runs (p50 / p99 µs, machine) | median p99 µs | broker → sink median p99 µs | raw loop runs (p50 / p99 µs, machine) | median p99 µs | broker → sink median p99 µs |"
    );
    println!("|---|---|---:|---:|---|---:|---:|");
    let half_rate = half.to_string();
    let rows: [(&str, &str, &str); 4] = [
        ("", "100000", "1000"),
        ("", "250000", "1000"),
        ("half capacity: ", &half_rate, "1000"),
        (
            "half capacity, checkpoints every 20,000 records: ",
            &half_rate,
            "20000",
        ),
    ];
    for (label, rate, commit_every) in rows {
        let mut results: [(Vec<f64>, Vec<f64>, Vec<String>); 2] = Default::default();
        for i in 0..rounds {
            for (m, mode) in ["latency", "latency-raw"].into_iter().enumerate() {
                let run_topic = format!("{topic}-lat-{rate}-{commit_every}-{m}-{i}");
                let out = run_and_drop(
                    Command::new(bin)
                        .args([mode, &run_topic, rate, "10"])
                        .env("BENCH_LINGER_US", "0")
                        .env("BENCH_COMMIT_EVERY", commit_every),
                    &run_topic,
                )?;
                results[m].0.push(field(&out, "p99_us="));
                results[m].1.push(field(&out, "broker_p99_us="));
                results[m].2.push(format!(
                    "{:.0} / {:.0} ({:.0} % busy, {:.1} % I/O wait)",
                    field(&out, "p50_us="),
                    field(&out, "p99_us="),
                    field(&out, "machine_busy_pct="),
                    field(&out, "iowait_pct=")
                ));
            }
        }
        let cols: Vec<String> = results
            .iter()
            .map(|(p99s, broker, runs)| {
                format!(
                    "{} | {:.0} | {:.0}",
                    runs.join(", "),
                    median(p99s),
                    median(broker)
                )
            })
            .collect();
        println!("| {label}{rate}/s | {} |", cols.join(" | "));
    }
    Ok(())
}

fn bench_rabbitmq(rest: &[&str]) -> Result<(), String> {
    let arg = |name: &str, default: u64| {
        rest.iter()
            .find_map(|a| a.strip_prefix(name))
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    let records = arg("--records=", 200_000);
    let rounds = arg("--rounds=", 3) as usize;
    let rig = Rig::new()?;
    rig.up(&[Broker::Rabbitmq], Engine::Native)?;
    let env = rig.env_all(&[Broker::Rabbitmq]);
    run(
        "build the harness",
        cargo().args([
            "build",
            "--release",
            "-p",
            "flowgate-rabbitmq",
            "--example",
            "bench_rabbitmq",
        ]),
    )?;
    let bin = "target/release/examples/bench_rabbitmq";
    let n = records.to_string();
    // Each round fills a fresh queue with the raw publisher, drains it with the raw consumer,
    // fills it with the flowgate sink, drains it with the flowgate source, then fills it with
    // the raw publisher again and drains it with a raw consumer that acks in batches.
    let modes = [
        "publish-raw",
        "consume-raw",
        "publish-flowgate",
        "consume-flowgate",
        "publish-raw",
        "consume-raw-batched",
    ];
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let rates = interleaved(
        bin,
        &modes,
        rounds,
        &env,
        |round| format!("bench-{stamp}-{round}"),
        &n,
    )?;
    let mut publish_raw = rates[0].clone();
    publish_raw.extend(rates[4].iter().copied());
    let rows = [
        (
            "publish (confirms, window 2000): raw lapin",
            median(&publish_raw),
            None,
        ),
        (
            "publish: flowgate sink (generator, 4 partitions, batches of 500)",
            median(&rates[2]),
            Some(median(&publish_raw)),
        ),
        (
            "consume (prefetch 300): raw lapin, one ack per message",
            median(&rates[1]),
            None,
        ),
        (
            "consume: raw lapin, one `multiple` ack per 100",
            median(&rates[5]),
            None,
        ),
        (
            "consume: flowgate source -> null sink",
            median(&rates[3]),
            Some(median(&rates[1])),
        ),
    ];
    for (what, rate, vs) in rows {
        match vs {
            Some(v) => println!("| {what} | {rate:.0} | {:.3} |", rate / v),
            None => println!("| {what} | {rate:.0} | |"),
        }
    }
    println!(
        "| flowgate source vs the batched raw consumer | | {:.3} |",
        median(&rates[3]) / median(&rates[5])
    );
    Ok(())
}

fn bench_kinesis(rest: &[&str]) -> Result<(), String> {
    let arg = |name: &str, default: u64| {
        rest.iter()
            .find_map(|a| a.strip_prefix(name))
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    let records = arg("--records=", 200_000);
    let rounds = arg("--rounds=", 5) as usize;
    let rig = Rig::new()?;
    rig.up(&[Broker::Kinesis], Engine::Native)?;
    let env = rig.env_all(&[Broker::Kinesis]);
    run(
        "build the harness",
        cargo().args([
            "build",
            "--release",
            "-p",
            "flowgate-kinesis",
            "--example",
            "bench_kinesis",
        ]),
    )?;
    let bin = "target/release/examples/bench_kinesis";
    let n = records.to_string();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let stream = format!("bench-{stamp}");
    let filled = output(
        Command::new(bin)
            .args(["fill", stream.as_str(), n.as_str()])
            .envs(env.iter().cloned()),
    )?;
    eprintln!("    {}", filled.trim());
    // Both read the same 4 shards from TRIM_HORIZON, alternately, at most 5 calls/s per shard.
    let modes = ["consume-raw", "consume-flowgate"];
    let rates = interleaved(bin, &modes, rounds, &env, |_| stream.clone(), &n)?;
    let (raw, flowgate) = (median(&rates[0]), median(&rates[1]));
    println!("| consume {records} records, 4 shards: raw GetRecords loop | {raw:.0} | |");
    println!(
        "| consume: flowgate source -> null sink | {flowgate:.0} | {:.3} |",
        flowgate / raw
    );
    Ok(())
}

fn bench_stores(rest: &[&str]) -> Result<(), String> {
    let seconds = rest
        .iter()
        .find_map(|a| a.strip_prefix("--seconds="))
        .unwrap_or("3");
    let rig = Rig::new()?;
    let servers = [Broker::Postgres, Broker::Redis, Broker::Dynamodb];
    rig.up(&servers, Engine::Native)?;
    let env = rig.env_all(&servers);
    run(
        "build the harness",
        cargo().args([
            "build",
            "--release",
            "-p",
            "flowgate-checkpoint",
            "--features",
            "postgres,redis,dynamodb",
            "--example",
            "bench_stores",
        ]),
    )?;
    let bin = "target/release/examples/bench_stores";
    let mut calls = Vec::new();
    println!("\n| store | operation | keys per call | calls/s | keys/s |");
    println!("|---|---|---:|---:|---:|");
    for store in ["embedded", "postgres", "redis", "dynamodb"] {
        if store == "dynamodb" {
            // moto keeps everything in memory, and copies it for every transaction: start empty.
            rig.down(&[Broker::Dynamodb])?;
            rig.up(&[Broker::Dynamodb], Engine::Native)?;
        }
        let out = output(
            Command::new(bin)
                .args([store, seconds])
                .envs(env.iter().cloned()),
        )?;
        for line in out.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            match cols.as_slice() {
                ["calls", store, op, per_op] => {
                    calls.push(format!("| {store} | {op} | {per_op} |"))
                }
                [store, op, per_call, rate, keys] => {
                    println!("| {store} | {op} | {per_call} | {rate} | {keys} |")
                }
                _ => {}
            }
        }
    }
    println!(
        "\nAPI calls per operation (moto counts the calls; its latency says nothing of AWS's):\n"
    );
    println!("| store | operation | API calls per operation |");
    println!("|---|---|---:|");
    for row in calls {
        println!("{row}");
    }
    Ok(())
}

/// Runs a bench harness `bin MODE TARGET N` for every mode, `rounds` times interleaved (so
/// machine noise spreads over all modes); the rates (4th word of each output) per mode.
fn interleaved(
    bin: &str,
    modes: &[&str],
    rounds: usize,
    env: &[(String, String)],
    target: impl Fn(usize) -> String,
    n: &str,
) -> Result<Vec<Vec<f64>>, String> {
    Ok(interleaved_fields(bin, modes, rounds, env, target, n)?
        .into_iter()
        .map(|runs| runs.iter().map(|fields| fields[0]).collect())
        .collect())
}

/// Like [`interleaved`], keeping every number a run prints from its rate on (`mode records
/// seconds rate …`): per mode, per round, the fields.
fn interleaved_fields(
    bin: &str,
    modes: &[&str],
    rounds: usize,
    env: &[(String, String)],
    target: impl Fn(usize) -> String,
    n: &str,
) -> Result<Vec<Vec<Vec<f64>>>, String> {
    let mut runs: Vec<Vec<Vec<f64>>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        let target = target(round);
        for (i, mode) in modes.iter().enumerate() {
            let out = output(
                Command::new(bin)
                    .args([*mode, target.as_str(), n])
                    .envs(env.iter().cloned()),
            )?;
            let fields: Vec<f64> = out
                .split_whitespace()
                .skip(3)
                .map_while(|f| f.parse().ok())
                .collect();
            let Some(rate) = fields.first().copied() else {
                return Err(format!("bad output {out:?}"));
            };
            let extra: Vec<&str> = out.split_whitespace().skip(4).collect();
            eprintln!(
                "    round {round} {mode:<22} {rate:>12.0} per second {}",
                extra.join(" ")
            );
            runs[i].push(fields);
        }
    }
    Ok(runs)
}

/// flowgate's HTTP sink against a raw `reqwest` loop, same concurrency and batch size, to a
/// local endpoint answering at once and after 5 ms.
fn bench_http(rest: &[&str]) -> Result<(), String> {
    let records: u64 = flag(rest, "--records=", 1_000_000);
    let rounds: usize = flag(rest, "--rounds=", 5);
    run(
        "build the harness",
        cargo().args([
            "build",
            "--release",
            "-p",
            "flowgate-http",
            "--example",
            "bench_http",
        ]),
    )?;
    let bin = "target/release/examples/bench_http";
    println!(
        "\n| endpoint | raw reqwest loop, records/s | flowgate, records/s | ratio (median of {rounds}) |"
    );
    println!("|---|---:|---:|---:|");
    for delay in ["0", "5"] {
        let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            for (i, mode) in ["raw", "flowgate"].into_iter().enumerate() {
                let out = output(Command::new(bin).args([mode, delay, &records.to_string()]))?;
                let rate: f64 = out
                    .split_whitespace()
                    .nth(4)
                    .and_then(|r| r.parse().ok())
                    .ok_or(format!("bad output {out:?}"))?;
                eprintln!("    round {round} {delay} ms {mode:<9} {rate:>12.0} records/s");
                rates[i].push(rate);
            }
        }
        let (raw, flowgate) = (median(&rates[0]), median(&rates[1]));
        println!(
            "| answers after {delay} ms | {raw:.0} | {flowgate:.0} | {:.3} |",
            flowgate / raw
        );
    }
    Ok(())
}

/// The value of `NAME=` among a task's arguments, or `default`.
fn flag<T: std::str::FromStr>(rest: &[&str], name: &str, default: T) -> T {
    rest.iter()
        .find_map(|a| a.strip_prefix(name))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Instructions per record from two callgrind runs of different sizes (start-up cancels out),
/// repeated `reps` times: the count moves with how the threads interleave (how many records
/// each source call returns, how batches fall), so the median and the range are reported.
fn callgrind(bin: &str, reps: usize) -> Result<(), String> {
    if Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        println!(
            "\n(valgrind not installed: `apt-get install -y valgrind` for instructions per record)"
        );
        return Ok(());
    }
    let (small, large) = (100_000u64, 300_000u64);
    println!(
        "\n| mode | instructions per record (callgrind, {small} vs {large} records; median of {reps}) | range |"
    );
    println!("|---|---:|---:|");
    let modes = [
        "raw",
        "runtime",
        "runtime-endpoint",
        "runtime-checkpoint",
        "runtime-checkpoint-dedup",
    ];
    let mut per: Vec<(&str, Vec<f64>)> = Vec::new();
    for mode in modes {
        let mut runs = Vec::with_capacity(reps);
        for _ in 0..reps {
            runs.push(
                (callgrind_total(bin, mode, large)? - callgrind_total(bin, mode, small)?)
                    / (large - small) as f64,
            );
        }
        let (lo, hi) = range(&runs);
        println!("| {mode} | {:.0} | {lo:.0}–{hi:.0} |", median(&runs));
        per.push((mode, runs));
    }
    let med = |mode: &str| {
        per.iter()
            .find(|(m, _)| *m == mode)
            .map_or(0.0, |(_, runs)| median(runs))
    };
    for (what, mode, base) in [
        ("the runtime's own", "runtime", "raw"),
        ("the endpoint's own", "runtime-endpoint", "runtime"),
        ("checkpointing's own", "runtime-checkpoint", "runtime"),
        (
            "positional dedup's own",
            "runtime-checkpoint-dedup",
            "runtime-checkpoint",
        ),
    ] {
        println!(
            "| {what} ({mode} − {base}, medians) | {:.0} | |",
            med(mode) - med(base)
        );
    }
    Ok(())
}

/// The instructions callgrind counted for one run of `bin mode n`.
fn callgrind_total(bin: &str, mode: &str, n: u64) -> Result<f64, String> {
    let out = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            bin,
            mode,
            &n.to_string(),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Collected :"))
        .ok_or(format!("no callgrind total for {mode}"))?;
    line.rsplit(':')
        .next()
        .and_then(|v| v.trim().replace(',', "").parse::<f64>().ok())
        .ok_or("bad callgrind total".to_string())
}

fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}
