use std::time::Duration;

use async_trait::async_trait;

use crate::{Checkpoint, Error, IdempotencyKey, PartitionId, Position};

/// Durable checkpoints: the last processed position of each partition, per pipeline.
///
/// Contract (tested by `testkit::store`):
/// - `commit` is atomic for all its checkpoints and durable when it returns.
/// - A checkpoint never moves backwards through `commit`, and a write whose `fence` is older
///   than the stored one is refused with [`ErrorKind::Fenced`](crate::ErrorKind::Fenced);
///   only [`reset`](CheckpointStore::reset) moves it back.
/// - Pipelines are isolated namespaces.
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// Where the store lives, for logs and errors (never includes secrets).
    fn describe(&self) -> String;

    /// Every checkpoint of a pipeline.
    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error>;

    /// Stores checkpoints atomically and durably.
    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error>;

    /// Forgets checkpoints: of the given partitions, or all of the pipeline's if `None`.
    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error>;
}

/// Consecutive deliveries of one partition, from `first` to `last` inclusive, marked as
/// applied in one entry. Only records delivered one after the other form a range, so a range
/// never covers a record that was not applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PositionRange {
    /// The partition.
    pub partition: PartitionId,
    /// First position of the run.
    pub first: Position,
    /// Last position of the run.
    pub last: Position,
}

/// Durable idempotency marks: which records were already applied by the sink.
///
/// Contract (tested by `testkit::store`):
/// - `mark` is durable when it returns; marks live at least `ttl`.
/// - `seen` answers for each key, in order, whether a live mark exists.
/// - Pipelines are isolated namespaces.
#[async_trait]
pub trait DedupStore: Send + Sync {
    /// Where the store lives, for logs and errors.
    fn describe(&self) -> String;

    /// For each key, whether it was marked (and has not expired).
    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error>;

    /// Marks keys as applied, for at least `ttl`.
    async fn mark(
        &self,
        pipeline: &str,
        keys: &[IdempotencyKey],
        ttl: Duration,
    ) -> Result<(), Error>;

    /// Whether the store keeps *positional* marks ([`mark_ranges`](Self::mark_ranges)): when
    /// the idempotency key is the record's partition and position, a batch of consecutive
    /// records is one range instead of one key per record.
    fn supports_position_ranges(&self) -> bool {
        false
    }

    /// For each position of `partition`, in order, whether a live range covers it.
    async fn seen_positions(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        positions: &[Position],
    ) -> Result<Vec<bool>, Error> {
        let _ = (pipeline, partition, positions);
        Err(Error::unsupported(
            "this dedup store keeps no positional marks",
        ))
    }

    /// The highest position of `partition` that a live range covers, `None` if no live range
    /// does.
    ///
    /// The runtime asks once when a partition is assigned: a record delivered later, above
    /// this position and above every record already delivered since, cannot carry a mark
    /// (only an earlier owner could have written one), so it is not looked up. A store with
    /// positional marks should implement it; without it every batch is looked up.
    async fn last_marked_position(
        &self,
        pipeline: &str,
        partition: &PartitionId,
    ) -> Result<Option<Position>, Error> {
        let _ = (pipeline, partition);
        Err(Error::unsupported(
            "this dedup store cannot tell its last positional mark",
        ))
    }

    /// Marks ranges of consecutive deliveries as applied, for at least `ttl`.
    async fn mark_ranges(
        &self,
        pipeline: &str,
        ranges: &[PositionRange],
        ttl: Duration,
    ) -> Result<(), Error> {
        let _ = (pipeline, ranges, ttl);
        Err(Error::unsupported(
            "this dedup store keeps no positional marks",
        ))
    }
}
