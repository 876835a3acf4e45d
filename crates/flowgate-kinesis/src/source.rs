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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use flowgate_core::retry::{Backoff, BackoffPolicy};
use flowgate_core::{
    Assignment, Checkpoint, Connection, Credits, Error, ErrorKind, LagSample, LagUnit, Lease,
    LeaseStore, PartitionId, Position, Record, Revocation, Source, SourceCapabilities,
    SourceContext, SourceEvent, StartPosition,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::config::{KinesisSourceConfig, StartAt};
use crate::error::{code, map};
use crate::kpl;

type Event = Result<SourceEvent, Error>;

/// Reads a Kinesis stream; several workers of one pipeline split its shards through leases.
/// See the module docs and `docs/brokers/kinesis.md`.
pub struct KinesisSource {
    cfg: KinesisSourceConfig,
    leases: Arc<dyn LeaseStore>,
    owner: String,
    shared: Arc<Shared>,
    run: Option<Running>,
}

/// What exists between `open` and `close`.
struct Running {
    ctx: Arc<Ctx>,
    events: mpsc::UnboundedReceiver<Event>,
    coordinator: JoinHandle<()>,
}

/// Everything the tasks share.
struct Ctx {
    cfg: KinesisSourceConfig,
    client: aws_sdk_kinesis::Client,
    leases: Arc<dyn LeaseStore>,
    owner: String,
    pipeline: String,
    credits: Credits,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    /// What cannot reach the endpoint now: the lease loop and shard readers, by name. The
    /// source is down while any is, up again once none is.
    failing: Mutex<std::collections::BTreeSet<String>>,
}

impl Ctx {
    /// `component` failed to reach Kinesis (or the lease store) with a temporary error.
    fn report_down(&self, component: &str, cause: &Error) {
        let mut failing = lock(&self.failing);
        if failing.is_empty() {
            let _ = self
                .events
                .send(Ok(SourceEvent::Connection(Connection::Down {
                    endpoint: endpoint(&self.cfg),
                    cause: cause.to_string(),
                })));
        }
        failing.insert(component.to_string());
    }

    /// `component` reached it again.
    fn report_up(&self, component: &str) {
        let mut failing = lock(&self.failing);
        if failing.remove(component) && failing.is_empty() {
            let _ = self
                .events
                .send(Ok(SourceEvent::Connection(Connection::Up)));
        }
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Records arrived or a shard ended (one waiter: `next`).
    ready: Notify,
    /// `next` emptied a shard's buffer (readers wait for it).
    drained: Notify,
}

#[derive(Default)]
struct State {
    owned: BTreeMap<PartitionId, Owned>,
    stats: HashMap<PartitionId, ShardStats>,
}

/// A shard this worker holds the lease of.
struct Owned {
    lease: Lease,
    buffer: VecDeque<Record>,
    started: bool,
    /// The reader saw the shard's end; everything it fetched is in `buffer` or delivered.
    ended: bool,
    /// Last position handed to the runtime.
    delivered: Option<Position>,
    /// Last position the runtime committed.
    committed: Option<Position>,
    reader: Option<JoinHandle<()>>,
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

/// Counter (labels `stream`, `shard`): `GetRecords` calls.
pub const GET_RECORDS_CALLS: &str = "flowgate_kinesis_get_records_calls_total";
/// Counter (labels `stream`, `shard`): reads refused for throttling.
pub const READ_THROTTLES: &str = "flowgate_kinesis_read_throttles_total";
/// Counter (labels `stream`, `shard`): shard iterators re-acquired after they expired.
pub const EXPIRED_ITERATORS: &str = "flowgate_kinesis_expired_iterators_total";

/// What one shard's reader did, for tests and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// `GetRecords` calls made.
    pub get_records_calls: u64,
    /// Most calls made within any one second.
    pub max_calls_per_second: u64,
    /// Calls refused for throttling (`ProvisionedThroughputExceededException`, …).
    pub throttles: u64,
    /// Iterators re-acquired after they expired.
    pub expired_iterators: u64,
    /// Records read.
    pub records: u64,
    recent: VecDeque<Instant>,
}

impl ShardStats {
    fn call(&mut self, now: Instant) {
        self.get_records_calls += 1;
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.max_calls_per_second = self.max_calls_per_second.max(self.recent.len() as u64);
    }
}

/// A handle on the source's per-shard statistics that stays valid after the source moved
/// into a pipeline.
#[derive(Clone)]
pub struct KinesisStats(Arc<Shared>);

impl KinesisStats {
    /// Statistics of every shard read so far.
    pub fn shards(&self) -> BTreeMap<PartitionId, ShardStats> {
        lock(&self.0.state)
            .stats
            .iter()
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect()
    }

    /// The shards this worker holds now.
    pub fn owned(&self) -> Vec<PartitionId> {
        lock(&self.0.state).owned.keys().cloned().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            shared: Arc::new(Shared::default()),
            run: None,
        })
    }

    /// This worker's name in the lease table.
    pub fn worker_id(&self) -> &str {
        &self.owner
    }

    /// Per-shard statistics (calls, throttles, expired iterators).
    pub fn stats(&self) -> KinesisStats {
        KinesisStats(self.shared.clone())
    }
}

/// Hands over buffered records within each shard's credit.
fn take_ready(shared: &Shared, credits: &Credits) -> Vec<Record> {
    let mut out = Vec::new();
    let mut drained = false;
    let mut st = lock(&shared.state);
    for (p, o) in st.owned.iter_mut() {
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
        drained |= o.buffer.is_empty();
    }
    drop(st);
    if drained {
        shared.drained.notify_waiters();
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
        let (tx, rx) = mpsc::unbounded_channel();
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
            let _ = tx.send(Ok(SourceEvent::Connection(Connection::Down {
                endpoint: endpoint(&self.cfg),
                cause: e.to_string(),
            })));
            // The lease loop's first good round reports the endpoint back.
            failing.insert(LEASES.to_string());
        }
        let run = Arc::new(Ctx {
            cfg: self.cfg.clone(),
            client,
            leases: self.leases.clone(),
            owner: self.owner.clone(),
            pipeline: ctx.pipeline.clone(),
            credits: ctx.credits,
            shared: self.shared.clone(),
            events: tx,
            failing: Mutex::new(failing),
        });
        tracing::info!(stream = %self.cfg.stream, worker = %self.owner, leases = %self.leases.describe(), "kinesis source open");
        let coordinator = tokio::spawn(coordinate(run.clone()));
        self.run = Some(Running {
            ctx: run,
            events: rx,
            coordinator,
        });
        Ok(())
    }

    async fn next(&mut self) -> Result<SourceEvent, Error> {
        let Some(run) = &self.run else {
            return Err(Error::fatal("kinesis source: next() before open()"));
        };
        let credits = run.ctx.credits.clone();
        let shared = self.shared.clone();
        loop {
            let changed = credits.changed();
            let ready = shared.ready.notified();
            let Some(run) = self.run.as_mut() else {
                return Err(Error::fatal("kinesis source: closed"));
            };
            match run.events.try_recv() {
                Ok(ev) => return ev,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(Error::fatal(
                        "kinesis source: the lease coordinator stopped",
                    ));
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            let records = take_ready(&shared, &credits);
            if !records.is_empty() {
                return Ok(SourceEvent::Records(records));
            }
            let Some(run) = self.run.as_mut() else {
                return Err(Error::fatal("kinesis source: closed"));
            };
            tokio::select! {
                ev = run.events.recv() => match ev {
                    Some(ev) => return ev,
                    None => return Err(Error::fatal("kinesis source: the lease coordinator stopped")),
                },
                _ = ready => {}
                _ = changed => {}
            }
        }
    }

    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        let Some(run) = &self.run else {
            return Err(Error::fatal("kinesis source: start() before open()"));
        };
        let mut st = lock(&self.shared.state);
        for s in starts {
            let Some(o) = st.owned.get_mut(&s.partition) else {
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
        let mut st = lock(&self.shared.state);
        for c in checkpoints {
            if let Some(o) = st.owned.get_mut(&c.partition) {
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
            let mut st = lock(&self.shared.state);
            let held = st.owned.values().map(|o| o.lease.clone()).collect();
            st.owned.clear();
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
        lock(&self.shared.state).owned.clear();
    }
}

/// A shard and its parents, from `ListShards`.
#[derive(Clone, Debug)]
struct ShardInfo {
    id: PartitionId,
    parents: Vec<PartitionId>,
}

async fn list_shards(
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
const LEASES: &str = "leases";

/// What a connection event names: the endpoint override, or the region's AWS endpoint.
fn endpoint(cfg: &KinesisSourceConfig) -> String {
    match (&cfg.connection.endpoint_url, &cfg.connection.region) {
        (Some(url), _) => format!("{url} (stream {})", cfg.stream),
        (None, Some(region)) => format!("Kinesis in {region} (stream {})", cfg.stream),
        (None, None) => format!("Kinesis in the default region (stream {})", cfg.stream),
    }
}

/// The lease loop: every third of the lease ttl.
async fn coordinate(ctx: Arc<Ctx>) {
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
                    let _ = ctx
                        .events
                        .send(Err(e.with_context("while", "managing shard leases")));
                    return;
                }
                tracing::warn!(error = %e, "kinesis: lease round failed; retrying");
            }
        }
        tokio::time::sleep(tick.saturating_sub(started.elapsed())).await;
    }
}

async fn round(
    ctx: &Ctx,
    shards: &mut Vec<ShardInfo>,
    listed_at: &mut Option<Instant>,
) -> Result<(), Error> {
    let refresh = listed_at.is_none_or(|t| t.elapsed() >= ctx.cfg.shard_refresh);
    let ended_waiting = lock(&ctx.shared.state).owned.values().any(|o| o.ended);
    if refresh || ended_waiting {
        *shards = list_shards(&ctx.client, &ctx.cfg.stream).await?;
        *listed_at = Some(Instant::now());
    }
    renew(ctx).await?;
    finish_ended(ctx).await?;
    balance(ctx, shards).await
}

/// Renews every held lease; a lease another worker took is revoked as lost.
async fn renew(ctx: &Ctx) -> Result<(), Error> {
    let held: Vec<Lease> = lock(&ctx.shared.state)
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
                if let Some(o) = lock(&ctx.shared.state).owned.get_mut(&lease.partition) {
                    o.lease = renewed;
                }
            }
            Err(e) if e.kind() == ErrorKind::Fenced => {
                tracing::warn!(shard = %lease.partition, "kinesis: lease taken by another worker; the shard is lost here");
                lock(&ctx.shared.state).owned.remove(&lease.partition);
                let (rev, _waiter) = Revocation::new(vec![lease.partition.clone()], true);
                let _ = ctx.events.send(Ok(SourceEvent::Revoked(rev)));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Finishes the leases of shards read to their end whose last record was committed, then
/// revokes them: their children become eligible.
async fn finish_ended(ctx: &Ctx) -> Result<(), Error> {
    let done: Vec<Lease> = lock(&ctx.shared.state)
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
        lock(&ctx.shared.state).owned.remove(&lease.partition);
        let (rev, _waiter) = Revocation::new(vec![lease.partition.clone()], false);
        let _ = ctx.events.send(Ok(SourceEvent::Revoked(rev)));
    }
    Ok(())
}

/// Takes free or expired leases up to this worker's fair share, then steals a bounded number
/// from workers above it.
async fn balance(ctx: &Ctx, shards: &[ShardInfo]) -> Result<(), Error> {
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
    let mut mine = lock(&ctx.shared.state).owned.len();
    let workers = load.len() + usize::from(!load.contains_key(&ctx.owner));
    let target = eligible.len().div_ceil(workers.max(1));
    for s in &eligible {
        if mine >= target {
            break;
        }
        let free = by_id.get(&s.id).is_none_or(|l| l.is_available());
        if free && !lock(&ctx.shared.state).owned.contains_key(&s.id) {
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

fn assign(ctx: &Ctx, lease: Lease) {
    tracing::info!(shard = %lease.partition, epoch = lease.epoch, "kinesis: lease taken");
    let assignment = Assignment {
        partition: lease.partition.clone(),
        fence: Some(lease.epoch),
        broker_position: None,
    };
    lock(&ctx.shared.state).owned.insert(
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
    let _ = ctx.events.send(Ok(SourceEvent::Assigned(vec![assignment])));
}

/// Whether this worker still owns `shard`, and its buffer is empty.
fn buffer_state(ctx: &Ctx, shard: &PartitionId) -> Option<bool> {
    lock(&ctx.shared.state)
        .owned
        .get(shard)
        .map(|o| o.buffer.is_empty())
}

/// One shard's reader; ends at the shard's end, on a fatal error, or when aborted.
async fn read_shard(ctx: Arc<Ctx>, shard: PartitionId, after: Option<Position>) {
    let mut iterator: Option<String> = None;
    let mut last = after;
    let mut next_call = tokio::time::Instant::now();
    // Failing reads wait on this; its budget runs from the first failure since a success.
    let policy = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(5))
        .with_give_up_after(ctx.cfg.give_up_after);
    let mut failing: Option<Backoff> = None;
    loop {
        // An empty buffer and credit, or wait.
        let credit = loop {
            let changed = ctx.credits.changed();
            let drained = ctx.shared.drained.notified();
            let Some(empty) = buffer_state(&ctx, &shard) else {
                return;
            };
            let credit = ctx.credits.available(&shard);
            if empty && credit > 0 {
                break credit;
            }
            tokio::select! {
                _ = changed => {}
                _ = drained => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        };
        tokio::time::sleep_until(next_call).await;
        let result = match &iterator {
            Some(it) => get_records(&ctx, &shard, it, credit).await,
            None => match shard_iterator(&ctx, &shard, last.as_ref()).await {
                Ok(it) => {
                    iterator = Some(it);
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(mut batch) => {
                ctx.report_up(shard.as_str());
                failing = None;
                // An iterator at the last record read returns it (or its aggregate) again.
                if let Some(l) = &last {
                    batch.records.retain(|r| r.position > *l);
                }
                if let Some(r) = batch.records.last() {
                    last = Some(r.position.clone());
                }
                let ended = batch.next_iterator.is_none();
                iterator = batch.next_iterator;
                let mut pace = ctx.cfg.min_call_interval.max(Duration::from_secs_f64(
                    batch.bytes as f64 / ctx.cfg.read_bytes_per_second as f64,
                ));
                if batch.records.is_empty() && !ended {
                    pace = pace.max(ctx.cfg.idle_backoff);
                }
                next_call = tokio::time::Instant::now() + pace;
                if let Some(ms) = batch.millis_behind {
                    let _ = ctx.events.send(Ok(SourceEvent::Lag(vec![LagSample {
                        partition: shard.clone(),
                        lag: u64::try_from(ms).unwrap_or(0),
                        unit: LagUnit::Millis,
                    }])));
                }
                {
                    let mut st = lock(&ctx.shared.state);
                    let n = batch.records.len() as u64;
                    st.stats.entry(shard.clone()).or_default().records += n;
                    let Some(o) = st.owned.get_mut(&shard) else {
                        return;
                    };
                    o.buffer.extend(batch.records);
                    o.ended = ended;
                }
                ctx.shared.ready.notify_one();
                if ended {
                    tracing::info!(shard = %shard, "kinesis: shard ended (resharded); its lease finishes once the rest is committed");
                    return;
                }
            }
            Err(Failure::Expired) => {
                lock(&ctx.shared.state)
                    .stats
                    .entry(shard.clone())
                    .or_default()
                    .expired_iterators += 1;
                count(EXPIRED_ITERATORS, &ctx.cfg.stream, &shard);
                tracing::info!(shard = %shard, "kinesis: shard iterator expired; re-acquiring it after the last record read");
                iterator = None;
            }
            Err(Failure::Error(e)) => {
                if e.kind() == ErrorKind::Throttled {
                    lock(&ctx.shared.state)
                        .stats
                        .entry(shard.clone())
                        .or_default()
                        .throttles += 1;
                    count(READ_THROTTLES, &ctx.cfg.stream, &shard);
                }
                if e.kind() == ErrorKind::Transient {
                    ctx.report_down(shard.as_str(), &e);
                }
                let backoff = failing.get_or_insert_with(|| policy.start());
                let wait = if e.is_temporary() {
                    backoff.next_delay()
                } else {
                    None
                };
                let Some(wait) = wait else {
                    let _ = ctx.events.send(Err(e.with_context("shard", &shard)));
                    return;
                };
                tracing::warn!(shard = %shard, error = %e, retry_in = ?wait, "kinesis: reading a shard failed; retrying");
                next_call = tokio::time::Instant::now() + wait;
            }
        }
    }
}

fn count(name: &'static str, stream: &str, shard: &PartitionId) {
    metrics::counter!(name, "stream" => stream.to_string(), "shard" => shard.to_string())
        .increment(1);
}

struct Fetched {
    records: Vec<Record>,
    bytes: usize,
    next_iterator: Option<String>,
    millis_behind: Option<i64>,
}

enum Failure {
    Expired,
    Error(Error),
}

async fn get_records(
    ctx: &Ctx,
    shard: &PartitionId,
    iterator: &str,
    credit: usize,
) -> Result<Fetched, Failure> {
    let limit = credit.min(ctx.cfg.max_records_per_call);
    lock(&ctx.shared.state)
        .stats
        .entry(shard.clone())
        .or_default()
        .call(Instant::now());
    count(GET_RECORDS_CALLS, &ctx.cfg.stream, shard);
    let out = ctx
        .client
        .get_records()
        .shard_iterator(iterator)
        .limit(i32::try_from(limit).unwrap_or(10_000))
        .send()
        .await;
    let out = match out {
        Ok(out) => out,
        Err(e) if code(&e).as_deref() == Some("ExpiredIteratorException") => {
            return Err(Failure::Expired);
        }
        Err(e) => {
            return Err(Failure::Error(map(
                e,
                "reading a shard (GetRecords)",
                &ctx.cfg.stream,
            )));
        }
    };
    let mut bytes = 0;
    let mut records = Vec::with_capacity(out.records.len());
    for r in out.records {
        let data = r.data.into_inner();
        bytes += data.len() + r.partition_key.len();
        let timestamp = r
            .approximate_arrival_timestamp
            .and_then(|t| SystemTime::try_from(t).ok());
        // KPL aggregates become their user records, each with a position of its own.
        for part in kpl::split(Bytes::from(data), Bytes::from(r.partition_key.into_bytes())) {
            let position =
                kpl::position(&r.sequence_number, part.sub_sequence).ok_or_else(|| {
                    Failure::Error(
                        Error::fatal("kinesis: a sequence number is not a decimal number")
                            .with_context("shard", shard)
                            .with_context("sequence_number", &r.sequence_number),
                    )
                })?;
            let mut rec =
                Record::new(shard.clone(), position, part.data).with_key(part.partition_key);
            rec.timestamp = timestamp;
            records.push(rec);
        }
    }
    Ok(Fetched {
        records,
        bytes,
        next_iterator: out.next_shard_iterator,
        millis_behind: out.millis_behind_latest,
    })
}

/// An iterator after `after` (the last record read), or at the configured start.
async fn shard_iterator(
    ctx: &Ctx,
    shard: &PartitionId,
    after: Option<&Position>,
) -> Result<String, Failure> {
    let mut req = ctx
        .client
        .get_shard_iterator()
        .stream_name(&ctx.cfg.stream)
        .shard_id(shard.as_str());
    req = match (after, ctx.cfg.start) {
        // *At* the record: after a checkpoint inside a KPL aggregate its remaining user records
        // come next; the reader drops what is at or before `after`.
        (Some(p), _) => {
            let (seq, _) = kpl::sequence_of(p).ok_or_else(|| {
                Failure::Error(
                    Error::fatal("kinesis: a stored position is not a Kinesis position")
                        .with_context("shard", shard)
                        .with_context("position", p),
                )
            })?;
            req.shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(seq)
        }
        (None, StartAt::TrimHorizon) => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        (None, StartAt::Latest) => req.shard_iterator_type(ShardIteratorType::Latest),
        (None, StartAt::AtTimestamp) => req
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from_millis(ctx.cfg.at_timestamp_ms.unwrap_or(0))),
    };
    let out = req.send().await.map_err(|e| {
        if let (Some(p), Some("InvalidArgumentException")) = (after, code(&e).as_deref()) {
            // A checkpoint that names no record of the shard: refuse, and say which.
            return Failure::Error(
                Error::config("kinesis: the stored checkpoint names no record of this shard")
                    .with_context("stream", &ctx.cfg.stream)
                    .with_context("shard", shard)
                    .with_context("position", p)
                    .with_context("cause", e)
                    .with_hint("positions are sequence number × 2^20 + KPL sub-sequence (docs/brokers/kinesis.md); a checkpoint holding a raw sequence number, or one of another stream, must be reset: `flowgate checkpoints reset -c FILE --partition SHARD`"),
            );
        }
        Failure::Error(map(
            e,
            "getting a shard iterator (GetShardIterator)",
            &ctx.cfg.stream,
        ))
    })?;
    out.shard_iterator.ok_or_else(|| {
        Failure::Error(
            Error::transient("kinesis: GetShardIterator returned no iterator")
                .with_context("shard", shard),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_per_second_are_counted_over_a_sliding_second() {
        let mut s = ShardStats::default();
        let t0 = Instant::now();
        for i in 0..10 {
            s.call(t0 + Duration::from_millis(200 * i));
        }
        assert_eq!(s.get_records_calls, 10);
        assert_eq!(s.max_calls_per_second, 5);
        for i in 0..5 {
            s.call(t0 + Duration::from_millis(5_000 + 10 * i));
        }
        assert_eq!(s.max_calls_per_second, 5);
        s.call(t0 + Duration::from_millis(5_990));
        assert_eq!(s.max_calls_per_second, 6, "six calls within one second");
    }
}
