//! What the Kinesis source's tasks share: the shards this worker owns with their buffers,
//! per-shard read statistics, and the connection report that combines the lease loop's and
//! every reader's.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flowgate_core::SourceInbox;
use flowgate_core::{
    Connection, Credits, Error, Lease, LeaseStore, PartitionId, Position, Record, SourceEvent,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::KinesisSourceConfig;

/// What the source's tasks (the lease loop and every shard reader) share.
pub(crate) struct SourceTasks {
    pub(crate) cfg: KinesisSourceConfig,
    pub(crate) client: aws_sdk_kinesis::Client,
    pub(crate) leases: Arc<dyn LeaseStore>,
    pub(crate) owner: String,
    pub(crate) pipeline: String,
    pub(crate) credits: Credits,
    pub(crate) shards: Arc<OwnedShards>,
    /// What cannot reach the endpoint now: the lease loop and shard readers, by name. The
    /// source is down while any is, up again once none is.
    pub(crate) failing: Mutex<std::collections::BTreeSet<String>>,
}

impl SourceTasks {
    /// `component` failed to reach Kinesis (or the lease store) with a temporary error.
    pub(crate) fn report_down(&self, component: &str, cause: &Error) {
        let mut failing = lock(&self.failing);
        if failing.is_empty() {
            self.shards
                .inbox
                .push_event(SourceEvent::Connection(Connection::Down {
                    endpoint: endpoint(&self.cfg),
                    cause: cause.to_string(),
                }));
        }
        failing.insert(component.to_string());
    }

    /// `component` reached it again.
    pub(crate) fn report_up(&self, component: &str) {
        let mut failing = lock(&self.failing);
        if failing.remove(component) && failing.is_empty() {
            self.shards
                .inbox
                .push_event(SourceEvent::Connection(Connection::Up));
        }
    }
}

/// The shards this worker owns, as `next()`, the readers and the lease loop see them.
#[derive(Default)]
pub(crate) struct OwnedShards {
    /// The owned shards with their buffers, the events and the fatal error for `next()`
    /// (woken when records arrive or a shard ends).
    pub(crate) inbox: SourceInbox<ShardTable>,
    /// `next` emptied a shard's buffer (readers wait for it).
    pub(crate) drained: Notify,
}

/// The owned shards with their buffers, and the read statistics of every shard read so far.
#[derive(Default)]
pub(crate) struct ShardTable {
    pub(crate) owned: BTreeMap<PartitionId, Owned>,
    pub(crate) stats: HashMap<PartitionId, ShardStats>,
}

/// A shard this worker holds the lease of.
pub(crate) struct Owned {
    pub(crate) lease: Lease,
    pub(crate) buffer: VecDeque<Record>,
    pub(crate) started: bool,
    /// The reader saw the shard's end; everything it fetched is in `buffer` or delivered.
    pub(crate) ended: bool,
    /// Last position handed to the runtime.
    pub(crate) delivered: Option<Position>,
    /// Last position the runtime committed.
    pub(crate) committed: Option<Position>,
    pub(crate) reader: Option<JoinHandle<()>>,
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
    pub(crate) recent: VecDeque<Instant>,
}

impl ShardStats {
    pub(crate) fn call(&mut self, now: Instant) {
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
pub struct KinesisStats(pub(crate) Arc<OwnedShards>);

impl KinesisStats {
    /// Statistics of every shard read so far.
    pub fn shards(&self) -> BTreeMap<PartitionId, ShardStats> {
        self.0
            .inbox
            .buffered()
            .stats
            .iter()
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect()
    }

    /// The shards this worker holds now.
    pub fn owned(&self) -> Vec<PartitionId> {
        self.0.inbox.buffered().owned.keys().cloned().collect()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a connection event names: the endpoint override, or the region's AWS endpoint.
pub(crate) fn endpoint(cfg: &KinesisSourceConfig) -> String {
    match (&cfg.connection.endpoint_url, &cfg.connection.region) {
        (Some(url), _) => format!("{url} (stream {})", cfg.stream),
        (None, Some(region)) => format!("Kinesis in {region} (stream {})", cfg.stream),
        (None, None) => format!("Kinesis in the default region (stream {})", cfg.stream),
    }
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
