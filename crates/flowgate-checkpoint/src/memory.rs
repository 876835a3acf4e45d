use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, Error, IdempotencyKey, PartitionId, Position,
    PositionRange,
};

use crate::rules::{Transition, check};

/// Checkpoints and dedup marks in memory, with the same rules as the durable stores.
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
        let map = inner.checkpoints.entry(pipeline.to_string()).or_default();
        let mut writes = Vec::new();
        for c in checkpoints {
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
