//! `flowgate`: run a pipeline from a config file, watch it, inspect and reset checkpoints.

mod config;
mod observe;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use flowgate_checkpoint::{EmbeddedStore, MemoryStore, PostgresStore, TableMode};
use flowgate_core::{
    CheckpointStore, DedupStore, Error, ErrorKind, LeaseStore, PartitionId, Sink, Source,
};
use flowgate_runtime::adapters::{
    FaultConfig, FaultInjectingSink, GeneratorConfig, GeneratorSource, JsonLinesConfig,
    JsonLinesSink, NullSink, Spike,
};
use flowgate_runtime::{Pipeline, RuntimeSettings, Shutdown, Stats};

use crate::config::{PipelineConfig, SinkConfig, SourceConfig, StoreConfig};

#[derive(Parser)]
#[command(
    name = "flowgate",
    version,
    about = "Multi-broker streaming with bounded lag and no lost records"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline described by a TOML or YAML file until it ends or SIGINT/SIGTERM.
    Run {
        /// The pipeline file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print a status line every second on stderr.
        #[arg(long)]
        status: bool,
        /// Stop (drain, final checkpoint) after this long, e.g. `30s`.
        #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
        duration: Option<Duration>,
        /// Serve /metrics, /health, /ready and /status here instead of
        /// `observability.listen` (default 127.0.0.1:9464); port 0 picks a free one.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Generator → slow sink with a 2× rate spike, on the embedded store; run it again and it
    /// resumes from its checkpoints.
    Quickstart {
        /// Data directory of the embedded store.
        #[arg(long, default_value = "./flowgate-data")]
        data: PathBuf,
        /// How long to run.
        #[arg(long, default_value = "20s", value_parser = humantime_serde::re::humantime::parse_duration)]
        duration: Duration,
    },
    /// Inspect or reset the checkpoints of the embedded store.
    Checkpoints {
        #[command(subcommand)]
        action: CheckpointAction,
    },
}

#[derive(Subcommand)]
enum CheckpointAction {
    /// Print the checkpoints of a pipeline.
    Show {
        /// Data directory of the embedded store.
        #[arg(long, default_value = "./flowgate-data")]
        data: PathBuf,
        /// Pipeline name.
        #[arg(long)]
        pipeline: String,
    },
    /// Forget checkpoints of a pipeline (all, or the given partitions).
    Reset {
        /// Data directory of the embedded store.
        #[arg(long, default_value = "./flowgate-data")]
        data: PathBuf,
        /// Pipeline name.
        #[arg(long)]
        pipeline: String,
        /// Only these partitions.
        #[arg(long)]
        partition: Vec<String>,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOWGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Run {
            config,
            status,
            duration,
            metrics_addr,
        } => {
            init_logging("info");
            run_file(&config, status, duration, metrics_addr).await
        }
        Command::Quickstart { data, duration } => {
            init_logging("warn");
            quickstart(&data, duration).await
        }
        Command::Checkpoints { action } => {
            init_logging("warn");
            checkpoints(action).await
        }
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(if e.kind() == ErrorKind::Config { 2 } else { 1 });
    }
}

async fn run_file(
    path: &Path,
    status: bool,
    duration: Option<Duration>,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<(), Error> {
    let mut cfg = config::load(path)?;
    if metrics_addr.is_some() {
        cfg.observability.listen = metrics_addr;
        cfg.observability.disabled = false;
    }
    run_config(cfg, status, duration).await
}

struct Stores {
    checkpoint: Option<Arc<dyn CheckpointStore>>,
    dedup: Option<Arc<dyn DedupStore>>,
    /// The same store's leases (Kinesis shards), fencing its own checkpoints.
    #[cfg_attr(not(feature = "kinesis"), allow(dead_code))]
    leases: Option<Arc<dyn LeaseStore>>,
    embedded: Option<EmbeddedStore>,
    postgres: Option<Arc<PostgresStore>>,
}

async fn open_store(cfg: &StoreConfig) -> Result<Stores, Error> {
    Ok(match cfg {
        StoreConfig::Embedded(e) => {
            let s = EmbeddedStore::open_dir(&e.path).await?;
            Stores {
                checkpoint: Some(Arc::new(s.clone())),
                dedup: Some(Arc::new(s.clone())),
                leases: Some(Arc::new(s.clone())),
                embedded: Some(s),
                postgres: None,
            }
        }
        StoreConfig::Postgres(c) => {
            let s = PostgresStore::connect(c.clone()).await?;
            Stores {
                checkpoint: Some(s.clone()),
                dedup: Some(s.clone()),
                leases: Some(s.clone()),
                embedded: None,
                postgres: Some(s),
            }
        }
        StoreConfig::Redis(c) => {
            let s = flowgate_checkpoint::RedisStore::connect(c.clone()).await?;
            Stores {
                checkpoint: Some(s.clone()),
                dedup: Some(s.clone()),
                leases: Some(s),
                embedded: None,
                postgres: None,
            }
        }
        StoreConfig::Memory => {
            let s = Arc::new(MemoryStore::new());
            Stores {
                checkpoint: Some(s.clone()),
                dedup: Some(s.clone()),
                leases: Some(s),
                embedded: None,
                postgres: None,
            }
        }
        StoreConfig::None => Stores {
            checkpoint: None,
            dedup: None,
            leases: None,
            embedded: None,
            postgres: None,
        },
    })
}

async fn make_sink(
    cfg: &SinkConfig,
    stores: &Stores,
    pipeline: &str,
    key: &str,
) -> Result<Box<dyn Sink>, Error> {
    let (sink, faults): (Box<dyn Sink>, &Option<FaultConfig>) = match cfg {
        SinkConfig::Null(n) => (Box::new(NullSink::default()), &n.faults),
        SinkConfig::Jsonl(j) => (
            Box::new(
                JsonLinesSink::open(JsonLinesConfig {
                    path: j.path.clone(),
                    fsync: j.fsync,
                })
                .await?,
            ),
            &j.faults,
        ),
        SinkConfig::Table(t) => {
            let (table, mode, faults) = (&t.table, &t.mode, &t.faults);
            let sink: Box<dyn Sink> = match (&stores.embedded, &stores.postgres) {
                (Some(store), _) if *mode == TableMode::Insert => Box::new(store.table_sink(table)),
                (_, Some(store)) => Box::new(store.table_sink(pipeline, table, *mode).await?),
                (Some(_), None) => {
                    return Err(
                        Error::config("mode = \"upsert\" needs the PostgreSQL store")
                            .with_context("key", format!("{key}.mode")),
                    );
                }
                (None, None) => {
                    return Err(Error::config(
                        "a `table` sink needs the embedded or PostgreSQL store",
                    )
                    .with_context("key", format!("{key}.type"))
                    .with_hint("set store.type = \"embedded\" or \"postgres\""));
                }
            };
            (sink, faults)
        }
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(k) => (Box::new(flowgate_kafka::KafkaSink::new(k.clone())?), &None),
        #[cfg(not(feature = "kafka"))]
        SinkConfig::Kafka(_) => {
            return Err(config::missing_feature("kafka").with_context("key", format!("{key}.type")));
        }
        #[cfg(feature = "kinesis")]
        SinkConfig::Kinesis(k) => (
            Box::new(flowgate_kinesis::KinesisSink::connect(k.clone()).await?),
            &None,
        ),
        #[cfg(not(feature = "kinesis"))]
        SinkConfig::Kinesis(_) => {
            return Err(
                config::missing_feature("kinesis").with_context("key", format!("{key}.type"))
            );
        }
        #[cfg(feature = "rabbitmq")]
        SinkConfig::Rabbitmq(r) => (
            Box::new(flowgate_rabbitmq::RabbitSink::new(r.clone())?),
            &None,
        ),
        #[cfg(not(feature = "rabbitmq"))]
        SinkConfig::Rabbitmq(_) => {
            return Err(
                config::missing_feature("rabbitmq").with_context("key", format!("{key}.type"))
            );
        }
    };
    Ok(match faults {
        Some(f) => Box::new(FaultInjectingSink::new(sink, f.clone())),
        None => sink,
    })
}

async fn build(cfg: &PipelineConfig) -> Result<(Pipeline, Stores), Error> {
    // Kafka -> transactional Kafka sink: the consumed offsets commit inside the sink's
    // transactions (exactly-once).
    #[cfg(feature = "kafka")]
    let mut bridge: Option<Box<dyn Sink>> = None;
    let stores = open_store(&cfg.store).await?;
    let source: Box<dyn Source> = match &cfg.source {
        SourceConfig::Generator(g) => Box::new(GeneratorSource::new(g.clone())?),
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(k) => {
            let source = flowgate_kafka::KafkaSource::new(k.clone())?;
            if let SinkConfig::Kafka(sk) = &cfg.sink {
                if sk.transactional_id.is_some() {
                    let sink = flowgate_kafka::KafkaSink::new(sk.clone())?
                        .with_offsets_of(source.offsets_link())?;
                    bridge = Some(Box::new(sink));
                }
            }
            Box::new(source)
        }
        #[cfg(not(feature = "kafka"))]
        SourceConfig::Kafka(_) => {
            return Err(config::missing_feature("kafka").with_context("key", "source.type"));
        }
        #[cfg(feature = "kinesis")]
        SourceConfig::Kinesis(k) => {
            // Leases live in the pipeline's store, so a worker that lost a shard cannot
            // checkpoint it; without a store, one worker owns every shard (in memory).
            let leases: Arc<dyn LeaseStore> = match &stores.leases {
                Some(l) => l.clone(),
                None => Arc::new(MemoryStore::new()),
            };
            Box::new(flowgate_kinesis::KinesisSource::new(k.clone(), leases)?)
        }
        #[cfg(not(feature = "kinesis"))]
        SourceConfig::Kinesis(_) => {
            return Err(config::missing_feature("kinesis").with_context("key", "source.type"));
        }
        #[cfg(feature = "rabbitmq")]
        SourceConfig::Rabbitmq(r) => Box::new(flowgate_rabbitmq::RabbitSource::new(r.clone())?),
        #[cfg(not(feature = "rabbitmq"))]
        SourceConfig::Rabbitmq(_) => {
            return Err(config::missing_feature("rabbitmq").with_context("key", "source.type"));
        }
    };
    #[cfg(feature = "kafka")]
    let sink = match bridge {
        Some(sink) => sink,
        None => make_sink(&cfg.sink, &stores, &cfg.name, "sink").await?,
    };
    #[cfg(not(feature = "kafka"))]
    let sink = make_sink(&cfg.sink, &stores, &cfg.name, "sink").await?;
    let mut b = Pipeline::builder(cfg.name.clone())
        .source(source)
        .sink(sink)
        .settings(cfg.runtime.clone());
    if let Some(dl) = &cfg.dead_letter {
        b = b.dead_letter(make_sink(dl, &stores, &cfg.name, "dead_letter").await?);
    }
    if let Some(store) = &stores.checkpoint {
        b = b.checkpoint_store(store.clone());
    }
    if let Some(d) = &cfg.dedup {
        let store = stores.dedup.clone().ok_or_else(|| {
            Error::config("dedup needs a store")
                .with_context("key", "dedup")
                .with_hint("set store.type = \"embedded\" or \"memory\"")
        })?;
        b = b.dedup(store, d.extractor()?);
    }
    Ok((b.build()?, stores))
}

async fn run_config(
    cfg: PipelineConfig,
    status: bool,
    duration: Option<Duration>,
) -> Result<(), Error> {
    // The recorder first, so the pipeline's metric handles register with it.
    let prometheus = match cfg.observability.disabled {
        false => Some((cfg.observability.listen, observe::install_recorder()?)),
        true => None,
    };
    let (pipeline, _stores) = build(&cfg).await?;
    let stats = pipeline.stats();
    if let Some((addr, handle)) = prometheus {
        let bound = observe::serve(addr, cfg.name.clone(), stats.clone(), handle).await?;
        eprintln!(
            "flowgate: metrics and health on http://{bound}/ (metrics, health, ready, status)"
        );
    }
    let printer = status.then(|| tokio::spawn(status_line(stats.clone())));
    let shutdown = match duration {
        Some(d) => Shutdown::on_signals().or(Shutdown::after(d)),
        None => Shutdown::on_signals(),
    };
    let res = pipeline.run(shutdown).await;
    if let Some(p) = printer {
        p.abort();
        eprintln!();
    }
    let summary = res?;
    println!("{summary}");
    Ok(())
}

/// Prints `in/out rates, lag and its rate of change, in-flight, memory` every second.
async fn status_line(stats: Arc<Stats>) {
    let mut prev = stats.snapshot();
    let mut at = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = stats.snapshot();
        let dt = at.elapsed().as_secs_f64().max(1e-3);
        at = Instant::now();
        let rate_in = (now.records_in - prev.records_in) as f64 / dt;
        let rate_out = (now.records_out - prev.records_out) as f64 / dt;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2Kin {:>7.0}/s  out {:>7.0}/s  lag {:>8} ({:+.0}/s)  in-flight {:>6}  buffer {:>6.1} MiB  rss {:>6.1} MiB  {}",
            rate_in,
            rate_out,
            now.lag,
            now.lag_rate,
            now.in_flight,
            now.buffer_bytes as f64 / 1_048_576.0,
            rss_mib(),
            now.health
        );
        let _ = err.flush();
        prev = now;
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |pages| pages * 4096.0 / 1_048_576.0)
}

async fn quickstart(data: &Path, duration: Duration) -> Result<(), Error> {
    let cfg = PipelineConfig {
        name: "quickstart".into(),
        source: SourceConfig::Generator(GeneratorConfig {
            partitions: 4,
            rate: Some(10_000.0),
            spikes: vec![Spike {
                at: Duration::from_secs(4),
                duration: Duration::from_secs(5),
                factor: 2.0,
            }],
            ..Default::default()
        }),
        sink: SinkConfig::Null(config::NullSinkConfig {
            faults: Some(FaultConfig {
                capacity_per_sec: Some(14_000.0),
                ..Default::default()
            }),
        }),
        dead_letter: None,
        store: StoreConfig::Embedded(config::EmbeddedStoreConfig {
            path: data.to_path_buf(),
        }),
        dedup: Some(config::DedupConfig {
            key: "source_position".into(),
        }),
        runtime: RuntimeSettings {
            max_in_flight_per_partition: 2_000,
            ..Default::default()
        },
        observability: observe::ObservabilityConfig {
            listen: None,
            disabled: true,
        },
    };
    {
        let store = EmbeddedStore::open_dir(data).await?;
        let existing = store.load("quickstart").await?;
        if existing.is_empty() {
            println!(
                "quickstart: generator (4 partitions, 10,000 records/s, 2x spike at 4s for 5s) -> sink limited to 14,000 records/s"
            );
            println!(
                "            embedded store in {}; run again to resume from the checkpoints",
                data.display()
            );
        } else {
            let mut cps: Vec<String> = existing
                .iter()
                .map(|c| format!("{}@{}", c.partition, c.position))
                .collect();
            cps.sort();
            println!(
                "quickstart: resuming after the stored checkpoints: {}",
                cps.join(", ")
            );
        }
    }
    run_config(cfg, true, Some(duration)).await
}

async fn checkpoints(action: CheckpointAction) -> Result<(), Error> {
    match action {
        CheckpointAction::Show { data, pipeline } => {
            let store = EmbeddedStore::open_dir(&data).await?;
            let mut cps = store.load(&pipeline).await?;
            cps.sort_by(|a, b| a.partition.cmp(&b.partition));
            if cps.is_empty() {
                println!(
                    "no checkpoints for pipeline {pipeline:?} in {}",
                    store.path().display()
                );
            }
            for c in cps {
                match c.fence {
                    Some(f) => println!("{}\t{}\tfence={f}", c.partition, c.position),
                    None => println!("{}\t{}", c.partition, c.position),
                }
            }
            Ok(())
        }
        CheckpointAction::Reset {
            data,
            pipeline,
            partition,
        } => {
            let store = EmbeddedStore::open_dir(&data).await?;
            let parts: Vec<PartitionId> = partition.iter().map(PartitionId::new).collect();
            store
                .reset(
                    &pipeline,
                    if parts.is_empty() { None } else { Some(&parts) },
                )
                .await?;
            println!(
                "reset {} of pipeline {pipeline:?}",
                if parts.is_empty() {
                    "all checkpoints".to_string()
                } else {
                    format!("{} partition(s)", parts.len())
                }
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod docs_commands {
    //! Every `flowgate …` command line shown in the docs parses: an unknown flag or
    //! subcommand there fails this test, naming the file and line.
    use super::Cli;
    use clap::Parser;
    use clap::error::ErrorKind as ClapKind;
    use std::path::{Path, PathBuf};

    /// The Markdown files users read: README, docs/, each adapter's docs.md.
    fn documents(root: &Path) -> Vec<PathBuf> {
        let mut out = vec![root.join("README.md")];
        let mut dirs = vec![root.join("docs")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "md") {
                    out.push(p);
                }
            }
        }
        for e in std::fs::read_dir(root.join("crates")).unwrap().flatten() {
            let p = e.path().join("src/docs.md");
            if p.exists() {
                out.push(p);
            }
        }
        out
    }

    /// Command lines in a document: inline code spans and lines of code blocks that start
    /// with `flowgate ` (or run the binary through cargo).
    fn commands(text: &str) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        // Inside a fenced block: whether it is a shell block (```sh, ```console, …).
        let mut fenced: Option<bool> = None;
        for (n, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if let Some(lang) = trimmed.strip_prefix("```") {
                fenced = match fenced {
                    Some(_) => None,
                    None => Some(matches!(lang.trim(), "sh" | "bash" | "console" | "shell")),
                };
                continue;
            }
            let candidates: Vec<&str> = match fenced {
                Some(true) => vec![trimmed.trim_start_matches("$ ")],
                Some(false) => Vec::new(),
                None => line.split('`').skip(1).step_by(2).collect(),
            };
            for c in candidates {
                let c = c.split(" #").next().unwrap_or(c).trim();
                let c = c
                    .strip_prefix("cargo run --release --bin flowgate -- ")
                    .map(|rest| format!("flowgate {rest}"))
                    .unwrap_or_else(|| c.to_string());
                if c.starts_with("flowgate ") && !c.contains('|') {
                    out.push((n + 1, c));
                }
            }
        }
        out
    }

    /// Placeholders filled with sample values; optional parts (`[--data PATH]`) kept.
    fn fill(word: &str) -> String {
        let word = word.trim_matches(|c| c == '[' || c == ']');
        match word {
            "NAME" | "PIPELINE" => "demo".into(),
            "PATH" | "DIR" => "./flowgate-data".into(),
            "FILE" => "pipeline.toml".into(),
            "ADDR" => "127.0.0.1:9464".into(),
            "POSITION" | "N" => "42".into(),
            "PARTITION" => "orders/0".into(),
            w => w.to_string(),
        }
    }

    #[test]
    fn every_command_line_in_the_docs_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut checked = 0;
        let mut failures = Vec::new();
        for doc in documents(&root) {
            let text = std::fs::read_to_string(&doc).unwrap();
            for (line, cmd) in commands(&text) {
                let args: Vec<String> = cmd.split_whitespace().map(fill).collect();
                checked += 1;
                if let Err(e) = Cli::try_parse_from(&args) {
                    // A mention of a command by name (`flowgate run`) is not a full line.
                    let mention = matches!(
                        e.kind(),
                        ClapKind::MissingRequiredArgument
                            | ClapKind::MissingSubcommand
                            | ClapKind::DisplayHelpOnMissingArgumentOrSubcommand
                    );
                    if !mention {
                        failures.push(format!("{}:{line}: `{cmd}`: {}", doc.display(), e.kind()));
                    }
                }
            }
        }
        assert!(checked > 0, "no command line found in the docs");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
