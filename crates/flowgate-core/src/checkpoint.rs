use crate::{PartitionId, Position};

/// The last processed position of a partition, as stored by a [`CheckpointStore`].
///
/// `position` is inclusive: every record at or before it was confirmed by the sink (or
/// dead-lettered, or shed by policy). `fence` is the owner's fencing token (Kafka group
/// generation, Kinesis lease counter); a store refuses a write whose fence is older than the
/// stored one.
///
/// [`CheckpointStore`]: crate::CheckpointStore
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The partition.
    pub partition: PartitionId,
    /// Last processed position, inclusive.
    pub position: Position,
    /// Fencing token of the writer, if the source has ownership epochs.
    pub fence: Option<u64>,
}

impl Checkpoint {
    /// A checkpoint without a fencing token.
    pub fn new(partition: PartitionId, position: Position) -> Self {
        Checkpoint {
            partition,
            position,
            fence: None,
        }
    }

    /// Sets the fencing token.
    pub fn with_fence(mut self, fence: Option<u64>) -> Self {
        self.fence = fence;
        self
    }
}
