//! The Kafka source: a `BaseConsumer` polled by a thread of its own.
//!
//! - The thread polls continuously, so the member never exceeds `max.poll.interval.ms`, and
//!   keeps each partition's fetched records in a small queue. A partition without credit, or
//!   whose queue is full, is **paused** (librdkafka stops fetching it, the member stays in the
//!   group); it is resumed when credit returns.
//! - `next()` hands the runtime at most the credit of each partition, so the source never
//!   delivers more than the runtime can hold.
//! - Rebalances run inside rdkafka's callback on the poll thread: an assignment waits for the
//!   runtime's start positions (checkpoint store first, then the group's committed offset) and
//!   assigns with those offsets; a revocation drops the revoked partitions' queued records,
//!   waits (bounded) for the runtime to drain their in-flight records, and commits the final
//!   positions before the partitions are released.
//! - Offsets are committed only through `Source::commit`: `enable.auto.commit=false`,
//!   `enable.auto.offset.store=false`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::{
    Assignment, Checkpoint, Credits, Error, Headers, LagSample, LagUnit, PartitionId, Position,
    Record, Revocation, Source, SourceCapabilities, SourceContext, SourceEvent, StartPosition,
};
use rdkafka::Message;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, DefaultConsumerContext,
};
use rdkafka::message::Headers as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio::sync::Notify;

use crate::config::{AssignmentStrategy, KafkaSourceConfig, is_secret};
use crate::error::map;

type Key = (String, i32);

/// Records kept per partition before it is paused.
const QUEUE_CAP: usize = 2000;

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

struct PartQueue {
    id: PartitionId,
    records: VecDeque<Record>,
    paused: bool,
    /// Next offset to be handed to the runtime (for lag).
    next_offset: i64,
}

#[derive(Default)]
struct Shared {
    queues: HashMap<Key, PartQueue>,
    events: VecDeque<SourceEvent>,
    error: Option<Error>,
    rr: usize,
}

struct Ctx {
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    commands: Mutex<std_mpsc::Receiver<Command>>,
    closing: Arc<AtomicBool>,
    helper: Mutex<Option<BaseConsumer>>,
    strategy: AssignmentStrategy,
    rebalance_timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
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
    fn push_event(&self, ev: SourceEvent) {
        lock(&self.shared).events.push_back(ev);
        self.notify.notify_one();
    }

    /// The group's committed offsets, read through a separate unsubscribed consumer (reading
    /// them on the subscribed one was seen to hang librdkafka's destroy).
    fn committed(&self, tpl: &TopicPartitionList) -> HashMap<Key, i64> {
        let helper = lock(&self.helper);
        let Some(h) = helper.as_ref() else {
            return HashMap::new();
        };
        match h.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(list) => list
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "kafka: cannot read the group's committed offsets; starting from the checkpoint store or auto.offset.reset");
                HashMap::new()
            }
        }
    }

    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let committed = self.committed(tpl);
        let keys: Vec<Key> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let assignments: Vec<Assignment> = keys
            .iter()
            .map(|(t, p)| {
                let mut a = Assignment::new(partition_id(t, *p));
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
        tracing::info!(partitions = ?keys, "kafka: partitions assigned; waiting for start positions");
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
            let offset = match after.and_then(|a| a.successor().as_offset()) {
                Some(o) => Offset::Offset(o),
                None => committed
                    .get(&(t.clone(), *p))
                    .map_or(Offset::Invalid, |o| Offset::Offset(*o)),
            };
            if let Err(e) = assign.add_partition_offset(t, *p, offset) {
                tracing::error!(error = %e, "kafka: cannot set a start offset");
            }
            let next_offset = match offset {
                Offset::Offset(o) => o,
                _ => 0,
            };
            lock(&self.shared).queues.insert(
                (t.clone(), *p),
                PartQueue {
                    id,
                    records: VecDeque::new(),
                    paused: false,
                    next_offset,
                },
            );
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

    fn wait_for_start(&self, consumer: &BaseConsumer<Self>) -> Option<Vec<StartPosition>> {
        let deadline = Instant::now() + self.rebalance_timeout;
        let rx = lock(&self.commands);
        while Instant::now() < deadline && !self.closing.load(Ordering::Acquire) {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Command::Start(s)) => return Some(s),
                Ok(Command::Commit(cps)) => commit(consumer, &cps, CommitMode::Async),
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
        let ids: Vec<PartitionId> = {
            let mut sh = lock(&self.shared);
            keys.iter()
                .filter_map(|k| sh.queues.remove(k).map(|q| q.id))
                .collect()
        };
        if !self.closing.load(Ordering::Acquire) && !ids.is_empty() {
            let (rev, waiter) = Revocation::new(ids, lost);
            self.push_event(SourceEvent::Revoked(rev));
            if !lost {
                // The runtime finishes in-flight records, writes the checkpoints, hands back
                // the final positions; commit them before the partitions are released.
                let finals = waiter.wait_blocking(self.rebalance_timeout);
                if !finals.is_empty() {
                    commit(consumer, &finals, CommitMode::Sync);
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

fn commit<C: ConsumerContext>(consumer: &BaseConsumer<C>, cps: &[Checkpoint], mode: CommitMode) {
    let mut tpl = TopicPartitionList::new();
    for c in cps {
        let Some((t, p)) = parse_partition_id(&c.partition) else {
            continue;
        };
        let Some(next) = c.position.successor().as_offset() else {
            continue;
        };
        if tpl
            .add_partition_offset(&t, p, Offset::Offset(next))
            .is_err()
        {
            continue;
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "kafka: offset commit failed; the next commit covers it");
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
}

impl KafkaSource {
    /// A source; nothing connects before `open`.
    pub fn new(cfg: KafkaSourceConfig) -> Result<Self, Error> {
        if cfg.topics.is_empty() {
            return Err(Error::config("kafka source: no topics to subscribe to")
                .with_context("key", "source.topics"));
        }
        if cfg.max_batch == 0 {
            return Err(Error::config("kafka source: max_batch must be at least 1")
                .with_context("key", "source.max_batch"));
        }
        Ok(KafkaSource {
            cfg,
            shared: Arc::default(),
            notify: Arc::new(Notify::new()),
            commands: None,
            closing: Arc::new(AtomicBool::new(false)),
            done: None,
            credits: None,
        })
    }

    fn client_config(&self, group: &str) -> ClientConfig {
        let c = &self.cfg;
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &c.bootstrap_servers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &c.auto_offset_reset)
            .set(
                "session.timeout.ms",
                c.session_timeout.as_millis().to_string(),
            )
            .set(
                "max.poll.interval.ms",
                c.max_poll_interval.as_millis().to_string(),
            )
            .set(
                "queued.max.messages.kbytes",
                c.queued_max_messages_kbytes.to_string(),
            )
            .set("fetch.max.bytes", c.fetch_max_bytes.to_string())
            .set(
                "partition.assignment.strategy",
                match c.assignment {
                    AssignmentStrategy::Cooperative => "cooperative-sticky",
                    AssignmentStrategy::Eager => "range",
                },
            );
        if let Some(id) = &c.group_instance_id {
            cc.set("group.instance.id", id);
        }
        for (k, v) in &c.properties {
            if is_secret(k) {
                tracing::debug!(key = %k, "kafka: passing a secret property through (value not logged)");
            }
            cc.set(k, v);
        }
        cc
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::replayable_ordered().with_dynamic_assignment(true)
    }

    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        let group = self
            .cfg
            .group_id
            .clone()
            .unwrap_or_else(|| ctx.pipeline.clone());
        let (cmd_tx, cmd_rx) = std_mpsc::channel();
        let helper: BaseConsumer<DefaultConsumerContext> = self
            .client_config(&group)
            .create()
            .map_err(|e| map(e, "creating the offsets reader"))?;
        let kctx = Ctx {
            shared: self.shared.clone(),
            notify: self.notify.clone(),
            commands: Mutex::new(cmd_rx),
            closing: self.closing.clone(),
            helper: Mutex::new(Some(helper)),
            strategy: self.cfg.assignment,
            rebalance_timeout: self.cfg.rebalance_timeout,
        };
        let consumer: BaseConsumer<Ctx> = self
            .client_config(&group)
            .create_with_context(kctx)
            .map_err(|e| map(e, "creating the consumer"))?;
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| map(e, "subscribing").with_context("topics", self.cfg.topics.join(",")))?;
        let (done_tx, done_rx) = std_mpsc::channel();
        let credits = ctx.credits.clone();
        let closing = self.closing.clone();
        let shared = self.shared.clone();
        let notify = self.notify.clone();
        std::thread::Builder::new()
            .name("flowgate-kafka-poll".into())
            .spawn(move || {
                poll_loop(&consumer, &credits, &closing, &shared, &notify);
                // Leave the group; drop closes the consumer.
                consumer.unsubscribe();
                if let Some(h) = lock(&consumer.context().helper).take() {
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
                let n = sh.queues.len();
                let start = sh.rr;
                let mut keys: Vec<Key> = sh.queues.keys().cloned().collect();
                keys.sort();
                for i in 0..n {
                    let k = &keys[(start + i) % n];
                    let Some(q) = sh.queues.get_mut(k) else {
                        continue;
                    };
                    let take = credits
                        .available(&q.id)
                        .min(q.records.len())
                        .min(self.cfg.max_batch);
                    if take > 0 {
                        let batch: Vec<Record> = q.records.drain(..take).collect();
                        if let Some(last) = batch.last().and_then(|r| r.position.as_offset()) {
                            q.next_offset = last + 1;
                        }
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

fn poll_loop(
    consumer: &BaseConsumer<Ctx>,
    credits: &Credits,
    closing: &AtomicBool,
    shared: &Mutex<Shared>,
    notify: &Notify,
) {
    let mut last_lag = Instant::now();
    while !closing.load(Ordering::Acquire) {
        // Commits the runtime asked for.
        loop {
            let cmd = lock(&consumer.context().commands).try_recv();
            match cmd {
                Ok(Command::Commit(cps)) => commit(consumer, &cps, CommitMode::Async),
                Ok(Command::Start(_)) => {
                    tracing::warn!("kafka: start positions arrived after the assignment timed out")
                }
                Err(_) => break,
            }
        }
        // Credit → pause/resume.
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        {
            let mut sh = lock(shared);
            for ((t, p), q) in sh.queues.iter_mut() {
                let blocked = credits.available(&q.id) == 0 || q.records.len() >= QUEUE_CAP;
                if blocked && !q.paused {
                    let _ = pause.add_partition(t, *p);
                    q.paused = true;
                } else if !blocked && q.paused {
                    let _ = resume.add_partition(t, *p);
                    q.paused = false;
                }
            }
        }
        if pause.count() > 0 {
            if let Err(e) = consumer.pause(&pause) {
                tracing::warn!(error = %e, "kafka: pause failed");
            }
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                tracing::warn!(error = %e, "kafka: resume failed");
            }
        }
        // Poll (also serves rebalance callbacks and heartbeats). Records of one burst are
        // converted without the shared lock and handed over under one lock.
        let mut ids: HashMap<Key, PartitionId> = lock(shared)
            .queues
            .iter()
            .map(|(k, q)| (k.clone(), q.id.clone()))
            .collect();
        let mut burst: Vec<(Key, Record)> = Vec::new();
        let mut got = 0;
        while got < 1000 {
            let timeout = if got == 0 {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            };
            match consumer.poll(timeout) {
                Some(Ok(m)) => {
                    got += 1;
                    let key = (m.topic().to_string(), m.partition());
                    if !ids.contains_key(&key) {
                        // Assigned by a rebalance callback during this burst.
                        match lock(shared).queues.get(&key) {
                            Some(q) => {
                                ids.insert(key.clone(), q.id.clone());
                            }
                            None => continue,
                        }
                    }
                    let Some(id) = ids.get(&key) else { continue };
                    let Some(position) = Position::from_offset(m.offset()) else {
                        continue;
                    };
                    let mut headers = Headers::new();
                    if let Some(hs) = m.headers() {
                        for h in hs.iter() {
                            headers
                                .push(h.key, Bytes::copy_from_slice(h.value.unwrap_or_default()));
                        }
                    }
                    let timestamp = m
                        .timestamp()
                        .to_millis()
                        .filter(|ms| *ms >= 0)
                        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms as u64));
                    burst.push((
                        key,
                        Record {
                            partition: id.clone(),
                            position,
                            key: m.key().map(Bytes::copy_from_slice),
                            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                            headers,
                            timestamp: timestamp.or_else(|| Some(SystemTime::now())),
                            idempotency_key: None,
                            redelivered: false,
                        },
                    ));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka: consumer error");
                    break;
                }
                None => break,
            }
        }
        if !burst.is_empty() {
            let mut sh = lock(shared);
            for (key, record) in burst {
                // Dropped if the partition was revoked meanwhile: its next owner reads it again.
                if let Some(q) = sh.queues.get_mut(&key) {
                    q.records.push_back(record);
                }
            }
        }
        if got > 0 {
            notify.notify_one();
        }
        if last_lag.elapsed() >= Duration::from_secs(1) {
            last_lag = Instant::now();
            let parts: Vec<(Key, PartitionId, i64)> = lock(shared)
                .queues
                .iter()
                .map(|(k, q)| (k.clone(), q.id.clone(), q.next_offset))
                .collect();
            let mut samples = Vec::new();
            for ((t, p), id, next) in parts {
                if let Ok((_, high)) = consumer.fetch_watermarks(&t, p, Duration::from_millis(500))
                {
                    samples.push(LagSample {
                        partition: id,
                        lag: crate::lag::records_behind(high, next),
                        unit: LagUnit::Records,
                    });
                }
            }
            if !samples.is_empty() {
                lock(shared).events.push_back(SourceEvent::Lag(samples));
                notify.notify_one();
            }
        }
    }
}
