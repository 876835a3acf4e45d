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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_core::SourceInbox;
use flowgate_core::{
    Checkpoint, Credits, Error, Source, SourceCapabilities, SourceContext, SourceEvent,
    StartPosition,
};
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::client::records::*;
use crate::client::{Brokers, auth_error, is_auth_failure};
use crate::config::{AssignmentStrategy, GroupProtocol, KafkaSourceConfig, is_secret};
use crate::error::map;
use crate::lag::LagReader;
use crate::rebalance::*;

/// Apache Kafka source. See the module docs for how credit, rebalances and commits work.
pub struct KafkaSource {
    cfg: KafkaSourceConfig,
    inbox: Arc<SourceInbox<ConsumerState>>,
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
    consumer: Arc<Mutex<Weak<BaseConsumer<GroupContext>>>>,
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
            inbox: Arc::default(),
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
        let kctx = GroupContext {
            inbox: self.inbox.clone(),
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
        let consumer: Arc<BaseConsumer<GroupContext>> = Arc::new(
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
            inbox: self.inbox.clone(),
            pause_after: self.cfg.pause_after,
        };
        let lag = LagReader {
            helper,
            topics: self.cfg.topics.clone(),
            endpoint: self.connection().describe(),
            reachable: Mutex::new(None),
            inbox: self.inbox.clone(),
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
                poller.inbox.buffered().parts.clear();
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
        let max_batch = self.cfg.max_batch;
        self.inbox
            .next(&credits, Duration::from_millis(100), |sh, credits| {
                let n = sh.parts.len();
                let start = sh.next_partition;
                for i in 0..n {
                    let part = &mut sh.parts[(start + i) % n];
                    let batch = part.take(credits.available(&part.id).min(max_batch));
                    if let Some(last) = batch.last().and_then(|r| r.position.as_offset()) {
                        part.next_offset = Offset::Offset(last + 1);
                        sh.next_partition = (start + i + 1) % n;
                        return Some(batch);
                    }
                }
                None
            })
            .await
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

/// The poll thread: main queue, commits, pause/resume, lag.
struct Poller {
    /// The brokers as errors name them.
    endpoint: String,
    credits: Credits,
    inbox: Arc<SourceInbox<ConsumerState>>,
    pause_after: Duration,
}

impl Poller {
    fn run(&self, consumer: &BaseConsumer<GroupContext>, closing: &AtomicBool) {
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
                    let mut sh = self.inbox.buffered();
                    // Dropped if the partition is no longer assigned: its owner reads it again.
                    if let Some(part) = sh.part_mut(&key) {
                        if let Some(r) = to_record(&m, &part.id) {
                            part.stray.push_back(r);
                        }
                    }
                    drop(sh);
                    self.inbox.wake();
                }
                Some(Err(e))
                    if is_auth_failure(
                        &e,
                        self.inbox
                            .buffered()
                            .client_log
                            .as_deref()
                            .unwrap_or_default(),
                    ) =>
                {
                    // Retrying cannot fix credentials or certificates: stop with the cause.
                    let cause = match &self.inbox.buffered().client_log {
                        Some(why) => format!("{e}: {why}"),
                        None => e.to_string(),
                    };
                    self.inbox
                        .fail(auth_error(&self.endpoint, "source", &cause));
                }
                // librdkafka gives a consumer up after a fatal error (a static member fenced by
                // its own rejoin after a long outage: FencedInstanceId): it never reads again,
                // so the pipeline stops and says why, for its supervisor to start it again.
                Some(Err(e)) if consumer.client().fatal_error().is_some() => {
                    let (code, reason) = consumer
                        .client()
                        .fatal_error()
                        .unwrap_or((rdkafka::types::RDKafkaErrorCode::Fatal, e.to_string()));
                    self.inbox.fail(
                        Error::fatal("kafka: the consumer failed fatally and reads no more")
                            .with_context("endpoint", &self.endpoint)
                            .with_context("code", format!("{code:?}"))
                            .with_context("cause", reason)
                            .with_hint("restart flowgate (its supervisor does): it resumes from its checkpoints. A FencedInstanceId after a broker outage longer than session_timeout is how Kafka fences a static member (group_instance_id)"),
                    );
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka: consumer error");
                    let mut sh = self.inbox.buffered();
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
    fn pause_resume(&self, consumer: &BaseConsumer<GroupContext>) {
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        let now = Instant::now();
        {
            let mut sh = self.inbox.buffered();
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

#[cfg(test)]
mod tests {
    use super::*;

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
