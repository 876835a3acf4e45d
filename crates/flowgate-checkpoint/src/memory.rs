use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, Error, IdempotencyKey, Lease, LeaseStore, PartitionId,
    Position, PositionRange,
};

use crate::rules::{self, LeaseRecord, Transition, check, check_lease_fence, now_ms};

/// Checkpoints, dedup marks and leases in memory, with the same rules as the durable stores.
/// Durable only for the life of the process: for tests.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    checkpoints: HashMap<String, HashMap<PartitionId, Checkpoint>>,
    marks: HashMap<(String, IdempotencyKey), Instant>,
    /// first → (last, expiry) per pipeline and partition.
    ranges: HashMap<(String, PartitionId), BTreeMap<Position, (Position, Instant)>>,
    leases: HashMap<String, BTreeMap<PartitionId, LeaseRecord>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl CheckpointStore for MemoryStore {
    fn describe(&self) -> String {
        "in-memory store".into()
    }

    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        Ok(self
            .lock()
            .checkpoints
            .get(pipeline)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let leases = inner.leases.get(pipeline);
        let map = inner.checkpoints.entry(pipeline.to_string()).or_default();
        let mut writes = Vec::new();
        for c in checkpoints {
            check_lease_fence(leases.and_then(|l| l.get(&c.partition)).map(|l| l.epoch), c)?;
            if check(map.get(&c.partition), c)? == Transition::Write {
                writes.push(c.clone());
            }
        }
        for c in writes {
            map.insert(c.partition.clone(), c);
        }
        Ok(())
    }

    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        let mut inner = self.lock();
        match partitions {
            None => {
                inner.checkpoints.remove(pipeline);
            }
            Some(ps) => {
                if let Some(map) = inner.checkpoints.get_mut(pipeline) {
                    for p in ps {
                        map.remove(p);
                    }
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl DedupStore for MemoryStore {
    fn describe(&self) -> String {
        "in-memory store".into()
    }

    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error> {
        let inner = self.lock();
        let now = Instant::now();
        Ok(keys
            .iter()
            .map(|k| {
                inner
                    .marks
                    .get(&(pipeline.to_string(), k.clone()))
                    .is_some_and(|exp| *exp > now)
            })
            .collect())
    }

    async fn mark(
        &self,
        pipeline: &str,
        keys: &[IdempotencyKey],
        ttl: Duration,
    ) -> Result<(), Error> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.marks.retain(|_, exp| *exp > now);
        let exp = now + ttl;
        for k in keys {
            inner.marks.insert((pipeline.to_string(), k.clone()), exp);
        }
        Ok(())
    }

    fn supports_position_ranges(&self) -> bool {
        true
    }

    async fn seen_positions(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        positions: &[Position],
    ) -> Result<Vec<bool>, Error> {
        let inner = self.lock();
        let now = Instant::now();
        let Some(map) = inner.ranges.get(&(pipeline.to_string(), partition.clone())) else {
            return Ok(vec![false; positions.len()]);
        };
        Ok(positions
            .iter()
            .map(|p| {
                map.range(..=p.clone())
                    .any(|(_, (last, exp))| last >= p && *exp > now)
            })
            .collect())
    }

    async fn last_marked_position(
        &self,
        pipeline: &str,
        partition: &PartitionId,
    ) -> Result<Option<Position>, Error> {
        let inner = self.lock();
        let now = Instant::now();
        Ok(inner
            .ranges
            .get(&(pipeline.to_string(), partition.clone()))
            .and_then(|map| {
                map.values()
                    .filter(|(_, exp)| *exp > now)
                    .map(|(last, _)| last.clone())
                    .max()
            }))
    }

    async fn mark_ranges(
        &self,
        pipeline: &str,
        ranges: &[PositionRange],
        ttl: Duration,
    ) -> Result<(), Error> {
        let mut inner = self.lock();
        let now = Instant::now();
        let exp = now + ttl;
        for map in inner.ranges.values_mut() {
            map.retain(|_, (_, e)| *e > now);
        }
        for r in ranges {
            let map = inner
                .ranges
                .entry((pipeline.to_string(), r.partition.clone()))
                .or_default();
            let entry = map.entry(r.first.clone()).or_insert((r.last.clone(), exp));
            if entry.0 < r.last {
                entry.0 = r.last.clone();
            }
            entry.1 = entry.1.max(exp);
        }
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for MemoryStore {
    fn describe(&self) -> String {
        "in-memory store".into()
    }

    async fn leases(&self, pipeline: &str) -> Result<Vec<Lease>, Error> {
        let now = now_ms();
        Ok(self
            .lock()
            .leases
            .get(pipeline)
            .map(|m| {
                m.iter()
                    .map(|(p, l)| rules::view(p.clone(), l, now))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn acquire(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        owner: &str,
        ttl: Duration,
        steal: Option<u64>,
    ) -> Result<Option<Lease>, Error> {
        let mut inner = self.lock();
        let map = inner.leases.entry(pipeline.to_string()).or_default();
        let now = now_ms();
        let Some(taken) = rules::acquire(map.get(partition), owner, now, ttl, steal) else {
            return Ok(None);
        };
        let lease = rules::view(partition.clone(), &taken, now);
        map.insert(partition.clone(), taken);
        Ok(Some(lease))
    }

    async fn renew(&self, pipeline: &str, lease: &Lease, ttl: Duration) -> Result<Lease, Error> {
        self.update(pipeline, lease, |l, now| rules::renewed(l, now, ttl))
    }

    async fn release(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.update(pipeline, lease, |l, _| rules::given_up(l, false))
            .map(|_| ())
    }

    async fn finish(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.update(pipeline, lease, |l, _| rules::given_up(l, true))
            .map(|_| ())
    }
}

impl MemoryStore {
    /// Applies `change` to a lease the caller still holds.
    fn update(
        &self,
        pipeline: &str,
        lease: &Lease,
        change: impl FnOnce(&LeaseRecord, u64) -> LeaseRecord,
    ) -> Result<Lease, Error> {
        let mut inner = self.lock();
        let map = inner.leases.entry(pipeline.to_string()).or_default();
        let stored = rules::check_holder(map.get(&lease.partition), lease)?;
        let now = now_ms();
        let next = change(stored, now);
        let view = rules::view(lease.partition.clone(), &next, now);
        map.insert(lease.partition.clone(), next);
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use flowgate_core::testkit::store::{StoreHarness, run_all};

    struct H(Arc<MemoryStore>);

    #[async_trait]
    impl StoreHarness for H {
        type Store = MemoryStore;
        async fn open(&self) -> Arc<MemoryStore> {
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn memory_store_passes_the_conformance_suite() {
        run_all(&H(Arc::new(MemoryStore::new()))).await;
    }
}
