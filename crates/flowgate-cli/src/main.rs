//! `flowgate`: run a pipeline from a config file, watch it, inspect and reset checkpoints.

mod config;
mod factory;
mod inspect;
#[cfg(feature = "kinesis")]
mod kcl;
mod registry;
mod top;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use flowgate_checkpoint::EmbeddedStore;
use flowgate_core::{CheckpointStore, Error, ErrorKind};
use flowgate_runtime::adapters::{FaultConfig, GeneratorConfig, Spike};
use flowgate_runtime::{RuntimeSettings, Shutdown, Stats};

use crate::config::{PipelineConfig, SinkConfig, SourceConfig, StoreConfig};
use crate::factory::build;

#[derive(Parser)]
#[command(
    name = "flowgate",
    version,
    about = "Multi-broker streaming with bounded lag and no lost records"
)]
struct Cli {
    /// Log lines as text or as one JSON object per line; `auto`: JSON when standard error is
    /// not a terminal.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
    Auto,
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
    /// Check a pipeline file: parse it, then reach its store, source, sink and dead-letter
    /// sink, one line each. Exit 0 all good, 2 invalid file, 3 something unreachable, 4
    /// something refused (credentials, certificates, a missing topic, stream or queue).
    Validate {
        /// The pipeline file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Lag per partition as the broker and the checkpoint store see it, without joining the
    /// consumer group: checkpoint, broker committed position, end, lag in records and
    /// seconds, owner.
    Lag {
        /// The pipeline file.
        #[arg(long, short)]
        config: PathBuf,
        /// Read again every 2 seconds until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// One JSON object per reading instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A live view of a running pipeline, from its /status: lag per partition, rates,
    /// status, catch-up estimate. Keys: s sort, q quit.
    Top {
        /// The pipeline's endpoint (`observability.listen`).
        #[arg(default_value = "127.0.0.1:9464")]
        addr: String,
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
    /// Inspect or reset a pipeline's checkpoints, in any store.
    Checkpoints {
        #[command(subcommand)]
        action: CheckpointAction,
    },
}

/// Which pipeline's checkpoints: a pipeline file (any store), or the embedded store's
/// directory and a pipeline name.
#[derive(clap::Args)]
struct TargetArgs {
    /// The pipeline file: its store and name.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Without `-c`: data directory of the embedded store.
    #[arg(long, default_value = "./flowgate-data")]
    data: PathBuf,
    /// Without `-c`: the pipeline's name.
    #[arg(long, required_unless_present = "config")]
    pipeline: Option<String>,
}

impl TargetArgs {
    fn target(self) -> inspect::Target {
        inspect::Target {
            config: self.config,
            data: self.data,
            pipeline: self.pipeline,
        }
    }
}

#[derive(Subcommand)]
enum CheckpointAction {
    /// Print the checkpoints of a pipeline.
    Show {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Forget checkpoints of a pipeline (all, or the given partitions), or set them
    /// `--to` a position. Refused while a running pipeline holds a partition, unless
    /// `--force`.
    Reset {
        #[command(flatten)]
        target: TargetArgs,
        /// Only these partitions (repeat the flag).
        #[arg(long)]
        partition: Vec<String>,
        /// `latest` (after the last record the broker holds) or a position (the last record
        /// to count as processed); without it the checkpoints are forgotten.
        #[arg(long)]
        to: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
        /// Reset partitions a running pipeline holds.
        #[arg(long)]
        force: bool,
    },
    /// Continue a Kinesis application's work from its AWS KCL lease table: write each shard's
    /// last KCL checkpoint, and the shards KCL read to their end, into the pipeline's store.
    /// Refused while KCL workers renew leases, or when the pipeline has checkpoints, unless
    /// `--force`.
    #[cfg(feature = "kinesis")]
    ImportKcl {
        /// The pipeline file: a Kinesis source reading the KCL application's stream, and the
        /// store to write to.
        #[arg(long, short)]
        config: PathBuf,
        /// The KCL lease table (by default KCL names it after the application).
        #[arg(long)]
        table: String,
        /// DynamoDB endpoint of the lease table. Default: the store's (a DynamoDB store), else
        /// AWS.
        #[arg(long)]
        endpoint_url: Option<String>,
        /// Region of the lease table. Default: the store's, else the source's.
        #[arg(long)]
        region: Option<String>,
        /// How long to watch the table for renewals by a live KCL worker.
        #[arg(long, default_value = "15s", value_parser = humantime_serde::re::humantime::parse_duration)]
        observe: Duration,
        /// Import although KCL workers still renew leases, or the pipeline has checkpoints
        /// (they are replaced).
        #[arg(long)]
        force: bool,
    },
}

fn init_logging(default: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOWGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let format = cli.log_format;
    let res = match cli.command {
        Command::Run {
            config,
            status,
            duration,
            metrics_addr,
        } => {
            init_logging("info", format);
            run_file(&config, status, duration, metrics_addr).await
        }
        Command::Validate { config } => {
            init_logging("error", format);
            std::process::exit(inspect::validate(&config).await);
        }
        Command::Lag {
            config,
            watch,
            json,
        } => {
            init_logging("error", format);
            inspect::lag(&config, watch, json).await
        }
        Command::Top { addr } => top::run(&addr),
        Command::Quickstart { data, duration } => {
            init_logging("warn", format);
            quickstart(&data, duration).await
        }
        Command::Checkpoints { action } => {
            init_logging("warn", format);
            match action {
                CheckpointAction::Show { target } => inspect::show(&target.target()).await,
                CheckpointAction::Reset {
                    target,
                    partition,
                    to,
                    yes,
                    force,
                } => {
                    let reset = inspect::Reset {
                        partitions: partition,
                        to,
                        yes,
                        force,
                    };
                    inspect::reset(&target.target(), reset).await
                }
                #[cfg(feature = "kinesis")]
                CheckpointAction::ImportKcl {
                    config,
                    table,
                    endpoint_url,
                    region,
                    observe,
                    force,
                } => {
                    kcl::import(kcl::Import {
                        config: &config,
                        table: &table,
                        endpoint_url,
                        region,
                        observe,
                        force,
                    })
                    .await
                }
            }
        }
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(if e.kind() == ErrorKind::Config {
            inspect::exit::CONFIG
        } else {
            inspect::exit_code(&e)
        });
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

async fn run_config(
    cfg: PipelineConfig,
    status: bool,
    duration: Option<Duration>,
) -> Result<(), Error> {
    // The endpoint first: the pipeline's metric handles register with its recorder, and it
    // answers (`starting`) while the source, sink and stores connect.
    let endpoint = match cfg.observability.disabled {
        false => {
            let endpoint = flowgate_runtime::Endpoint::start(&cfg.observability, &cfg.name).await?;
            eprintln!(
                "flowgate: metrics and health on {} (metrics, health, ready, status)",
                endpoint.url()
            );
            Some(endpoint)
        }
        true => None,
    };
    let (pipeline, _stores) = build(&cfg).await?;
    let stats = pipeline.stats();
    if let Some(endpoint) = &endpoint {
        endpoint.attach(stats.clone());
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
        observability: flowgate_runtime::EndpointSettings {
            disabled: true,
            ..Default::default()
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
