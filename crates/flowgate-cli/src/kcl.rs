//! `flowgate checkpoints import-kcl`: continue a Kinesis application's work where its AWS KCL
//! workers left it, from their DynamoDB lease table.
//!
//! Carried over: each shard's last checkpointed record (sequence number and KPL sub-sequence,
//! as a flowgate position), and shards processed to their end (`SHARD_END`, and parents named
//! by a lease that no longer have one of their own) as finished leases, so that children start
//! after their parents as before. Not carried over: lease ownership (flowgate's workers take
//! the shards afresh), KCL's pending checkpoints, and shards the application had not started
//! (`TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`): those start where `source.start` says.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use flowgate_checkpoint::{DynamoDbConfig, KclCheckpoint, KclLease, read_kcl_leases};
use flowgate_core::{Checkpoint, Error, LeaseStore, PartitionId};
use flowgate_kinesis::KinesisSourceConfig;

use crate::config::{self, PipelineConfig, SourceConfig, StoreConfig};
use crate::factory::open_store;
use crate::registry::BrokerSource;

/// What `import-kcl` was asked.
pub(crate) struct Import<'a> {
    /// The pipeline file (its Kinesis source and its store).
    pub(crate) config: &'a Path,
    /// The KCL lease table.
    pub(crate) table: &'a str,
    /// DynamoDB endpoint of the lease table (default: the store's, else AWS).
    pub(crate) endpoint_url: Option<String>,
    /// Its region (default: the store's, else the source's, else the environment's).
    pub(crate) region: Option<String>,
    /// How long to watch the table for renewals by a live KCL worker.
    pub(crate) observe: Duration,
    /// Import although KCL workers renew leases, or the pipeline already has checkpoints.
    pub(crate) force: bool,
}

/// What the import does with one shard.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Continue after this checkpoint.
    Checkpoint(Checkpoint),
    /// The shard was read to its end.
    Finished(PartitionId),
    /// Nothing processed: start as `source.start` says.
    Start(PartitionId, &'static str),
}

/// The steps for `leases` (only those of `stream`, for a multi-stream table).
fn plan(leases: &[KclLease], stream: &str) -> Result<Vec<Step>, Error> {
    let ours: Vec<&KclLease> = leases
        .iter()
        .filter(|l| l.stream.as_deref().is_none_or(|s| s == stream))
        .collect();
    let known: BTreeSet<&str> = ours.iter().map(|l| l.shard_id.as_str()).collect();
    let mut steps = Vec::new();
    for lease in &ours {
        let shard = PartitionId::new(&lease.shard_id);
        steps.push(match &lease.checkpoint {
            KclCheckpoint::Sequence {
                sequence_number,
                sub_sequence,
            } => {
                let position = flowgate_kinesis::kpl::position(sequence_number, *sub_sequence)
                    .ok_or_else(|| {
                        Error::config("a KCL checkpoint is not a sequence number")
                            .with_context("lease", &lease.lease_key)
                            .with_context("checkpoint", sequence_number)
                    })?;
                Step::Checkpoint(Checkpoint::new(shard, position))
            }
            KclCheckpoint::ShardEnd => Step::Finished(shard),
            KclCheckpoint::TrimHorizon => Step::Start(shard, "TRIM_HORIZON"),
            KclCheckpoint::Latest => Step::Start(shard, "LATEST"),
            KclCheckpoint::AtTimestamp => Step::Start(shard, "AT_TIMESTAMP"),
        });
    }
    // A KCL worker creates a child's lease only once its parents are done, and deletes the
    // parents' leases later: a parent without a lease of its own was read to its end.
    let orphans: BTreeSet<&str> = ours
        .iter()
        .flat_map(|l| l.parents.iter().map(String::as_str))
        .filter(|p| !known.contains(p))
        .collect();
    steps.extend(
        orphans
            .into_iter()
            .map(|p| Step::Finished(PartitionId::new(p))),
    );
    Ok(steps)
}

/// KCL leases whose counter moved while watched: a KCL worker still renews them.
fn renewed(before: &[KclLease], after: &[KclLease]) -> Vec<String> {
    after
        .iter()
        .filter(|a| {
            before
                .iter()
                .find(|b| b.lease_key == a.lease_key)
                .is_some_and(|b| b.counter != a.counter)
        })
        .map(|a| {
            format!(
                "{} (owner {})",
                a.lease_key,
                a.owner.as_deref().unwrap_or("none")
            )
        })
        .collect()
}

/// The lease table's connection: the store's (a DynamoDB store), else AWS in the source's
/// region; `--endpoint-url` and `--region` override.
fn lease_table(
    cfg: &PipelineConfig,
    source: &KinesisSourceConfig,
    args: &Import<'_>,
) -> DynamoDbConfig {
    let mut dynamo = match &cfg.store {
        StoreConfig::Dynamodb(d) => d.clone(),
        _ => DynamoDbConfig {
            region: source.connection.region.clone(),
            ..DynamoDbConfig::default()
        },
    };
    if let Some(url) = &args.endpoint_url {
        dynamo.endpoint_url = Some(url.clone());
    }
    if let Some(region) = &args.region {
        dynamo.region = Some(region.clone());
    }
    dynamo
}

/// Reads the lease table; unless forced, watches it for `observe` and refuses if a KCL worker
/// renews a lease meanwhile.
async fn read_stopped(dynamo: &DynamoDbConfig, args: &Import<'_>) -> Result<Vec<KclLease>, Error> {
    let before = read_kcl_leases(dynamo, args.table).await?;
    if args.force || args.observe.is_zero() {
        return Ok(before);
    }
    println!(
        "watching {} for {:?}: a KCL worker that still renews its leases must be stopped first",
        args.table, args.observe
    );
    tokio::time::sleep(args.observe).await;
    let live = renewed(&before, &read_kcl_leases(dynamo, args.table).await?);
    if live.is_empty() {
        return Ok(before);
    }
    Err(Error::config(format!(
        "refused: KCL workers still renew leases: {}",
        live.join(", ")
    ))
    .with_hint("stop the KCL application first (both would read the stream), or pass --force"))
}

/// Marks `shard` finished in the pipeline's leases (already finished is fine).
async fn finish(leases: &dyn LeaseStore, pipeline: &str, shard: &PartitionId) -> Result<(), Error> {
    let taken = leases
        .acquire(pipeline, shard, "kcl-import", Duration::from_secs(30), None)
        .await?;
    if let Some(lease) = taken {
        return leases.finish(pipeline, &lease).await;
    }
    let held = leases.leases(pipeline).await?;
    if held.iter().any(|l| &l.partition == shard && l.finished) {
        return Ok(());
    }
    Err(
        Error::config(format!("shard {shard}: a flowgate worker holds its lease"))
            .with_hint("stop the pipeline before importing"),
    )
}

/// `flowgate checkpoints import-kcl`.
pub(crate) async fn import(args: Import<'_>) -> Result<(), Error> {
    let cfg = config::load(args.config)?;
    let SourceConfig::Broker(BrokerSource::Kinesis(source)) = &cfg.source else {
        return Err(Error::config("import-kcl needs a Kinesis source")
            .with_context("key", "source.type")
            .with_hint("the pipeline file must read the stream the KCL application read: [source] type = \"kinesis\""));
    };
    let kcl = read_stopped(&lease_table(&cfg, source, &args), &args).await?;
    let steps = plan(&kcl, &source.stream)?;
    let stores = open_store(&cfg.store).await?;
    let (Some(checkpoints), Some(leases)) = (stores.checkpoint, stores.leases) else {
        return Err(
            Error::config("import-kcl needs a checkpoint store").with_context("key", "store.type")
        );
    };
    let existing = checkpoints.load(&cfg.name).await?;
    if !existing.is_empty() && !args.force {
        return Err(Error::config(format!(
            "refused: pipeline {:?} already has {} checkpoint(s) in {}",
            cfg.name,
            existing.len(),
            checkpoints.describe()
        ))
        .with_hint("`flowgate checkpoints reset -c FILE` first, or pass --force to replace them"));
    }
    if !existing.is_empty() {
        checkpoints.reset(&cfg.name, None).await?;
    }
    println!(
        "pipeline {:?} in {}, from KCL table {}:",
        cfg.name,
        checkpoints.describe(),
        args.table
    );
    let (mut written, mut finished) = (Vec::new(), 0);
    for step in steps {
        match step {
            Step::Checkpoint(cp) => {
                println!("  {}: continue after {}", cp.partition, cp.position);
                written.push(cp);
            }
            Step::Finished(shard) => {
                finish(&*leases, &cfg.name, &shard).await?;
                println!("  {shard}: read to its end (finished)");
                finished += 1;
            }
            Step::Start(shard, kcl) => println!(
                "  {shard}: not started by KCL ({kcl}); starts at source.start ({:?})",
                source.start
            ),
        }
    }
    checkpoints.commit(&cfg.name, &written).await?;
    println!(
        "imported {} checkpoint(s) and {finished} finished shard(s)",
        written.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, checkpoint: KclCheckpoint, parents: &[&str], counter: u64) -> KclLease {
        KclLease {
            lease_key: key.into(),
            shard_id: key.rsplit(':').next().unwrap_or(key).into(),
            stream: key
                .split(':')
                .nth(1)
                .filter(|_| key.contains(':'))
                .map(str::to_string),
            checkpoint,
            owner: Some("w".into()),
            counter,
            parents: parents.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn checkpoints_continue_after_the_record_and_orphan_parents_count_as_finished() {
        let seq = |s: &str, sub| KclCheckpoint::Sequence {
            sequence_number: s.into(),
            sub_sequence: sub,
        };
        let leases = vec![
            lease("shardId-1", seq("100", 2), &["shardId-0"], 1),
            lease("shardId-2", KclCheckpoint::TrimHorizon, &["shardId-0"], 1),
            lease("shardId-3", KclCheckpoint::ShardEnd, &[], 1),
            lease("1:other:9:shardId-9", seq("5", 0), &[], 1),
        ];
        let steps = plan(&leases, "orders").unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Checkpoint(Checkpoint::new(
                    PartitionId::new("shardId-1"),
                    flowgate_kinesis::kpl::position("100", 2).unwrap()
                )),
                Step::Start(PartitionId::new("shardId-2"), "TRIM_HORIZON"),
                Step::Finished(PartitionId::new("shardId-3")),
                Step::Finished(PartitionId::new("shardId-0")),
            ]
        );
    }

    #[test]
    fn a_moving_counter_is_a_live_worker() {
        let a = vec![
            lease("s1", KclCheckpoint::Latest, &[], 1),
            lease("s2", KclCheckpoint::Latest, &[], 5),
        ];
        let b = vec![
            lease("s1", KclCheckpoint::Latest, &[], 1),
            lease("s2", KclCheckpoint::Latest, &[], 6),
        ];
        assert_eq!(renewed(&a, &b), vec!["s2 (owner w)".to_string()]);
        assert!(renewed(&a, &a).is_empty());
    }
}
