//! Commands that read a pipeline from outside while it runs or not: `validate` (the file and
//! every connection it names), `lag` (the broker's and the store's view per partition) and
//! `checkpoints show|reset` (every store).

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flowgate_core::{
    Checkpoint, CheckpointStore, Error, ErrorKind, PartitionId, PartitionView, Position,
};

use crate::config::{self, PipelineConfig, StoreConfig};
use crate::factory::{Stores, make_sink, make_source, open_store};

/// Exit codes of `validate` (and of every command on the same errors).
pub(crate) mod exit {
    /// The file is invalid: a key, a type or a value (named in the message).
    pub(crate) const CONFIG: i32 = 2;
    /// A source, sink or store cannot be reached (a temporary failure: retry later).
    pub(crate) const UNREACHABLE: i32 = 3;
    /// A source, sink or store answered and refused (credentials, certificates, a missing
    /// topic, stream or queue).
    pub(crate) const REFUSED: i32 = 4;
    /// Anything else.
    pub(crate) const OTHER: i32 = 1;
}

/// The exit code for an error of a check.
pub(crate) fn exit_code(e: &Error) -> i32 {
    match e.kind() {
        ErrorKind::Transient | ErrorKind::Throttled => exit::UNREACHABLE,
        ErrorKind::Config | ErrorKind::Fatal | ErrorKind::Poison => exit::REFUSED,
        _ => exit::OTHER,
    }
}

/// One line of `validate`'s report.
fn report(what: &str, res: &Result<String, Error>) {
    match res {
        Ok(detail) => println!("✓ {what}: {detail}"),
        Err(e) => println!("✗ {what}: {e}"),
    }
}

/// `flowgate validate -c FILE`: parses the file, then reaches the source, the sink, the
/// dead-letter sink and the store, one line each. Returns the exit code.
pub(crate) async fn validate(path: &Path) -> i32 {
    let cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            println!("✗ {}: {e}", path.display());
            return exit::CONFIG;
        }
    };
    println!("✓ {}: pipeline {:?} parses", path.display(), cfg.name);
    let mut worst = 0;
    let mut note = |res: &Result<String, Error>| {
        if let Err(e) = res {
            worst = worst.max(exit_code(e));
        }
    };
    let stores = match open_store(&cfg.store).await {
        Ok(stores) => stores,
        Err(e) => {
            let failed = Err(e);
            report("store", &failed);
            note(&failed);
            println!("  (the source and sinks are not checked without their store)");
            return worst;
        }
    };
    let store_line = match &stores.checkpoint {
        Some(store) => store.load(&cfg.name).await.map(|cps| {
            format!(
                "{} answers, {} checkpoint(s) stored",
                store.describe(),
                cps.len()
            )
        }),
        None => Ok("none configured: nothing is checkpointed".to_string()),
    };
    report("store", &store_line);
    note(&store_line);
    let checkpoints = stored(&stores, &cfg.name).await.unwrap_or_default();
    let source = match make_source(&cfg.source, &stores).await {
        Ok(mut source) => source
            .inspect(&cfg.name, &checkpoints)
            .await
            .map(|views| format!("reachable, {} partition(s)", views.len()))
            .or_else(|e| match e.kind() {
                ErrorKind::Unsupported => Ok("in-process, nothing to reach".to_string()),
                _ => Err(e),
            }),
        Err(e) => Err(e),
    };
    report("source", &source);
    note(&source);
    let mut sinks = vec![("sink", &cfg.sink)];
    if let Some(dl) = &cfg.dead_letter {
        sinks.push(("dead_letter", dl));
    }
    for (key, sink_cfg) in sinks {
        let res = match make_sink(sink_cfg, &stores, &cfg.name, key).await {
            Ok(sink) => {
                let checked = tokio::time::timeout(Duration::from_secs(30), sink.check()).await;
                let _ = sink.close().await;
                match checked {
                    Ok(Ok(true)) => Ok("reachable".to_string()),
                    Ok(Ok(false)) => Ok("no connection behind it, nothing to reach".to_string()),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(Error::transient("no answer within 30 s")),
                }
            }
            Err(e) => Err(e),
        };
        report(key, &res);
        note(&res);
    }
    worst
}

async fn stored(stores: &Stores, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
    match &stores.checkpoint {
        Some(store) => store.load(pipeline).await,
        None => Ok(Vec::new()),
    }
}

/// A partition's row of `flowgate lag`.
#[derive(serde::Serialize)]
struct LagRow {
    partition: String,
    checkpoint: Option<String>,
    broker_committed: Option<String>,
    end: Option<String>,
    lag_records: Option<u64>,
    lag_seconds: Option<f64>,
    owner: Option<String>,
}

async fn lag_rows(cfg: &PipelineConfig) -> Result<Vec<LagRow>, Error> {
    let stores = match open_store(&cfg.store).await {
        Ok(stores) => stores,
        // The embedded store allows one process: a running pipeline holds it. The broker's
        // committed positions follow its checkpoints, so the broker's view still tells.
        Err(e) if matches!(cfg.store, StoreConfig::Embedded(_)) => {
            eprintln!(
                "note: checkpoints not read ({e}); lag counted from the broker's committed positions"
            );
            Stores::none()
        }
        Err(e) => return Err(e),
    };
    let checkpoints = stored(&stores, &cfg.name).await?;
    let mut source = make_source(&cfg.source, &stores).await?;
    let views = source.inspect(&cfg.name, &checkpoints).await?;
    let by_partition: BTreeMap<&PartitionId, &Checkpoint> =
        checkpoints.iter().map(|c| (&c.partition, c)).collect();
    let text = |p: &Option<Position>| p.as_ref().map(ToString::to_string);
    let mut rows: Vec<LagRow> = views
        .into_iter()
        .map(|v: PartitionView| LagRow {
            checkpoint: by_partition
                .get(&v.partition)
                .map(|c| c.position.to_string()),
            partition: v.partition.to_string(),
            broker_committed: text(&v.broker_committed),
            end: text(&v.end),
            lag_records: v.lag_records,
            lag_seconds: v.lag_seconds,
            owner: v.owner,
        })
        .collect();
    rows.sort_by_key(|a| natural(&a.partition));
    Ok(rows)
}

/// Sorts `topic/10` after `topic/9`.
fn natural(s: &str) -> (String, u64) {
    match s.rsplit_once('/') {
        Some((head, n)) => (head.to_string(), n.parse().unwrap_or(u64::MAX)),
        None => (s.to_string(), 0),
    }
}

fn print_table(pipeline: &str, rows: &[LagRow]) {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut table = vec![[
        "PARTITION".to_string(),
        "CHECKPOINT".into(),
        "BROKER-COMMITTED".into(),
        "END".into(),
        "LAG".into(),
        "LAG-SECONDS".into(),
        "OWNER".into(),
    ]];
    for r in rows {
        table.push([
            r.partition.clone(),
            dash(&r.checkpoint),
            dash(&r.broker_committed),
            dash(&r.end),
            dash(&r.lag_records.map(|l| l.to_string())),
            dash(&r.lag_seconds.map(|s| format!("{s:.1}"))),
            dash(&r.owner),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!("pipeline {pipeline}");
    for r in &table {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    let total: u64 = rows.iter().filter_map(|r| r.lag_records).sum();
    let oldest = rows
        .iter()
        .filter_map(|r| r.lag_seconds)
        .fold(0.0f64, f64::max);
    println!("total lag {total} records, oldest {oldest:.1} s behind");
}

/// `flowgate lag -c FILE [--watch] [--json]`.
pub(crate) async fn lag(path: &Path, watch: bool, json: bool) -> Result<(), Error> {
    let cfg = config::load(path)?;
    loop {
        let rows = lag_rows(&cfg).await?;
        if json {
            let body = serde_json::json!({ "pipeline": cfg.name, "partitions": rows });
            println!("{body}");
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print_table(&cfg.name, &rows);
        }
        let _ = std::io::stdout().flush();
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Where `checkpoints` finds the store and the pipeline: a pipeline file, or the embedded
/// store's directory and a pipeline name.
pub(crate) struct Target {
    /// The pipeline file (`-c`), if given.
    pub(crate) config: Option<std::path::PathBuf>,
    /// The embedded store's directory (without `-c`).
    pub(crate) data: std::path::PathBuf,
    /// The pipeline's name (without `-c`).
    pub(crate) pipeline: Option<String>,
}

impl Target {
    fn resolve(&self) -> Result<(Option<PipelineConfig>, StoreConfig, String), Error> {
        match (&self.config, &self.pipeline) {
            (Some(path), _) => {
                let cfg = config::load(path)?;
                let (store, name) = (cfg.store.clone(), cfg.name.clone());
                Ok((Some(cfg), store, name))
            }
            (None, Some(name)) => Ok((
                None,
                StoreConfig::Embedded(config::EmbeddedStoreConfig {
                    path: self.data.clone(),
                }),
                name.clone(),
            )),
            (None, None) => Err(Error::config("which pipeline?").with_hint(
                "pass -c FILE (any store), or --pipeline NAME for the embedded store in --data",
            )),
        }
    }
}

/// `flowgate checkpoints show`.
pub(crate) async fn show(target: &Target) -> Result<(), Error> {
    let (_, store_cfg, pipeline) = target.resolve()?;
    let stores = open_store(&store_cfg).await?;
    let store = stores.checkpoint.as_ref().ok_or_else(|| {
        Error::config("the pipeline has no checkpoint store").with_context("key", "store.type")
    })?;
    let mut cps = store.load(&pipeline).await?;
    cps.sort_by_key(|a| natural(a.partition.as_str()));
    if cps.is_empty() {
        println!(
            "no checkpoints for pipeline {pipeline:?} in {}",
            store.describe()
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

/// `flowgate checkpoints reset`: what to reset and to where.
pub(crate) struct Reset {
    /// Only these partitions (all stored ones, or with `--to` all the source's, if empty).
    pub(crate) partitions: Vec<String>,
    /// `earliest`, `latest` or a position; none forgets the checkpoints.
    pub(crate) to: Option<String>,
    /// Skip the confirmation prompt.
    pub(crate) yes: bool,
    /// Reset partitions a live owner holds.
    pub(crate) force: bool,
}

/// `flowgate checkpoints reset`.
pub(crate) async fn reset(target: &Target, reset: Reset) -> Result<(), Error> {
    let (cfg, store_cfg, pipeline) = target.resolve()?;
    let stores = open_store(&store_cfg).await?;
    let store = stores.checkpoint.clone().ok_or_else(|| {
        Error::config("the pipeline has no checkpoint store").with_context("key", "store.type")
    })?;
    let existing = store.load(&pipeline).await?;
    let views = broker_views(cfg.as_ref(), &stores, &pipeline, &existing).await?;
    let wanted = partitions_to_reset(&reset, &views, &existing);
    if wanted.is_empty() {
        println!(
            "nothing to reset: pipeline {pipeline:?} has no checkpoints in {}",
            store.describe()
        );
        return Ok(());
    }
    refuse_held(&views, &wanted, reset.force)?;
    let plan = plan_reset(reset.to.as_deref(), &wanted, &existing, &views)?;
    println!("pipeline {pipeline:?} in {}:", store.describe());
    for change in &plan {
        println!(
            "  {}: {} -> {}",
            change.partition,
            change.old.as_deref().unwrap_or("none"),
            change
                .new
                .as_ref()
                .map_or_else(|| "forgotten".to_string(), ToString::to_string)
        );
    }
    if !reset.yes && !confirm(plan.len())? {
        println!("nothing changed");
        return Ok(());
    }
    apply_reset(&store, &pipeline, &plan, &existing).await?;
    println!(
        "reset {} checkpoint(s) of pipeline {pipeline:?}",
        plan.len()
    );
    Ok(())
}

/// The broker's view, where the file names a source that can give it: owners, and the
/// positions `earliest` and `latest` stand for.
async fn broker_views(
    cfg: Option<&PipelineConfig>,
    stores: &Stores,
    pipeline: &str,
    existing: &[Checkpoint],
) -> Result<Vec<PartitionView>, Error> {
    let Some(cfg) = cfg else {
        return Ok(Vec::new());
    };
    match make_source(&cfg.source, stores)
        .await?
        .inspect(pipeline, existing)
        .await
    {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == ErrorKind::Unsupported => Ok(Vec::new()),
        Err(e) => Err(e.with_hint(
            "the broker must answer to tell who holds the partitions; fix the connection or use --data/--pipeline for the embedded store",
        )),
    }
}

/// The partitions named, else with `--to` every partition the broker knows, else every
/// partition with a checkpoint.
fn partitions_to_reset(
    reset: &Reset,
    views: &[PartitionView],
    existing: &[Checkpoint],
) -> Vec<PartitionId> {
    if !reset.partitions.is_empty() {
        reset.partitions.iter().map(PartitionId::new).collect()
    } else if reset.to.is_some() && !views.is_empty() {
        views.iter().map(|v| v.partition.clone()).collect()
    } else {
        existing.iter().map(|c| c.partition.clone()).collect()
    }
}

/// Refuses, unless forced, when a running pipeline holds any of the partitions: it would
/// write its own checkpoints over the reset ones.
fn refuse_held(views: &[PartitionView], wanted: &[PartitionId], force: bool) -> Result<(), Error> {
    let held: Vec<String> = views
        .iter()
        .filter(|v| wanted.contains(&v.partition))
        .filter_map(|v| {
            v.owner
                .as_ref()
                .map(|o| format!("{} (held by {o})", v.partition))
        })
        .collect();
    if !held.is_empty() && !force {
        return Err(Error::config(format!(
            "refused: a running pipeline holds {}",
            held.join(", ")
        ))
        .with_hint("stop the pipeline first (it would write its own checkpoints over these), or pass --force"));
    }
    Ok(())
}

/// One partition's checkpoint before and after the reset; no new position forgets it.
struct CheckpointChange {
    partition: PartitionId,
    old: Option<String>,
    new: Option<Position>,
}

fn plan_reset(
    to: Option<&str>,
    wanted: &[PartitionId],
    existing: &[Checkpoint],
    views: &[PartitionView],
) -> Result<Vec<CheckpointChange>, Error> {
    let mut plan = Vec::new();
    for p in wanted {
        let old = existing
            .iter()
            .find(|c| &c.partition == p)
            .map(|c| c.position.to_string());
        let view = views.iter().find(|v| &v.partition == p);
        plan.push(CheckpointChange {
            partition: p.clone(),
            old,
            new: reset_position(to, p, view)?,
        });
    }
    Ok(plan)
}

/// The position `--to` names for partition `p`; `None` without `--to`.
fn reset_position(
    to: Option<&str>,
    p: &PartitionId,
    view: Option<&PartitionView>,
) -> Result<Option<Position>, Error> {
    Ok(match to {
        None => None,
        Some("latest") => Some(view.and_then(|v| v.end.clone()).ok_or_else(|| {
            Error::config(format!("partition {p}: the broker names no last record"))
                .with_hint("an empty partition needs no reset; or pass --to POSITION")
        })?),
        Some("earliest") => {
            return Err(Error::config("--to earliest: a checkpoint names the last record processed, and before the first there is none")
                .with_hint("reset without --to (the source then starts after the broker's committed position, or at its configured start), or pass --to POSITION"));
        }
        Some(text) => Some(Position::parse_decimal(text).map_err(|e| {
            Error::config(format!("--to {text:?} is not a position"))
                .with_context("cause", e)
                .with_hint("a decimal position (a Kafka offset, a Kinesis position), or `latest`")
        })?),
    })
}

/// Forgets the checkpoints without a new position and writes the others, keeping each
/// partition's fence.
async fn apply_reset(
    store: &Arc<dyn CheckpointStore>,
    pipeline: &str,
    plan: &[CheckpointChange],
    existing: &[Checkpoint],
) -> Result<(), Error> {
    let forget: Vec<PartitionId> = plan
        .iter()
        .filter(|change| change.new.is_none())
        .map(|change| change.partition.clone())
        .collect();
    if !forget.is_empty() {
        store.reset(pipeline, Some(&forget)).await?;
    }
    let set: Vec<Checkpoint> = plan
        .iter()
        .filter_map(|change| {
            let fence = existing
                .iter()
                .find(|c| c.partition == change.partition)
                .and_then(|c| c.fence);
            change
                .new
                .clone()
                .map(|pos| Checkpoint::new(change.partition.clone(), pos).with_fence(fence))
        })
        .collect();
    if !set.is_empty() {
        store.commit(pipeline, &set).await?;
    }
    Ok(())
}

fn confirm(n: usize) -> Result<bool, Error> {
    if !std::io::stdin().is_terminal() {
        return Err(
            Error::config("not confirmed: standard input is not a terminal")
                .with_hint("pass --yes to reset without the prompt"),
        );
    }
    print!("reset {n} checkpoint(s)? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Error::fatal("cannot read the answer").with_context("cause", e))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
