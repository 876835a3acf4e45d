//! What a source's broker says of a pipeline's partitions, read from outside any running
//! pipeline (`flowgate lag`, `flowgate validate`): without joining a consumer group, taking a
//! lease or consuming a message.

use crate::{PartitionId, Position};

/// One partition (Kafka partition, Kinesis shard, RabbitMQ queue) as its broker sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionView {
    /// The partition.
    pub partition: PartitionId,
    /// The last position the broker counts as consumed (Kafka's committed offset − 1), where
    /// the broker keeps one.
    pub broker_committed: Option<Position>,
    /// The last position written to the partition, if it holds any record.
    pub end: Option<Position>,
    /// Records after the pipeline's checkpoint (or, without one, after the broker's
    /// committed position), where the broker can count them (Kafka offsets, RabbitMQ queue
    /// depth).
    pub lag_records: Option<u64>,
    /// Age of the first record after that position (its broker timestamp), or the broker's
    /// own reading (Kinesis `MillisBehindLatest`); 0 with nothing behind.
    pub lag_seconds: Option<f64>,
    /// Who holds the partition now (group member, lease owner, consumers), if anyone.
    pub owner: Option<String>,
}
