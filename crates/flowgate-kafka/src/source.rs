//! The Kafka source: a `BaseConsumer` whose partitions each get a librdkafka queue of their own.
//!
//! - A poll thread serves the consumer's main queue continuously (rebalance callbacks, commits,
//!   errors), so the member never exceeds `max.poll.interval.ms` however slow the sink is.
//! - Every assigned partition's messages go to its own librdkafka queue (split before the
//!   partition is assigned). `next()` reads a partition's queue only up to that partition's
//!   credit, so the runtime never receives more than it can hold, and librdkafka's prefetch
//!   (`queued.max.messages.kbytes` per partition) is the only buffer: no second copy.
//! - A partition whose credit stays at zero for `pause_after` is **paused** (librdkafka stops
//!   fetching it and frees its prefetch, the member stays in the group) and resumed when credit
//!   returns. Short dips in credit do not pause: a pause throws the prefetch away and a resume
//!   waits for the broker's next fetch round, which would cost more than it saves.
//! - Rebalances run inside rdkafka's callback on the poll thread: an assignment waits for the
//!   runtime's start positions (checkpoint store first, then the group's committed offset) and
//!   assigns with those offsets; a revocation drops the revoked partitions' queues (their
//!   prefetched records were never handed out), waits (bounded) for the runtime to drain their
//!   in-flight records, and commits the final positions before the partitions are released.
//! - Offsets are committed only through `Source::commit`: `enable.auto.commit=false`,
//!   `enable.auto.offset.store=false`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::retry::{Backoff, BackoffPolicy};
use flowgate_core::{
    Assignment, Checkpoint, Connection, Credits, Error, Headers, LagSample, LagUnit, PartitionId,
    Position, Record, Revocation, Source, SourceCapabilities, SourceContext, SourceEvent,
    StartPosition,
};
use rdkafka::Message;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, DefaultConsumerContext,
};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Headers as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio::sync::Notify;

use crate::client::{Brokers, auth_error, is_auth_failure};
use crate::config::{AssignmentStrategy, GroupProtocol, KafkaSourceConfig, is_secret};
use crate::error::map;
use crate::queue::PartitionFeed;

type Key = (String, i32);

/// `topic/partition`, the partition id the Kafka adapter uses.
pub fn partition_id(topic: &str, partition: i32) -> PartitionId {
    PartitionId::new(format!("{topic}/{partition}"))
}

fn parse_partition_id(p: &PartitionId) -> Option<Key> {
    let (topic, part) = p.as_str().rsplit_once('/')?;
    Some((topic.to_string(), part.parse().ok()?))
}

enum Command {
    Start(Vec<StartPosition>),
    Commit(Vec<Checkpoint>),
}

/// An assigned partition.
struct Part {
    key: Key,
    id: PartitionId,
    /// The partition's own librdkafka queue; `None` if it could not be split off (its
    /// messages then arrive on the main queue and wait in `stray`).
    queue: Option<PartitionFeed<Ctx>>,
    /// Messages of this partition that arrived on the main queue.
    stray: VecDeque<Record>,
    paused: bool,
    /// Since when the partition has had no credit.
    starved_since: Option<Instant>,
    /// Next offset to be handed to the runtime (for lag): an offset once known, or the logical
    /// start (`Beginning`, `End`) resolved against the watermarks until the first record.
    next_offset: Offset,
}

#[derive(Default)]
struct Shared {
    parts: Vec<Part>,
    events: VecDeque<SourceEvent>,
    error: Option<Error>,
    /// The last error librdkafka reported on the consumer (a refused connection, say).
    client_error: Option<String>,
    /// librdkafka's last error log line, which says why.
    client_log: Option<String>,
    rr: usize,
}

impl Shared {
    fn part_mut(&mut self, key: &Key) -> Option<&mut Part> {
        self.parts.iter_mut().find(|p| &p.key == key)
    }
}

struct Ctx {
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    commands: Mutex<std_mpsc::Receiver<Command>>,
    closing: Arc<AtomicBool>,
    helper: Arc<Mutex<Option<BaseConsumer>>>,
    commits: Mutex<Commits>,
    /// The consumer itself, to split partition queues off inside the rebalance callback.
    me: Mutex<Weak<BaseConsumer<Ctx>>>,
    /// Offsets are committed inside a transactional sink's transactions (see
    /// [`OffsetsLink`]): the consumer commits nothing itself and starts where they left off.
    transactional: Arc<AtomicBool>,
    strategy: AssignmentStrategy,
    rebalance_timeout: Duration,
    /// Where a partition without a committed offset starts (`auto.offset.reset`), as a
    /// logical offset; `Offset::Invalid` leaves the choice to librdkafka.
    reset: Offset,
}

/// Broker commits, coalesced: the newest offset per partition waits while one asynchronous
/// commit is in flight (the broker takes milliseconds per commit; firing one per runtime
/// checkpoint builds a backlog that delays every later commit and the consumer's close).
#[derive(Default)]
struct Commits {
    pending: HashMap<Key, i64>,
    in_flight_since: Option<Instant>,
    /// The highest offset the broker acknowledged per partition: a failed commit is retried
    /// only if it is still above it, so a late failure never moves the group's offset back.
    acknowledged: HashMap<Key, i64>,
    /// After a failure, no commit before this moment.
    retry_at: Option<Instant>,
    /// The waits between failed commits (100 ms doubling to 5 s), from the first failure
    /// since the last acknowledged commit.
    failing: Option<Backoff>,
}

/// Failed commits wait 100 ms, doubling to 5 s, for as long as they fail (the group's
/// offsets only lag; nothing is lost while they do).
const COMMIT_BACKOFF: BackoffPolicy =
    BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(5));

impl Commits {
    fn acknowledged(&mut self, offsets: &[(Key, i64)]) {
        self.in_flight_since = None;
        self.retry_at = None;
        self.failing = None;
        for (k, o) in offsets {
            let e = self.acknowledged.entry(k.clone()).or_insert(*o);
            *e = (*e).max(*o);
        }
    }

    /// Puts back the failed offsets still worth committing and backs off.
    fn failed(&mut self, offsets: &[(Key, i64)]) {
        self.in_flight_since = None;
        for (k, o) in offsets {
            if self.acknowledged.get(k).is_some_and(|a| a >= o) {
                continue;
            }
            let e = self.pending.entry(k.clone()).or_insert(*o);
            *e = (*e).max(*o);
        }
        let wait = self
            .failing
            .get_or_insert_with(|| COMMIT_BACKOFF.start())
            .next_delay()
            .unwrap_or(COMMIT_BACKOFF.max);
        self.retry_at = Some(Instant::now() + wait);
    }
}

/// How long a lag reading or reachability probe waits for the brokers.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// An asynchronous commit without an answer for this long no longer holds the next one back.
const COMMIT_STALL: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClientContext for Ctx {
    /// librdkafka's log, forwarded to `tracing` as rust-rdkafka does; the last error line is
    /// kept, since the consumer's error events carry only a code ("Authentication") and the
    /// log says why ("invalid credentials with SASL mechanism SCRAM-SHA-512").
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}");
                lock(&self.shared).client_log = Some(message.to_string());
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }
}

impl ConsumerContext for Ctx {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        let answered: Vec<(Key, i64)> = offsets
            .elements()
            .iter()
            .filter_map(|el| match el.offset() {
                Offset::Offset(o) => Some(((el.topic().to_string(), el.partition()), o)),
                _ => None,
            })
            .collect();
        match result {
            Ok(()) => lock(&self.commits).acknowledged(&answered),
            Err(e) => {
                // Fenced by the group (a rebalance, a newer generation): the revocation's final
                // commit is the last word, so nothing is retried.
                let fenced = matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::IllegalGeneration
                            | RDKafkaErrorCode::UnknownMemberId
                            | RDKafkaErrorCode::RebalanceInProgress
                            | RDKafkaErrorCode::FencedInstanceId
                            | RDKafkaErrorCode::StaleMemberEpoch
                    )
                );
                tracing::warn!(error = %e, fenced, "kafka: offset commit failed");
                let owned: Vec<Key> = lock(&self.shared)
                    .parts
                    .iter()
                    .map(|p| p.key.clone())
                    .collect();
                let retry: Vec<(Key, i64)> = if fenced {
                    Vec::new()
                } else {
                    answered
                        .into_iter()
                        .filter(|(k, _)| owned.contains(k))
                        .collect()
                };
                lock(&self.commits).failed(&retry);
            }
        }
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.on_revoke(consumer, tpl),
            other => tracing::error!(error = ?other, "kafka: rebalance error"),
        }
    }
}

impl Ctx {
    /// Takes the runtime's commit requests into the pending offsets.
    fn absorb(&self, checkpoints: &[Checkpoint]) {
        if self.transactional.load(Ordering::Acquire) {
            // A commit outside the transactions could move the group's offset backwards.
            return;
        }
        let mut c = lock(&self.commits);
        for cp in checkpoints {
            let (Some(key), Some(next)) = (
                parse_partition_id(&cp.partition),
                cp.position.successor().as_offset(),
            ) else {
                continue;
            };
            let e = c.pending.entry(key).or_insert(next);
            *e = (*e).max(next);
        }
    }

    /// Commits the pending offsets: asynchronously unless one is still in flight, or
    /// synchronously (on close).
    fn flush_commits(&self, consumer: &BaseConsumer<Self>, mode: CommitMode) {
        let pending = {
            let mut c = lock(&self.commits);
            if c.pending.is_empty() {
                return;
            }
            if matches!(mode, CommitMode::Async) {
                if c.in_flight_since
                    .is_some_and(|t| t.elapsed() < COMMIT_STALL)
                    || c.retry_at.is_some_and(|t| Instant::now() < t)
                {
                    return;
                }
                c.in_flight_since = Some(Instant::now());
            }
            std::mem::take(&mut c.pending)
        };
        if !commit(consumer, pending, mode) {
            lock(&self.commits).in_flight_since = None;
        }
    }

    /// Drains the command channel (outside the assignment wait): commits are absorbed.
    fn drain_commands(&self) {
        loop {
            let cmd = lock(&self.commands).try_recv();
            match cmd {
                Ok(Command::Commit(cps)) => self.absorb(&cps),
                Ok(Command::Start(_)) => {
                    tracing::warn!("kafka: start positions arrived after the assignment timed out")
                }
                Err(_) => break,
            }
        }
    }

    fn push_event(&self, ev: SourceEvent) {
        lock(&self.shared).events.push_back(ev);
        self.notify.notify_one();
    }

    /// The group's committed offsets, read through a separate unsubscribed consumer (reading
    /// them on the subscribed one was seen to hang librdkafka's destroy). `None` when they
    /// could not be read: then a partition without an entry may still have one.
    fn committed(&self, tpl: &TopicPartitionList) -> Option<HashMap<Key, i64>> {
        let helper = lock(&self.helper);
        let h = helper.as_ref()?;
        match h.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(list) => Some(
                list.elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "kafka: cannot read the group's committed offsets; starting from the checkpoint store or auto.offset.reset");
                None
            }
        }
    }

    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let read = self.committed(tpl);
        let known = read.is_some();
        let committed = read.unwrap_or_default();
        let keys: Vec<Key> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        // The generation that handed these partitions out fences their checkpoints: a member
        // that lost them in a later generation can no longer write over the new owner's.
        let generation = crate::queue::generation(consumer);
        let assignments: Vec<Assignment> = keys
            .iter()
            .map(|(t, p)| {
                let mut a = Assignment::new(partition_id(t, *p));
                a.fence = generation;
                a.broker_position = committed.get(&(t.clone(), *p)).and_then(|o| {
                    if *o > 0 {
                        Position::from_offset(o - 1)
                    } else {
                        None
                    }
                });
                a
            })
            .collect();
        tracing::info!(partitions = ?keys, generation, "kafka: partitions assigned; waiting for start positions");
        self.push_event(SourceEvent::Assigned(assignments));
        // Wait for the runtime's start positions (it reads the checkpoint store).
        let starts = self.wait_for_start(consumer);
        let mut assign = TopicPartitionList::new();
        for (t, p) in &keys {
            let id = partition_id(t, *p);
            let after = starts
                .as_ref()
                .and_then(|s| s.iter().find(|s| s.partition == id))
                .and_then(|s| s.after.clone());
            let group_offset = match committed.get(&(t.clone(), *p)) {
                Some(o) => Offset::Offset(*o),
                // Known to have no committed offset: start at auto.offset.reset's end right
                // away. Handed `Offset::Invalid`, librdkafka reads the committed offset again
                // and, finding none, waits 100 ms before it asks for the reset offset.
                None if known => self.reset,
                None => Offset::Invalid,
            };
            let offset = if self.transactional.load(Ordering::Acquire) {
                // The transactions committed these with the output: they are the truth.
                group_offset
            } else {
                match after.and_then(|a| a.successor().as_offset()) {
                    Some(o) => Offset::Offset(o),
                    None => group_offset,
                }
            };
            if let Err(e) = assign.add_partition_offset(t, *p, offset) {
                tracing::error!(error = %e, "kafka: cannot set a start offset");
            }
            let next_offset = offset;
            let queue = self.split(t, *p);
            let key = (t.clone(), *p);
            let mut sh = lock(&self.shared);
            sh.parts.retain(|x| x.key != key);
            sh.parts.push(Part {
                key,
                id,
                queue,
                stray: VecDeque::new(),
                paused: false,
                starved_since: None,
                next_offset,
            });
        }
        let res = match self.strategy {
            AssignmentStrategy::Cooperative => consumer.incremental_assign(&assign),
            AssignmentStrategy::Eager => consumer.assign(&assign),
        };
        if let Err(e) = res {
            lock(&self.shared).error = Some(map(e, "assigning partitions"));
            self.notify.notify_one();
        }
    }

    /// The partition's own queue, waking `next()` when it turns non-empty.
    fn split(&self, topic: &str, partition: i32) -> Option<PartitionFeed<Ctx>> {
        let me = lock(&self.me).upgrade()?;
        let notify = self.notify.clone();
        let feed = PartitionFeed::split(&me, topic, partition, move || notify.notify_one());
        if feed.is_none() {
            tracing::warn!(
                topic,
                partition,
                "kafka: cannot give the partition a queue of its own; its records go through the main queue"
            );
        }
        feed
    }

    fn wait_for_start(&self, consumer: &BaseConsumer<Self>) -> Option<Vec<StartPosition>> {
        let deadline = Instant::now() + self.rebalance_timeout;
        let rx = lock(&self.commands);
        while Instant::now() < deadline && !self.closing.load(Ordering::Acquire) {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Command::Start(s)) => return Some(s),
                Ok(Command::Commit(cps)) => {
                    self.absorb(&cps);
                    self.flush_commits(consumer, CommitMode::Async);
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        tracing::warn!(
            "kafka: no start positions from the runtime in time; using the group's committed offsets"
        );
        None
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let keys: Vec<Key> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let lost = consumer.assignment_lost();
        // Queued records of revoked partitions were never handed out: the next owner reads them.
        let removed: Vec<Part> = {
            let mut sh = lock(&self.shared);
            let (gone, kept) = std::mem::take(&mut sh.parts)
                .into_iter()
                .partition(|p| keys.contains(&p.key));
            sh.parts = kept;
            gone
        };
        let ids: Vec<PartitionId> = removed.iter().map(|p| p.id.clone()).collect();
        // Dropping the queues before the unassign returns their prefetch to librdkafka.
        drop(removed);
        // No commit for a partition once it is revoked: a stale one would move the next
        // owner's committed offset back. The final positions below are the last word.
        self.drain_commands();
        lock(&self.commits).pending.retain(|k, _| !keys.contains(k));
        if !self.closing.load(Ordering::Acquire) && !ids.is_empty() {
            let (rev, waiter) = Revocation::new(ids, lost);
            self.push_event(SourceEvent::Revoked(rev));
            if !lost {
                // The runtime finishes in-flight records, writes the checkpoints, hands back
                // the final positions; commit them before the partitions are released.
                let finals: HashMap<Key, i64> = waiter
                    .wait_blocking(self.rebalance_timeout)
                    .iter()
                    .filter_map(|c| {
                        Some((
                            parse_partition_id(&c.partition)?,
                            c.position.successor().as_offset()?,
                        ))
                    })
                    .filter(|(k, _)| keys.contains(k))
                    .collect();
                self.drain_commands();
                lock(&self.commits).pending.retain(|k, _| !keys.contains(k));
                if !self.transactional.load(Ordering::Acquire) {
                    let sent: Vec<(Key, i64)> =
                        finals.iter().map(|(k, o)| (k.clone(), *o)).collect();
                    if commit(consumer, finals, CommitMode::Sync) {
                        lock(&self.commits).acknowledged(&sent);
                    }
                }
            }
        }
        tracing::info!(partitions = ?keys, lost, "kafka: partitions revoked");
        let res = match self.strategy {
            AssignmentStrategy::Cooperative => consumer.incremental_unassign(tpl),
            AssignmentStrategy::Eager => consumer.unassign(),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "kafka: unassign failed");
        }
    }
}

/// Commits `offsets`; `false` if the commit could not even be sent.
fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    offsets: HashMap<Key, i64>,
    mode: CommitMode,
) -> bool {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), next) in offsets {
        if tpl
            .add_partition_offset(&t, p, Offset::Offset(next))
            .is_err()
        {
            continue;
        }
    }
    if tpl.count() == 0 {
        return true;
    }
    let res = match mode {
        CommitMode::Async => crate::queue::commit_async(consumer, &tpl),
        CommitMode::Sync => consumer.commit(&tpl, mode),
    };
    match res {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "kafka: offset commit failed; the next commit covers it");
            false
        }
    }
}

/// Apache Kafka source. See the module docs for how credit, rebalances and commits work.
pub struct KafkaSource {
    cfg: KafkaSourceConfig,
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    commands: Option<std_mpsc::Sender<Command>>,
    closing: Arc<AtomicBool>,
    done: Option<std_mpsc::Receiver<()>>,
    credits: Option<Credits>,
    link: OffsetsLink,
}

/// A handle on a [`KafkaSource`]'s group membership for a transactional
/// [`KafkaSink`](crate::KafkaSink): the sink commits the consumed offsets inside each of its
/// transactions (with the group's current generation, so a zombie member's transaction is
/// refused by the broker), and the source stops committing on its own and starts every
/// assigned partition at the group's committed offset. Obtain it with
/// [`KafkaSource::offsets_link`].
#[derive(Clone, Default)]
pub struct OffsetsLink {
    consumer: Arc<Mutex<Weak<BaseConsumer<Ctx>>>>,
    transactional: Arc<AtomicBool>,
}

impl OffsetsLink {
    /// The group's current metadata (member, generation), once the consumer is open.
    pub(crate) fn group_metadata(&self) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
        lock(&self.consumer).upgrade()?.group_metadata()
    }
}

impl std::fmt::Debug for OffsetsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffsetsLink")
            .field("open", &(lock(&self.consumer).strong_count() > 0))
            .finish()
    }
}

impl KafkaSource {
    /// A source; nothing connects before `open`.
    pub fn new(cfg: KafkaSourceConfig) -> Result<Self, Error> {
        if cfg.topics.is_empty() {
            return Err(Error::config("kafka source: no topics to subscribe to")
                .with_context("key", "source.topics"));
        }
        if !(1..=10_000_000).contains(&cfg.prefetch_records) {
            return Err(
                Error::config("kafka source: prefetch_records must be 1 to 10,000,000")
                    .with_context("key", "source.prefetch_records"),
            );
        }
        if cfg.max_batch == 0 {
            return Err(Error::config("kafka source: max_batch must be at least 1")
                .with_context("key", "source.max_batch"));
        }
        if cfg.rebalance_timeout >= cfg.max_poll_interval {
            return Err(Error::config(format!(
                "kafka source: rebalance_timeout ({:?}) must be shorter than max_poll_interval ({:?})",
                cfg.rebalance_timeout, cfg.max_poll_interval
            ))
            .with_context("key", "source.rebalance_timeout")
            .with_hint("a revocation's drain runs inside the poll loop: librdkafka would leave the group while it waits"));
        }
        Ok(KafkaSource {
            cfg,
            shared: Arc::default(),
            notify: Arc::new(Notify::new()),
            commands: None,
            closing: Arc::new(AtomicBool::new(false)),
            done: None,
            credits: None,
            link: OffsetsLink::default(),
        })
    }

    /// Hands the committing of offsets to a transactional sink (Kafka→Kafka exactly-once):
    /// see [`OffsetsLink`]. Call before the pipeline starts.
    pub fn offsets_link(&self) -> OffsetsLink {
        self.link.transactional.store(true, Ordering::Release);
        self.link.clone()
    }

    /// How the clients reach the brokers, as settings and as errors name it.
    fn connection(&self) -> Brokers<'_> {
        Brokers {
            bootstrap_servers: &self.cfg.bootstrap_servers,
            security_protocol: self.cfg.security_protocol,
            tls: self.cfg.tls.as_ref(),
            sasl: self.cfg.sasl.as_ref(),
            side: "source",
        }
    }

    pub(crate) fn client_config(&self, group: &str) -> Result<ClientConfig, Error> {
        let c = &self.cfg;
        let mut cc = ClientConfig::new();
        self.connection().apply(&mut cc)?;
        cc.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &c.auto_offset_reset)
            .set(
                "max.poll.interval.ms",
                c.max_poll_interval.as_millis().to_string(),
            )
            .set(
                "queued.max.messages.kbytes",
                c.queued_max_messages_kbytes.to_string(),
            )
            .set("queued.min.messages", c.prefetch_records.to_string())
            .set("fetch.max.bytes", c.fetch_max_bytes.to_string())
            // librdkafka waits this long before it looks again at a partition whose prefetch
            // is full (it is not woken when the application drains it). Its default (1 s),
            // and even 10 ms, leaves a small prefetch empty before the next fetch is sent:
            // 1 ms measured 1.8× the rate of 10 ms, for one more point of CPU behind a slow
            // sink (docs/brokers/kafka.md).
            .set("fetch.queue.backoff.ms", "1")
            // librdkafka keeps one fetch in flight per broker. When it names only partitions
            // with nothing new (the others' prefetch was full as it left), the broker holds it
            // this long, and the partitions whose prefetch drained meanwhile wait for it: at the
            // default (500 ms) this stalled a catching-up partition for half a second. The
            // price is one empty fetch per broker per 100 ms while idle.
            .set("fetch.wait.max.ms", "100");
        match c.group_protocol {
            GroupProtocol::Classic => {
                cc.set(
                    "session.timeout.ms",
                    c.session_timeout.as_millis().to_string(),
                )
                .set(
                    "partition.assignment.strategy",
                    match c.assignment {
                        AssignmentStrategy::Cooperative => "cooperative-sticky",
                        AssignmentStrategy::Eager => "range",
                    },
                );
            }
            // The broker assigns, incrementally, and owns the session timeout.
            GroupProtocol::Consumer => {
                cc.set("group.protocol", "consumer");
            }
        }
        if let Some(id) = &c.group_instance_id {
            cc.set("group.instance.id", id);
        }
        for (k, v) in &c.properties {
            if is_secret(k) {
                tracing::debug!(key = %k, "kafka: passing a secret property through (value not logged)");
            }
            cc.set(k, v);
        }
        Ok(cc)
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::replayable_ordered()
            .with_dynamic_assignment(true)
            .with_broker_positions(true)
    }

    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        let group = self
            .cfg
            .group_id
            .clone()
            .unwrap_or_else(|| ctx.pipeline.clone());
        let (cmd_tx, cmd_rx) = std_mpsc::channel();
        let helper: BaseConsumer<DefaultConsumerContext> = self
            .client_config(&group)?
            .create()
            .map_err(|e| map(e, "creating the offsets reader"))?;
        let helper = Arc::new(Mutex::new(Some(helper)));
        let kctx = Ctx {
            shared: self.shared.clone(),
            notify: self.notify.clone(),
            commands: Mutex::new(cmd_rx),
            closing: self.closing.clone(),
            helper: helper.clone(),
            commits: Mutex::default(),
            me: Mutex::new(Weak::new()),
            transactional: self.link.transactional.clone(),
            strategy: match self.cfg.group_protocol {
                GroupProtocol::Classic => self.cfg.assignment,
                GroupProtocol::Consumer => AssignmentStrategy::Cooperative,
            },
            rebalance_timeout: self.cfg.rebalance_timeout,
            reset: reset_offset(
                self.cfg
                    .properties
                    .get("auto.offset.reset")
                    .unwrap_or(&self.cfg.auto_offset_reset),
            ),
        };
        let consumer: Arc<BaseConsumer<Ctx>> = Arc::new(
            self.client_config(&group)?
                .create_with_context(kctx)
                .map_err(|e| map(e, "creating the consumer"))?,
        );
        *lock(&consumer.context().me) = Arc::downgrade(&consumer);
        *lock(&self.link.consumer) = Arc::downgrade(&consumer);
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| map(e, "subscribing").with_context("topics", self.cfg.topics.join(",")))?;
        let (done_tx, done_rx) = std_mpsc::channel();
        let poller = Poller {
            endpoint: self.connection().describe(),
            credits: ctx.credits.clone(),
            shared: self.shared.clone(),
            notify: self.notify.clone(),
            pause_after: self.cfg.pause_after,
        };
        let lag = LagReader {
            helper,
            topics: self.cfg.topics.clone(),
            endpoint: self.connection().describe(),
            reachable: Mutex::new(None),
            shared: self.shared.clone(),
            notify: self.notify.clone(),
            closing: self.closing.clone(),
        };
        std::thread::Builder::new()
            .name("flowgate-kafka-lag".into())
            .spawn(move || lag.run())
            .map_err(|e| Error::fatal("cannot start the Kafka lag thread").with_source(e))?;
        let closing = self.closing.clone();
        std::thread::Builder::new()
            .name("flowgate-kafka-poll".into())
            .spawn(move || {
                poller.run(&consumer, &closing);
                // The last commits the runtime asked for, then leave the group and drop every
                // handle on the consumer so it closes here.
                let ctx = consumer.context();
                ctx.drain_commands();
                ctx.flush_commits(&consumer, CommitMode::Sync);
                consumer.unsubscribe();
                lock(&poller.shared).parts.clear();
                if let Some(h) = lock(&ctx.helper).take() {
                    drop(h);
                }
                drop(consumer);
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::fatal("cannot start the Kafka poll thread").with_source(e))?;
        self.commands = Some(cmd_tx);
        self.done = Some(done_rx);
        self.credits = Some(ctx.credits);
        tracing::info!(group = %group, topics = ?self.cfg.topics, servers = %self.cfg.bootstrap_servers, "kafka: consumer started");
        Ok(())
    }

    async fn next(&mut self) -> Result<SourceEvent, Error> {
        let Some(credits) = self.credits.clone() else {
            return Err(Error::fatal("KafkaSource::next called before open"));
        };
        loop {
            let notified = self.notify.notified();
            let changed = credits.changed();
            {
                let mut sh = lock(&self.shared);
                if let Some(e) = sh.error.take() {
                    return Err(e);
                }
                if let Some(ev) = sh.events.pop_front() {
                    return Ok(ev);
                }
                let n = sh.parts.len();
                let start = sh.rr;
                for i in 0..n {
                    let part = &mut sh.parts[(start + i) % n];
                    let take = credits.available(&part.id).min(self.cfg.max_batch);
                    let batch = part.take(take);
                    if let Some(last) = batch.last().and_then(|r| r.position.as_offset()) {
                        part.next_offset = Offset::Offset(last + 1);
                        sh.rr = (start + i + 1) % n;
                        return Ok(SourceEvent::Records(batch));
                    }
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        match &self.commands {
            Some(tx) => tx
                .send(Command::Start(starts))
                .map_err(|_| Error::fatal("the Kafka poll thread stopped")),
            None => Err(Error::fatal("KafkaSource::start called before open")),
        }
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        // Fire and forget: the poll thread commits (asynchronously to the broker). Waiting here
        // could deadlock with a rebalance callback waiting for the runtime.
        match &self.commands {
            Some(tx) => tx
                .send(Command::Commit(checkpoints.to_vec()))
                .map_err(|_| Error::fatal("the Kafka poll thread stopped")),
            None => Ok(()),
        }
    }

    async fn inspect(
        &mut self,
        pipeline: &str,
        checkpoints: &[Checkpoint],
    ) -> Result<Vec<flowgate_core::PartitionView>, Error> {
        let group = self
            .cfg
            .group_id
            .clone()
            .unwrap_or_else(|| pipeline.to_string());
        let cc = self.client_config(&group)?;
        let topics = self.cfg.topics.clone();
        let earliest = reset_offset(&self.cfg.auto_offset_reset) != Offset::End;
        let checkpoints = checkpoints.to_vec();
        let conn = self.connection();
        let endpoint = conn.describe();
        tokio::task::spawn_blocking(move || {
            crate::lag::inspect(&cc, &topics, &group, earliest, &checkpoints)
        })
        .await
        .map_err(|e| Error::fatal("the Kafka lag reader panicked").with_context("cause", e))?
        .map_err(|e| e.with_context("brokers", endpoint))
    }

    async fn close(&mut self) -> Result<(), Error> {
        self.closing.store(true, Ordering::Release);
        if let Some(done) = self.done.take() {
            let res =
                tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(20)))
                    .await;
            if !matches!(res, Ok(Ok(()))) {
                tracing::warn!("kafka: the consumer did not close within 20 s; abandoned");
            }
        }
        self.commands = None;
        Ok(())
    }
}

impl Drop for KafkaSource {
    /// A source dropped without `close` (its pipeline aborted) still stops its threads, which
    /// leave the group.
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
    }
}

impl Part {
    /// Up to `max` records: first those that came through the main queue, then the
    /// partition's own queue, without waiting.
    fn take(&mut self, max: usize) -> Vec<Record> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(r) = self.stray.pop_front() else {
                break;
            };
            batch.push(r);
        }
        if let Some(feed) = &self.queue {
            let room = max - batch.len();
            feed.take(&self.id, room, &mut batch);
        }
        batch
    }
}

/// A flowgate record from the parts of a Kafka message.
pub(crate) fn record(
    id: &PartitionId,
    offset: i64,
    key: Option<Bytes>,
    payload: Bytes,
    headers: Headers,
    timestamp_ms: Option<i64>,
) -> Option<Record> {
    let timestamp = timestamp_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms as u64));
    Some(Record {
        partition: id.clone(),
        position: Position::from_offset(offset)?,
        key,
        payload,
        headers,
        timestamp: timestamp.or_else(|| Some(SystemTime::now())),
        idempotency_key: None,
        redelivered: false,
    })
}

/// A flowgate record from a message of the main queue (payload, key and headers copied).
fn to_record(m: &BorrowedMessage<'_>, id: &PartitionId) -> Option<Record> {
    let mut headers = Headers::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            headers.push(h.key, Bytes::copy_from_slice(h.value.unwrap_or_default()));
        }
    }
    record(
        id,
        m.offset(),
        m.key().map(Bytes::copy_from_slice),
        Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        headers,
        m.timestamp().to_millis().filter(|ms| *ms >= 0),
    )
}

/// The poll thread: main queue, commits, pause/resume, lag.
struct Poller {
    /// The brokers as errors name them.
    endpoint: String,
    credits: Credits,
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    pause_after: Duration,
}

impl Poller {
    fn run(&self, consumer: &BaseConsumer<Ctx>, closing: &AtomicBool) {
        while !closing.load(Ordering::Acquire) {
            consumer.context().drain_commands();
            consumer
                .context()
                .flush_commits(consumer, CommitMode::Async);
            self.pause_resume(consumer);
            // Serves rebalance callbacks, commit results and errors; messages only arrive
            // here for a partition whose queue could not be split off.
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => {
                    let key = (m.topic().to_string(), m.partition());
                    let mut sh = lock(&self.shared);
                    // Dropped if the partition is no longer assigned: its owner reads it again.
                    if let Some(part) = sh.part_mut(&key) {
                        if let Some(r) = to_record(&m, &part.id) {
                            part.stray.push_back(r);
                        }
                    }
                    drop(sh);
                    self.notify.notify_one();
                }
                Some(Err(e))
                    if is_auth_failure(
                        &e,
                        lock(&self.shared).client_log.as_deref().unwrap_or_default(),
                    ) =>
                {
                    // Retrying cannot fix credentials or certificates: stop with the cause.
                    let mut sh = lock(&self.shared);
                    if sh.error.is_none() {
                        let cause = match &sh.client_log {
                            Some(why) => format!("{e}: {why}"),
                            None => e.to_string(),
                        };
                        sh.error = Some(auth_error(&self.endpoint, "source", &cause));
                    }
                    drop(sh);
                    self.notify.notify_one();
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka: consumer error");
                    let mut sh = lock(&self.shared);
                    sh.client_error = Some(match &sh.client_log {
                        Some(why) => format!("{e}: {why}"),
                        None => e.to_string(),
                    });
                }
                None => {}
            }
        }
    }

    /// Pauses partitions starved of credit for `pause_after`, resumes them when it returns.
    fn pause_resume(&self, consumer: &BaseConsumer<Ctx>) {
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        let now = Instant::now();
        {
            let mut sh = lock(&self.shared);
            for part in sh.parts.iter_mut() {
                let (t, p) = &part.key;
                if self.credits.available(&part.id) == 0 {
                    let since = *part.starved_since.get_or_insert(now);
                    if !part.paused && now.duration_since(since) >= self.pause_after {
                        let _ = pause.add_partition(t, *p);
                        part.paused = true;
                    }
                } else {
                    part.starved_since = None;
                    if part.paused {
                        let _ = resume.add_partition(t, *p);
                        part.paused = false;
                    }
                }
            }
        }
        if pause.count() > 0 {
            tracing::debug!(
                partitions = pause.count(),
                "kafka: pausing partitions without credit"
            );
            if let Err(e) = consumer.pause(&pause) {
                tracing::warn!(error = %e, "kafka: pause failed");
            }
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                tracing::warn!(error = %e, "kafka: resume failed");
            }
        }
    }
}

/// `auto.offset.reset` as the logical offset librdkafka starts a partition at; `Invalid` (let
/// librdkafka decide, and raise its error for `error`) for anything else.
fn reset_offset(value: &str) -> Offset {
    match value.to_ascii_lowercase().as_str() {
        "earliest" | "smallest" | "beginning" => Offset::Beginning,
        "latest" | "largest" | "end" => Offset::End,
        _ => Offset::Invalid,
    }
}

/// Samples lag once a second on a thread of its own, through the unsubscribed helper
/// client, so a slow `ListOffsets` answer never holds up the poll thread. The same answers
/// tell whether the brokers can be reached: librdkafka reports "all brokers down" once and then
/// retries silently, so without this an unreachable cluster looked like an idle topic.
struct LagReader {
    helper: Arc<Mutex<Option<BaseConsumer>>>,
    topics: Vec<String>,
    /// The bootstrap servers, named in the connection events.
    endpoint: String,
    /// The last reachability reported (`None` before the first probe).
    reachable: Mutex<Option<bool>>,
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    closing: Arc<AtomicBool>,
}

impl LagReader {
    fn run(&self) {
        self.warm_up();
        let mut last = Instant::now();
        while !self.closing.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            // Serve the helper's own queue (logs, errors), which nothing else polls: it would
            // grow for as long as the brokers stay away.
            if let Some(h) = lock(&self.helper).as_ref() {
                let _ = h.poll(Duration::ZERO);
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                self.sample();
            }
        }
    }

    /// Connects the helper to the group coordinator while the consumer joins the group: the
    /// assignment callback reads the committed offsets through it, and a cold helper first
    /// looks the coordinator up (~60 ms here) while the group waits for the callback. Bounded
    /// by 2 s: a close meanwhile waits for it (the helper is behind the same lock).
    fn warm_up(&self) {
        let mut tpl = TopicPartitionList::new();
        for t in &self.topics {
            tpl.add_partition(t, 0);
        }
        if let Some(h) = lock(&self.helper).as_ref() {
            if let Err(e) = h.committed_offsets(tpl, Duration::from_secs(2)) {
                tracing::debug!(error = %e, "kafka: warming up the offsets reader failed; the assignment reads them cold");
            }
        }
    }

    /// Records behind the high watermark, per partition; with nothing assigned, a metadata
    /// request stands in as the reachability probe.
    fn sample(&self) {
        let parts: Vec<(Key, PartitionId, Offset)> = lock(&self.shared)
            .parts
            .iter()
            .map(|p| (p.key.clone(), p.id.clone(), p.next_offset))
            .collect();
        let mut samples = Vec::new();
        let mut failure = None;
        if parts.is_empty() {
            let probe = match lock(&self.helper).as_ref() {
                Some(h) => h
                    .fetch_metadata(self.topics.first().map(String::as_str), PROBE_TIMEOUT)
                    .map(|_| ()),
                None => return,
            };
            failure = probe.err();
        }
        for ((t, p), id, next) in parts {
            if self.closing.load(Ordering::Acquire) {
                return;
            }
            let watermarks = match lock(&self.helper).as_ref() {
                Some(h) => h.fetch_watermarks(&t, p, PROBE_TIMEOUT),
                None => return,
            };
            match watermarks {
                Ok((low, high)) => {
                    if let Some(lag) = crate::lag::records_behind(low, high, next) {
                        samples.push(LagSample {
                            partition: id,
                            lag,
                            unit: LagUnit::Records,
                        });
                    }
                }
                // The brokers are away: one failure says so, without waiting out the timeout
                // once per partition while the helper's lock is held.
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let reachable = !samples.is_empty() || failure.is_none();
        let changed = lock(&self.reachable).replace(reachable) != Some(reachable);
        let mut sh = lock(&self.shared);
        if reachable {
            sh.client_error = None;
            sh.client_log = None;
        }
        if changed {
            let event = if reachable {
                Connection::Up
            } else {
                Connection::Down {
                    endpoint: self.endpoint.clone(),
                    // librdkafka's own word on the connection is clearer than a timeout.
                    cause: sh
                        .client_error
                        .clone()
                        .unwrap_or_else(|| failure.map_or_else(String::new, |e| e.to_string())),
                }
            };
            sh.events.push_back(SourceEvent::Connection(event));
        }
        if !samples.is_empty() {
            sh.events.push_back(SourceEvent::Lag(samples));
        }
        drop(sh);
        if changed || reachable {
            self.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: i32) -> Key {
        ("t".to_string(), p)
    }

    #[test]
    fn a_failed_commit_is_retried_only_above_what_the_broker_acknowledged_and_backs_off() {
        let mut c = Commits::default();
        // B (offset 20) was acknowledged; the older A (10) fails late: nothing to retry.
        c.acknowledged(&[(key(0), 20)]);
        c.failed(&[(key(0), 10)]);
        assert!(c.pending.is_empty(), "{:?}", c.pending);
        // A failure above the acknowledged offset is retried, after a backoff that doubles.
        c.failed(&[(key(0), 30), (key(1), 5)]);
        assert_eq!(c.pending.get(&key(0)), Some(&30));
        assert_eq!(c.pending.get(&key(1)), Some(&5));
        let first = c.retry_at;
        c.failed(&[(key(0), 30)]);
        assert!(c.retry_at > first, "a later retry after a second failure");
        assert_eq!(c.failing.as_ref().map(|b| b.attempts()), Some(3));
        // A newer pending offset is never lowered by a retried one.
        c.pending.insert(key(0), 40);
        c.failed(&[(key(0), 30)]);
        assert_eq!(c.pending.get(&key(0)), Some(&40));
        c.acknowledged(&[(key(0), 40)]);
        assert!(c.retry_at.is_none() && c.failing.is_none());
    }

    #[test]
    fn auto_offset_reset_maps_to_librdkafkas_logical_offsets() {
        for v in ["earliest", "smallest", "beginning", "Earliest"] {
            assert_eq!(reset_offset(v), Offset::Beginning, "{v}");
        }
        for v in ["latest", "largest", "end"] {
            assert_eq!(reset_offset(v), Offset::End, "{v}");
        }
        // `error` (and anything unknown) is left to librdkafka, which reports it.
        assert_eq!(reset_offset("error"), Offset::Invalid);
        assert_eq!(reset_offset("nonsense"), Offset::Invalid);
    }
}
