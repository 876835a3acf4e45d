//! Shared test helpers: a minimal in-memory store (the runtime does not depend on
//! flowgate-checkpoint) that also logs every operation, for invariant checks.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, Error, IdempotencyKey, PartitionId, Position,
    PositionRange,
};

/// One store operation, in the order the store applied it.
#[derive(Clone, Debug)]
pub enum Op {
    Mark(Vec<IdempotencyKey>),
    MarkRanges(Vec<PositionRange>),
    Commit(Vec<Checkpoint>),
    /// Positions looked up by `seen_positions`.
    Lookup(Vec<Position>),
}

#[derive(Default)]
pub struct MemoryStore {
    checkpoints: Mutex<HashMap<String, HashMap<PartitionId, Checkpoint>>>,
    marks: Mutex<HashSet<(String, IdempotencyKey)>>,
    ranges: Mutex<Vec<PositionRange>>,
    pub ops: Mutex<Vec<Op>>,
    /// When each `mark` / `mark_ranges` call started.
    pub mark_calls: Mutex<Vec<std::time::Instant>>,
    /// When each checkpoint `commit` call started.
    pub commit_calls: Mutex<Vec<std::time::Instant>>,
    pub mark_delay: Duration,
    /// How long each checkpoint `commit` takes.
    pub commit_delay: Duration,
    /// Keep positional marks (ranges) instead of only keys.
    pub positional: bool,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }
    pub fn with_mark_delay(d: Duration) -> Self {
        MemoryStore {
            mark_delay: d,
            ..Default::default()
        }
    }
    pub fn with_commit_delay(d: Duration) -> Self {
        MemoryStore {
            commit_delay: d,
            ..Default::default()
        }
    }
    pub fn positional(mut self, on: bool) -> Self {
        self.positional = on;
        self
    }
}

#[async_trait]
impl CheckpointStore for MemoryStore {
    fn describe(&self) -> String {
        "test memory store".into()
    }
    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        Ok(self
            .checkpoints
            .lock()
            .unwrap()
            .get(pipeline)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }
    async fn commit(&self, pipeline: &str, cps: &[Checkpoint]) -> Result<(), Error> {
        self.commit_calls
            .lock()
            .unwrap()
            .push(std::time::Instant::now());
        tokio::time::sleep(self.commit_delay).await;
        let mut all = self.checkpoints.lock().unwrap();
        let m = all.entry(pipeline.to_string()).or_default();
        for c in cps {
            if let Some(old) = m.get(&c.partition) {
                if c.fence < old.fence {
                    return Err(Error::new(
                        flowgate_core::ErrorKind::Fenced,
                        "a newer owner holds this partition",
                    ));
                }
                assert!(
                    old.position <= c.position,
                    "checkpoint moved backwards: {old:?} -> {c:?}"
                );
            }
            m.insert(c.partition.clone(), c.clone());
        }
        self.ops.lock().unwrap().push(Op::Commit(cps.to_vec()));
        Ok(())
    }
    async fn reset(&self, pipeline: &str, _: Option<&[PartitionId]>) -> Result<(), Error> {
        self.checkpoints.lock().unwrap().remove(pipeline);
        Ok(())
    }
}

#[async_trait]
impl DedupStore for MemoryStore {
    fn describe(&self) -> String {
        "test memory store".into()
    }
    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error> {
        let m = self.marks.lock().unwrap();
        Ok(keys
            .iter()
            .map(|k| m.contains(&(pipeline.to_string(), k.clone())))
            .collect())
    }
    async fn mark(
        &self,
        pipeline: &str,
        keys: &[IdempotencyKey],
        _ttl: Duration,
    ) -> Result<(), Error> {
        if !self.mark_delay.is_zero() {
            tokio::time::sleep(self.mark_delay).await;
        }
        let mut m = self.marks.lock().unwrap();
        for k in keys {
            m.insert((pipeline.to_string(), k.clone()));
        }
        self.ops.lock().unwrap().push(Op::Mark(keys.to_vec()));
        Ok(())
    }
    fn supports_position_ranges(&self) -> bool {
        self.positional
    }
    async fn seen_positions(
        &self,
        _pipeline: &str,
        partition: &PartitionId,
        positions: &[Position],
    ) -> Result<Vec<bool>, Error> {
        self.ops
            .lock()
            .unwrap()
            .push(Op::Lookup(positions.to_vec()));
        let ranges = self.ranges.lock().unwrap();
        Ok(positions
            .iter()
            .map(|p| {
                ranges
                    .iter()
                    .any(|r| &r.partition == partition && r.first <= *p && *p <= r.last)
            })
            .collect())
    }
    async fn last_marked_position(
        &self,
        _pipeline: &str,
        partition: &PartitionId,
    ) -> Result<Option<Position>, Error> {
        let ranges = self.ranges.lock().unwrap();
        Ok(ranges
            .iter()
            .filter(|r| &r.partition == partition)
            .map(|r| r.last.clone())
            .max())
    }
    async fn mark_ranges(
        &self,
        _pipeline: &str,
        ranges: &[PositionRange],
        _ttl: Duration,
    ) -> Result<(), Error> {
        self.mark_calls
            .lock()
            .unwrap()
            .push(std::time::Instant::now());
        if !self.mark_delay.is_zero() {
            tokio::time::sleep(self.mark_delay).await;
        }
        self.ranges.lock().unwrap().extend_from_slice(ranges);
        self.ops
            .lock()
            .unwrap()
            .push(Op::MarkRanges(ranges.to_vec()));
        Ok(())
    }
}
