use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, PartitionId};

/// A lease on one partition of a pipeline (a Kinesis shard): which worker reads it, until
/// when, and its ownership epoch.
///
/// The epoch is the fencing token of the owner's checkpoints: every take raises it, a renewal
/// keeps it. A store that keeps both leases and checkpoints refuses a checkpoint whose fence
/// is below the partition's lease epoch, so a worker that lost a lease cannot write for that
/// partition any more, from the moment the lease was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The partition.
    pub partition: PartitionId,
    /// The worker holding it; `None` once released or finished.
    pub owner: Option<String>,
    /// Ownership epoch, raised by every take.
    pub epoch: u64,
    /// Time left before it expires, by the store's clock, when it was read; zero when it has
    /// expired or is not held.
    pub remaining: Duration,
    /// The partition was processed to its end (a Kinesis shard closed by resharding): nobody
    /// takes it again, and its children may start.
    pub finished: bool,
}

impl Lease {
    /// Whether a worker may take it without stealing: not finished, and released or expired.
    pub fn is_available(&self) -> bool {
        !self.finished && (self.owner.is_none() || self.remaining.is_zero())
    }

    /// The error a store returns when an operation on this lease finds it taken by another
    /// worker (or finished): [`ErrorKind::Fenced`](crate::ErrorKind::Fenced).
    pub fn lost(&self) -> Error {
        Error::new(
            crate::ErrorKind::Fenced,
            "lease lost: another worker took this partition",
        )
        .with_context("partition", &self.partition)
        .with_context("owner", self.owner.as_deref().unwrap_or("nobody"))
        .with_context("epoch", self.epoch)
    }

    /// Whether `owner` holds it and it has not expired.
    pub fn is_held_by(&self, owner: &str) -> bool {
        !self.finished && self.owner.as_deref() == Some(owner) && !self.remaining.is_zero()
    }
}

/// Leases that let several workers of one pipeline split its partitions.
///
/// Contract (tested by `testkit::store::lease_*`):
/// - [`acquire`](LeaseStore::acquire) is atomic: of many workers racing for one lease, exactly
///   one gets it. It succeeds when the lease does not exist yet, is released, has expired, or
///   (stealing, for balancing) still has the epoch the caller saw; never when it is finished.
///   Every success raises the epoch.
/// - [`renew`](LeaseStore::renew) extends a lease only while the caller still holds it (same
///   owner and epoch); otherwise it fails with [`ErrorKind::Fenced`](crate::ErrorKind::Fenced).
///   An expired lease that nobody took meanwhile can still be renewed.
/// - [`release`](LeaseStore::release) and [`finish`](LeaseStore::finish) act only on a lease
///   the caller holds (same owner and epoch) and fail with `Fenced` otherwise.
/// - Expiry is measured by the store's own clock, so workers' clocks need not agree.
/// - Stores that also keep checkpoints refuse a checkpoint whose fence is below the
///   partition's lease epoch.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Where the store lives, for logs and errors (never includes secrets).
    fn describe(&self) -> String;

    /// Every lease of a pipeline, held, expired, released or finished.
    async fn leases(&self, pipeline: &str) -> Result<Vec<Lease>, Error>;

    /// Takes the lease of `partition` for `owner`, for `ttl`. `steal` is the epoch the caller
    /// saw on a live lease it wants to take over (balancing); `None` takes only a lease that is
    /// missing, released or expired. `Ok(None)` means someone else holds it.
    async fn acquire(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        owner: &str,
        ttl: Duration,
        steal: Option<u64>,
    ) -> Result<Option<Lease>, Error>;

    /// Extends a held lease by `ttl` from now.
    async fn renew(&self, pipeline: &str, lease: &Lease, ttl: Duration) -> Result<Lease, Error>;

    /// Gives a held lease up, so another worker can take it at once.
    async fn release(&self, pipeline: &str, lease: &Lease) -> Result<(), Error>;

    /// Marks a held lease finished: its partition was processed to the end.
    async fn finish(&self, pipeline: &str, lease: &Lease) -> Result<(), Error>;
}
