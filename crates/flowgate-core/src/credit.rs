use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::PartitionId;

/// Per-partition credit: how many more records a source may deliver for each partition.
///
/// The runtime owns the numbers (it grants credit as records are acknowledged and takes it as
/// records arrive, and closes the global gate when the byte budget is spent); the source only
/// reads them and maps them onto its broker's flow control:
///
/// - Kafka: `pause` a partition whose credit is 0, `resume` it when credit returns, while
///   polling continues (the member stays in its group);
/// - RabbitMQ: `basic.qos` prefetch = credit;
/// - Kinesis: no `GetRecords` for a shard without credit;
/// - the generator: generates nothing for that partition.
///
/// Credit is advisory for records already fetched: a source MAY deliver a batch that
/// overshoots (the runtime accepts it and counts it), but it MUST stop fetching a partition
/// whose credit is 0. Unknown partitions have no credit.
#[derive(Clone, Default)]
pub struct Credits {
    inner: Arc<Inner>,
}

struct Inner {
    partitions: RwLock<HashMap<PartitionId, Arc<AtomicUsize>>>,
    open: AtomicBool,
    notify: Notify,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            partitions: RwLock::new(HashMap::new()),
            open: AtomicBool::new(true),
            notify: Notify::new(),
        }
    }
}

/// A cached handle on one partition's credit (cheap to read in a hot loop).
#[derive(Clone)]
pub struct CreditGrant {
    cell: Arc<AtomicUsize>,
    credits: Credits,
}

impl CreditGrant {
    /// Records the source may still deliver for this partition (0 while the global byte
    /// budget is spent).
    pub fn available(&self) -> usize {
        if self.credits.inner.open.load(Ordering::Acquire) {
            self.cell.load(Ordering::Acquire)
        } else {
            0
        }
    }
}

impl Credits {
    /// A new credit table with no partitions.
    pub fn new() -> Self {
        Credits::default()
    }

    /// Records the source may still deliver for `partition`.
    pub fn available(&self, partition: &PartitionId) -> usize {
        if !self.inner.open.load(Ordering::Acquire) {
            return 0;
        }
        self.read()
            .get(partition)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// A handle to read one partition's credit without a map lookup.
    pub fn grant(&self, partition: &PartitionId) -> Option<CreditGrant> {
        self.read().get(partition).map(|cell| CreditGrant {
            cell: cell.clone(),
            credits: self.clone(),
        })
    }

    /// A future that completes the next time credit grows anywhere.
    ///
    /// Create it *before* checking [`available`](Self::available), then await it, so that a
    /// grant between the check and the await is not missed:
    ///
    /// ```
    /// # async fn demo(credits: flowgate_core::Credits, p: flowgate_core::PartitionId) {
    /// loop {
    ///     let changed = credits.changed();
    ///     if credits.available(&p) > 0 { break; }
    ///     changed.await;
    /// }
    /// # }
    /// ```
    pub fn changed(&self) -> Notified<'_> {
        self.inner.notify.notified()
    }

    /// Waits until `partition` has credit.
    pub async fn wait_for(&self, partition: &PartitionId) {
        loop {
            let changed = self.changed();
            if self.available(partition) > 0 {
                return;
            }
            changed.await;
        }
    }

    // ---- runtime side -------------------------------------------------------------------

    /// Sets a partition's credit (runtime side). Wakes waiters when credit grows from zero.
    pub fn set(&self, partition: &PartitionId, credit: usize) {
        let prev = {
            let map = self.read();
            map.get(partition).map(|c| c.swap(credit, Ordering::AcqRel))
        };
        let prev = match prev {
            Some(p) => p,
            None => {
                self.write()
                    .insert(partition.clone(), Arc::new(AtomicUsize::new(credit)));
                0
            }
        };
        if prev == 0 && credit > 0 {
            self.inner.notify.notify_waiters();
        }
    }

    /// Forgets a partition (revoked): it has no credit from now on.
    pub fn remove(&self, partition: &PartitionId) {
        if let Some(cell) = self.write().remove(partition) {
            cell.store(0, Ordering::Release);
        }
    }

    /// Opens or closes the global gate (the runtime's byte budget).
    pub fn set_open(&self, open: bool) {
        let was = self.inner.open.swap(open, Ordering::AcqRel);
        if open && !was {
            self.inner.notify.notify_waiters();
        }
    }

    /// Whether the global gate is open.
    pub fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PartitionId, Arc<AtomicUsize>>> {
        self.inner
            .partitions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PartitionId, Arc<AtomicUsize>>> {
        self.inner
            .partitions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.read();
        let mut d = f.debug_map();
        for (k, v) in map.iter() {
            d.entry(k, &v.load(Ordering::Relaxed));
        }
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_wake_when_credit_returns() {
        let credits = Credits::new();
        let p = PartitionId::new("p0");
        credits.set(&p, 0);
        let c2 = credits.clone();
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { c2.wait_for(&p2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        credits.set(&p, 5);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(credits.available(&p), 5);
    }

    #[test]
    fn closed_gate_and_unknown_partitions_have_no_credit() {
        let credits = Credits::new();
        let p = PartitionId::new("p0");
        assert_eq!(credits.available(&p), 0);
        credits.set(&p, 3);
        let grant = credits.grant(&p).unwrap();
        credits.set_open(false);
        assert_eq!(grant.available(), 0);
        assert_eq!(credits.available(&p), 0);
        credits.set_open(true);
        assert_eq!(grant.available(), 3);
        credits.remove(&p);
        assert_eq!(grant.available(), 0);
    }
}
