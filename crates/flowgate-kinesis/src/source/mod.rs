//! The Kinesis source: a lease coordinator and one paced reader per owned shard.
//!
//! - The **coordinator** (one task) lists the shards, renews this worker's leases, takes free
//!   or expired ones up to its fair share, steals at most `max_steals_per_round` per round from
//!   busier workers, and finishes the leases of shards read to their end. A shard is eligible
//!   only once every parent it has (one after a split, two after a merge) is finished.
//! - A **reader** (one task per owned shard) calls `GetRecords` only when the shard's buffer
//!   is empty and the runtime gave it credit, asking for at most that many records, and never
//!   sooner than `min_call_interval` (and the byte pace) after its previous call.
//! - [`Source::next`] hands buffered records over within each shard's credit; it only takes
//!   from memory and never awaits between taking and returning, so it is cancel-safe.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flowgate_core::{
    Checkpoint, Connection, Credits, Error, LagUnit, Lease, LeaseStore, Record, Source,
    SourceCapabilities, SourceContext, SourceEvent, StartPosition,
};
use tokio::task::JoinHandle;

use crate::config::KinesisSourceConfig;
use crate::leases::shards::*;
use crate::leases::{LEASES, coordinate, list_shards};
use reader::read_shard;

mod reader;

/// Reads a Kinesis stream; several workers of one pipeline split its shards through leases.
/// See the module docs and `docs/brokers/kinesis.md`.
pub struct KinesisSource {
    cfg: KinesisSourceConfig,
    leases: Arc<dyn LeaseStore>,
    owner: String,
    shards: Arc<OwnedShards>,
    run: Option<Running>,
}

/// What exists between `open` and `close`.
struct Running {
    ctx: Arc<SourceTasks>,
    coordinator: JoinHandle<()>,
}

impl KinesisSource {
    /// A source reading `cfg.stream`, keeping its leases in `leases` (the same store as the
    /// pipeline's checkpoints, so that a worker that lost a lease cannot checkpoint; a shared
    /// PostgreSQL or Redis store when several workers split the stream).
    pub fn new(cfg: KinesisSourceConfig, leases: Arc<dyn LeaseStore>) -> Result<Self, Error> {
        cfg.validate()?;
        let owner = cfg.worker_id.clone().unwrap_or_else(default_worker_id);
        Ok(KinesisSource {
            cfg,
            leases,
            owner,
            shards: Arc::new(OwnedShards::default()),
            run: None,
        })
    }

    /// This worker's name in the lease table.
    pub fn worker_id(&self) -> &str {
        &self.owner
    }

    /// Per-shard statistics (calls, throttles, expired iterators).
    pub fn stats(&self) -> KinesisStats {
        KinesisStats(self.shards.clone())
    }
}

/// Hands over buffered records within each shard's credit; wakes the readers of shards it
/// emptied.
fn take_ready(
    table: &mut ShardTable,
    credits: &Credits,
    drained: &tokio::sync::Notify,
) -> Vec<Record> {
    let mut out = Vec::new();
    let mut emptied = false;
    for (p, o) in table.owned.iter_mut() {
        if !o.started || o.buffer.is_empty() {
            continue;
        }
        let credit = credits.available(p);
        if credit == 0 {
            continue;
        }
        let n = credit.min(o.buffer.len());
        out.extend(o.buffer.drain(..n));
        o.delivered = out.last().map(|r| r.position.clone());
        emptied |= o.buffer.is_empty();
    }
    if emptied {
        drained.notify_waiters();
    }
    out
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

#[async_trait]
impl Source for KinesisSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::replayable_ordered()
            .with_dynamic_assignment(true)
            .with_lag_unit(Some(LagUnit::Millis))
    }

    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        let client = crate::client::build(&self.cfg.connection).await;
        // Fail early and clearly when the stream does not exist or the credentials are
        // refused; an endpoint that cannot be reached is reported as a disconnection, and the
        // lease loop keeps trying (up to `give_up_after`).
        let mut failing = std::collections::BTreeSet::new();
        if let Err(e) = list_shards(&client, &self.cfg.stream).await {
            if !e.is_temporary() {
                return Err(e.with_hint(
                    "check that the stream exists and endpoint_url, region and credentials are right",
                ));
            }
            self.shards
                .inbox
                .push_event(SourceEvent::Connection(Connection::Down {
                    endpoint: endpoint(&self.cfg),
                    cause: e.to_string(),
                }));
            // The lease loop's first good round reports the endpoint back.
            failing.insert(LEASES.to_string());
        }
        let run = Arc::new(SourceTasks {
            cfg: self.cfg.clone(),
            client,
            leases: self.leases.clone(),
            owner: self.owner.clone(),
            pipeline: ctx.pipeline.clone(),
            credits: ctx.credits,
            shards: self.shards.clone(),
            failing: Mutex::new(failing),
        });
        tracing::info!(stream = %self.cfg.stream, worker = %self.owner, leases = %self.leases.describe(), "kinesis source open");
        let coordinator = tokio::spawn(coordinate(run.clone()));
        self.run = Some(Running {
            ctx: run,
            coordinator,
        });
        Ok(())
    }

    async fn next(&mut self) -> Result<SourceEvent, Error> {
        let Some(run) = &self.run else {
            return Err(Error::fatal("kinesis source: next() before open()"));
        };
        if run.coordinator.is_finished() {
            // It ends on its own only after reporting a fatal error, which comes first.
            return self.shards.inbox.try_next().unwrap_or_else(|| {
                Err(Error::fatal(
                    "kinesis source: the lease coordinator stopped",
                ))
            });
        }
        let credits = run.ctx.credits.clone();
        let shards = self.shards.clone();
        shards
            .inbox
            .next(&credits, Duration::from_millis(500), |table, credits| {
                Some(take_ready(table, credits, &shards.drained))
            })
            .await
    }

    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        let Some(run) = &self.run else {
            return Err(Error::fatal("kinesis source: start() before open()"));
        };
        let mut table = self.shards.inbox.buffered();
        for s in starts {
            let Some(o) = table.owned.get_mut(&s.partition) else {
                continue;
            };
            if o.started {
                continue;
            }
            o.started = true;
            match &s.after {
                Some(a) => {
                    tracing::info!(shard = %s.partition, after = %a, "kinesis: reading after the checkpoint")
                }
                None => {
                    tracing::info!(shard = %s.partition, start = ?self.cfg.start, "kinesis: no checkpoint; reading from the configured start")
                }
            }
            o.reader = Some(tokio::spawn(read_shard(
                run.ctx.clone(),
                s.partition.clone(),
                s.after.clone(),
            )));
        }
        Ok(())
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        let mut table = self.shards.inbox.buffered();
        for c in checkpoints {
            if let Some(o) = table.owned.get_mut(&c.partition) {
                if c.fence == Some(o.lease.epoch)
                    && o.committed.as_ref().is_none_or(|p| *p < c.position)
                {
                    o.committed = Some(c.position.clone());
                }
            }
        }
        Ok(())
    }

    async fn inspect(
        &mut self,
        pipeline: &str,
        checkpoints: &[Checkpoint],
    ) -> Result<Vec<flowgate_core::PartitionView>, Error> {
        let client = crate::client::build(&self.cfg.connection).await;
        let shards = list_shards(&client, &self.cfg.stream)
            .await
            .map_err(|e| e.with_context("endpoint", endpoint(&self.cfg)))?;
        let leases = self.leases.leases(pipeline).await.unwrap_or_default();
        let mut views = Vec::with_capacity(shards.len());
        for shard in shards {
            let after = checkpoints
                .iter()
                .find(|c| c.partition == shard.id)
                .map(|c| &c.position);
            let seconds = crate::lag::behind(&client, &self.cfg, &shard.id, after).await?;
            views.push(flowgate_core::PartitionView {
                broker_committed: None,
                end: None,
                lag_records: None,
                lag_seconds: Some(seconds),
                owner: leases
                    .iter()
                    .find(|l| l.partition == shard.id && !l.is_available())
                    .and_then(|l| l.owner.clone()),
                partition: shard.id,
            });
        }
        Ok(views)
    }

    async fn close(&mut self) -> Result<(), Error> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        run.coordinator.abort();
        let held: Vec<Lease> = {
            let mut table = self.shards.inbox.buffered();
            let held = table.owned.values().map(|o| o.lease.clone()).collect();
            table.owned.clear();
            held
        };
        // Give the leases back so other workers take the shards at once instead of after the
        // expiry. Bounded: a store that does not answer leaves them to expire.
        let release = async {
            for l in &held {
                if let Err(e) = run.ctx.leases.release(&run.ctx.pipeline, l).await {
                    tracing::warn!(shard = %l.partition, error = %e, "kinesis: releasing a lease failed; it will expire");
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), release)
            .await
            .is_err()
        {
            tracing::warn!("kinesis: releasing leases timed out; they will expire");
        }
        Ok(())
    }
}

impl Drop for KinesisSource {
    fn drop(&mut self) {
        // A crash-like stop: tasks end, leases stay until they expire.
        if let Some(run) = self.run.take() {
            run.coordinator.abort();
        }
        self.shards.inbox.buffered().owned.clear();
    }
}
