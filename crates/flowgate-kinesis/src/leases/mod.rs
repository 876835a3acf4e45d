//! The Kinesis lease coordinator: lists the shards, renews this worker's leases, takes free
//! or expired ones up to its fair share, steals at most `max_steals_per_round` per round from
//! busier workers, and finishes the leases of shards read to their end. A shard is eligible
//! only once every parent it has is finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_core::{Assignment, Error, ErrorKind, Lease, PartitionId, Revocation, SourceEvent};

use crate::error::map;

pub(crate) mod shards;

use shards::*;

/// A shard and its parents, from `ListShards`.
#[derive(Clone, Debug)]
pub(crate) struct ShardInfo {
    pub(crate) id: PartitionId,
    pub(crate) parents: Vec<PartitionId>,
}

pub(crate) async fn list_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<ShardInfo>, Error> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| map(e, "listing the shards (ListShards)", stream))?;
        for s in resp.shards() {
            out.push(ShardInfo {
                id: PartitionId::new(s.shard_id()),
                parents: s
                    .parent_shard_id()
                    .into_iter()
                    .chain(s.adjacent_parent_shard_id())
                    .map(PartitionId::new)
                    .collect(),
            });
        }
        token = resp.next_token().map(str::to_string);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// The lease loop's name among the components that report the connection.
pub(crate) const LEASES: &str = "leases";

/// The lease loop: every third of the lease ttl.
pub(crate) async fn coordinate(ctx: Arc<SourceTasks>) {
    let tick = (ctx.cfg.lease_ttl / 3).max(Duration::from_millis(100));
    let mut shards: Vec<ShardInfo> = Vec::new();
    let mut listed_at: Option<Instant> = None;
    let mut failing_since: Option<Instant> = None;
    loop {
        let started = Instant::now();
        match round(&ctx, &mut shards, &mut listed_at).await {
            Ok(()) => {
                failing_since = None;
                ctx.report_up(LEASES);
            }
            Err(e) => {
                if e.kind() == ErrorKind::Transient {
                    ctx.report_down(LEASES, &e);
                }
                let since = *failing_since.get_or_insert(started);
                if !e.is_temporary() || since.elapsed() > ctx.cfg.give_up_after {
                    ctx.shards
                        .inbox
                        .fail(e.with_context("while", "managing shard leases"));
                    return;
                }
                tracing::warn!(error = %e, "kinesis: lease round failed; retrying");
            }
        }
        tokio::time::sleep(tick.saturating_sub(started.elapsed())).await;
    }
}

pub(crate) async fn round(
    ctx: &SourceTasks,
    shards: &mut Vec<ShardInfo>,
    listed_at: &mut Option<Instant>,
) -> Result<(), Error> {
    let refresh = listed_at.is_none_or(|t| t.elapsed() >= ctx.cfg.shard_refresh);
    let ended_waiting = ctx.shards.inbox.buffered().owned.values().any(|o| o.ended);
    if refresh || ended_waiting {
        *shards = list_shards(&ctx.client, &ctx.cfg.stream).await?;
        *listed_at = Some(Instant::now());
    }
    renew(ctx).await?;
    finish_ended(ctx).await?;
    balance(ctx, shards).await
}

/// Renews every held lease; a lease another worker took is revoked as lost.
pub(crate) async fn renew(ctx: &SourceTasks) -> Result<(), Error> {
    let held: Vec<Lease> = ctx
        .shards
        .inbox
        .buffered()
        .owned
        .values()
        .map(|o| o.lease.clone())
        .collect();
    for lease in held {
        match ctx
            .leases
            .renew(&ctx.pipeline, &lease, ctx.cfg.lease_ttl)
            .await
        {
            Ok(renewed) => {
                if let Some(o) = ctx.shards.inbox.buffered().owned.get_mut(&lease.partition) {
                    o.lease = renewed;
                }
            }
            Err(e) if e.kind() == ErrorKind::Fenced => {
                tracing::warn!(shard = %lease.partition, "kinesis: lease taken by another worker; the shard is lost here");
                ctx.shards.inbox.buffered().owned.remove(&lease.partition);
                let (rev, _waiter) = Revocation::new(vec![lease.partition.clone()], true);
                ctx.shards.inbox.push_event(SourceEvent::Revoked(rev));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Finishes the leases of shards read to their end whose last record was committed, then
/// revokes them: their children become eligible.
pub(crate) async fn finish_ended(ctx: &SourceTasks) -> Result<(), Error> {
    let done: Vec<Lease> = ctx
        .shards
        .inbox
        .buffered()
        .owned
        .values()
        .filter(|o| {
            o.ended
                && o.buffer.is_empty()
                && match (&o.delivered, &o.committed) {
                    (None, _) => true,
                    (Some(d), Some(c)) => c >= d,
                    (Some(_), None) => false,
                }
        })
        .map(|o| o.lease.clone())
        .collect();
    for lease in done {
        ctx.leases.finish(&ctx.pipeline, &lease).await?;
        tracing::info!(shard = %lease.partition, "kinesis: shard read to its end and committed; lease finished");
        ctx.shards.inbox.buffered().owned.remove(&lease.partition);
        let (rev, _waiter) = Revocation::new(vec![lease.partition.clone()], false);
        ctx.shards.inbox.push_event(SourceEvent::Revoked(rev));
    }
    Ok(())
}

/// Takes free or expired leases up to this worker's fair share, then steals a bounded number
/// from workers above it.
pub(crate) async fn balance(ctx: &SourceTasks, shards: &[ShardInfo]) -> Result<(), Error> {
    let leases = ctx.leases.leases(&ctx.pipeline).await?;
    let by_id: HashMap<&PartitionId, &Lease> = leases.iter().map(|l| (&l.partition, l)).collect();
    let known: HashSet<&PartitionId> = shards.iter().map(|s| &s.id).collect();
    let finished = |p: &PartitionId| by_id.get(p).is_some_and(|l| l.finished);
    let eligible: Vec<&ShardInfo> = shards
        .iter()
        .filter(|s| !finished(&s.id))
        .filter(|s| s.parents.iter().all(|p| finished(p) || !known.contains(p)))
        .collect();
    let mut load: HashMap<String, Vec<&Lease>> = HashMap::new();
    for s in &eligible {
        if let Some(l) = by_id.get(&s.id) {
            if let (Some(owner), false) = (&l.owner, l.is_available()) {
                load.entry(owner.clone()).or_default().push(l);
            }
        }
    }
    let mut mine = ctx.shards.inbox.buffered().owned.len();
    let workers = load.len() + usize::from(!load.contains_key(&ctx.owner));
    let target = eligible.len().div_ceil(workers.max(1));
    for s in &eligible {
        if mine >= target {
            break;
        }
        let free = by_id.get(&s.id).is_none_or(|l| l.is_available());
        if free && !ctx.shards.inbox.buffered().owned.contains_key(&s.id) {
            if let Some(l) = ctx
                .leases
                .acquire(&ctx.pipeline, &s.id, &ctx.owner, ctx.cfg.lease_ttl, None)
                .await?
            {
                assign(ctx, l);
                mine += 1;
            }
        }
    }
    let mut steals = 0;
    while mine < target && steals < ctx.cfg.max_steals_per_round {
        let Some((victim, held)) = load
            .iter_mut()
            .filter(|(o, held)| **o != ctx.owner && held.len() > target)
            .max_by_key(|(_, held)| held.len())
        else {
            break;
        };
        let Some(l) = held.pop() else {
            break;
        };
        steals += 1;
        if let Some(taken) = ctx
            .leases
            .acquire(
                &ctx.pipeline,
                &l.partition,
                &ctx.owner,
                ctx.cfg.lease_ttl,
                Some(l.epoch),
            )
            .await?
        {
            tracing::info!(shard = %l.partition, from = %victim, "kinesis: took a lease over from a busier worker");
            assign(ctx, taken);
            mine += 1;
        }
    }
    Ok(())
}

pub(crate) fn assign(ctx: &SourceTasks, lease: Lease) {
    tracing::info!(shard = %lease.partition, epoch = lease.epoch, "kinesis: lease taken");
    let assignment = Assignment {
        partition: lease.partition.clone(),
        fence: Some(lease.epoch),
        broker_position: None,
    };
    ctx.shards.inbox.buffered().owned.insert(
        lease.partition.clone(),
        Owned {
            lease,
            buffer: VecDeque::new(),
            started: false,
            ended: false,
            delivered: None,
            committed: None,
            reader: None,
        },
    );
    ctx.shards
        .inbox
        .push_event(SourceEvent::Assigned(vec![assignment]));
}
