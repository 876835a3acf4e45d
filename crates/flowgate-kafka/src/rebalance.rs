//! The consumer's group side: the context librdkafka calls on the poll thread for rebalances
//! (an assignment waits for the runtime's start positions; a revocation drains the revoked
//! partitions and commits before they are released), the assigned partitions and what
//! `next()` shares with the poll thread, and broker commits coalesced while one is in flight.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use flowgate_core::SourceInbox;
use flowgate_core::retry::{Backoff, BackoffPolicy};
use flowgate_core::{
    Assignment, Checkpoint, PartitionId, Position, Record, Revocation, SourceEvent, StartPosition,
};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use crate::client::queue::PartitionFeed;
use crate::client::records::*;
use crate::config::AssignmentStrategy;
use crate::error::map;

pub(crate) enum Command {
    Start(Vec<StartPosition>),
    Commit(Vec<Checkpoint>),
}

/// An assigned partition.
pub(crate) struct AssignedPartition {
    pub(crate) key: Key,
    pub(crate) id: PartitionId,
    /// The partition's own librdkafka queue; `None` if it could not be split off (its
    /// messages then arrive on the main queue and wait in `stray`).
    pub(crate) queue: Option<PartitionFeed<GroupContext>>,
    /// Messages of this partition that arrived on the main queue.
    pub(crate) stray: VecDeque<Record>,
    pub(crate) paused: bool,
    /// Since when the partition has had no credit.
    pub(crate) starved_since: Option<Instant>,
    /// Next offset to be handed to the runtime (for lag): an offset once known, or the logical
    /// start (`Beginning`, `End`) resolved against the watermarks until the first record.
    pub(crate) next_offset: Offset,
}

/// What the poll thread, the rebalance callbacks and the lag reader keep for `next()`
/// (inside the source's [`SourceInbox`], with its events and error).
#[derive(Default)]
pub(crate) struct ConsumerState {
    pub(crate) parts: Vec<AssignedPartition>,
    /// The last error librdkafka reported on the consumer (a refused connection, say).
    pub(crate) client_error: Option<String>,
    /// librdkafka's last error log line, which says why.
    pub(crate) client_log: Option<String>,
    /// The partition `next()` reads first next time: it takes turns so that none starves.
    pub(crate) next_partition: usize,
}

impl ConsumerState {
    pub(crate) fn part_mut(&mut self, key: &Key) -> Option<&mut AssignedPartition> {
        self.parts.iter_mut().find(|p| &p.key == key)
    }
}

pub(crate) struct GroupContext {
    pub(crate) inbox: Arc<SourceInbox<ConsumerState>>,
    pub(crate) commands: Mutex<std_mpsc::Receiver<Command>>,
    pub(crate) closing: Arc<AtomicBool>,
    pub(crate) helper: Arc<Mutex<Option<BaseConsumer>>>,
    pub(crate) commits: Mutex<Commits>,
    /// The consumer itself, to split partition queues off inside the rebalance callback.
    pub(crate) me: Mutex<Weak<BaseConsumer<GroupContext>>>,
    /// Offsets are committed inside a transactional sink's transactions (see
    /// [`OffsetsLink`]): the consumer commits nothing itself and starts where they left off.
    pub(crate) transactional: Arc<AtomicBool>,
    pub(crate) strategy: AssignmentStrategy,
    pub(crate) rebalance_timeout: Duration,
    /// Where a partition without a committed offset starts (`auto.offset.reset`), as a
    /// logical offset; `Offset::Invalid` leaves the choice to librdkafka.
    pub(crate) reset: Offset,
}

/// Broker commits, coalesced: the newest offset per partition waits while one asynchronous
/// commit is in flight (the broker takes milliseconds per commit; firing one per runtime
/// checkpoint builds a backlog that delays every later commit and the consumer's close).
#[derive(Default)]
pub(crate) struct Commits {
    pub(crate) pending: HashMap<Key, i64>,
    pub(crate) in_flight_since: Option<Instant>,
    /// The highest offset the broker acknowledged per partition: a failed commit is retried
    /// only if it is still above it, so a late failure never moves the group's offset back.
    pub(crate) acknowledged: HashMap<Key, i64>,
    /// After a failure, no commit before this moment.
    pub(crate) retry_at: Option<Instant>,
    /// The waits between failed commits (100 ms doubling to 5 s), from the first failure
    /// since the last acknowledged commit.
    pub(crate) failing: Option<Backoff>,
}

/// Failed commits wait 100 ms, doubling to 5 s, for as long as they fail (the group's
/// offsets only lag; nothing is lost while they do).
pub(crate) const COMMIT_BACKOFF: BackoffPolicy =
    BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(5));

impl Commits {
    pub(crate) fn acknowledged(&mut self, offsets: &[(Key, i64)]) {
        self.in_flight_since = None;
        self.retry_at = None;
        self.failing = None;
        for (k, o) in offsets {
            let e = self.acknowledged.entry(k.clone()).or_insert(*o);
            *e = (*e).max(*o);
        }
    }

    /// Puts back the failed offsets still worth committing and backs off.
    pub(crate) fn failed(&mut self, offsets: &[(Key, i64)]) {
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
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// An asynchronous commit without an answer for this long no longer holds the next one back.
pub(crate) const COMMIT_STALL: Duration = Duration::from_secs(5);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClientContext for GroupContext {
    /// librdkafka's log, forwarded to `tracing` as rust-rdkafka does; the last error line is
    /// kept, since the consumer's error events carry only a code ("Authentication") and the
    /// log says why ("invalid credentials with SASL mechanism SCRAM-SHA-512").
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}");
                self.inbox.buffered().client_log = Some(message.to_string());
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }
}

impl ConsumerContext for GroupContext {
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
                let owned: Vec<Key> = self
                    .inbox
                    .buffered()
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

impl GroupContext {
    /// Takes the runtime's commit requests into the pending offsets.
    pub(crate) fn absorb(&self, checkpoints: &[Checkpoint]) {
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
    pub(crate) fn flush_commits(&self, consumer: &BaseConsumer<Self>, mode: CommitMode) {
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
    pub(crate) fn drain_commands(&self) {
        loop {
            let cmd = lock(&self.commands).try_recv();
            match cmd {
                Ok(Command::Commit(checkpoints)) => self.absorb(&checkpoints),
                Ok(Command::Start(_)) => {
                    tracing::warn!("kafka: start positions arrived after the assignment timed out")
                }
                Err(_) => break,
            }
        }
    }

    pub(crate) fn push_event(&self, ev: SourceEvent) {
        self.inbox.push_event(ev);
    }

    /// The group's committed offsets, read through a separate unsubscribed consumer (reading
    /// them on the subscribed one was seen to hang librdkafka's destroy). `None` when they
    /// could not be read: then a partition without an entry may still have one.
    pub(crate) fn committed(&self, tpl: &TopicPartitionList) -> Option<HashMap<Key, i64>> {
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

    pub(crate) fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
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
        let generation = crate::client::queue::generation(consumer);
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
            let mut sh = self.inbox.buffered();
            sh.parts.retain(|x| x.key != key);
            sh.parts.push(AssignedPartition {
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
            self.inbox.fail(map(e, "assigning partitions"));
        }
    }

    /// The partition's own queue, waking `next()` when it turns non-empty.
    pub(crate) fn split(&self, topic: &str, partition: i32) -> Option<PartitionFeed<GroupContext>> {
        let me = lock(&self.me).upgrade()?;
        let inbox = self.inbox.clone();
        let feed = PartitionFeed::split(&me, topic, partition, move || inbox.wake());
        if feed.is_none() {
            tracing::warn!(
                topic,
                partition,
                "kafka: cannot give the partition a queue of its own; its records go through the main queue"
            );
        }
        feed
    }

    pub(crate) fn wait_for_start(
        &self,
        consumer: &BaseConsumer<Self>,
    ) -> Option<Vec<StartPosition>> {
        let deadline = Instant::now() + self.rebalance_timeout;
        let rx = lock(&self.commands);
        while Instant::now() < deadline && !self.closing.load(Ordering::Acquire) {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Command::Start(s)) => return Some(s),
                Ok(Command::Commit(checkpoints)) => {
                    self.absorb(&checkpoints);
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

    pub(crate) fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let keys: Vec<Key> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let lost = consumer.assignment_lost();
        // Queued records of revoked partitions were never handed out: the next owner reads them.
        let removed: Vec<AssignedPartition> = {
            let mut sh = self.inbox.buffered();
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
pub(crate) fn commit<C: ConsumerContext>(
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
        CommitMode::Async => crate::client::queue::commit_async(consumer, &tpl),
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

impl AssignedPartition {
    /// Up to `max` records: first those that came through the main queue, then the
    /// partition's own queue, without waiting.
    pub(crate) fn take(&mut self, max: usize) -> Vec<Record> {
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
}
