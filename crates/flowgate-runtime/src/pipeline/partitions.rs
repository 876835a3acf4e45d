//! Partition lifecycle: assignments (start positions, fences, the checkpoints the broker lacks), revocations that drain before release, and removal.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

use flowgate_core::{
    Assignment, Checkpoint, Error, ErrorKind, LagUnit, PartitionId, Position, Revocation, Source,
    StartPosition,
};
use tokio::task::JoinHandle;

use crate::dedup::LookupFloor;
use crate::metrics::PartitionMetrics;
use crate::progress::ProgressWindow;
use crate::retry::retry_temporary;
use crate::settings::SinkOrdering;
use crate::tracker::AckTracker;

use super::*;

impl State {
    pub(super) async fn assign(
        &mut self,
        assignments: Vec<Assignment>,
        source: &mut Box<dyn Source>,
    ) -> Result<(), Error> {
        self.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        self.metrics.rebalances.increment(1);
        let stored = self.load_checkpoints().await?;
        let mut starts = Vec::with_capacity(assignments.len());
        // Stored checkpoints the broker does not know yet: committed to it right after the
        // start, so the broker's own tools (and lag exporters reading them) show the true lag
        // after any crash.
        let mut align = Vec::new();
        for mut a in assignments {
            let stored = stored.get(&a.partition);
            let stored_fence = stored.and_then(|c| c.fence);
            if a.fence.is_some() && stored_fence > a.fence {
                // Only a reset of the broker's own epoch gets here (a Kafka group deleted and
                // created anew starts its generations again at 1): the broker says this worker
                // owns the partition now, so it takes the stored fence rather than having every
                // checkpoint refused.
                tracing::warn!(pipeline = %self.name, partition = %a.partition, stored = ?stored_fence, assigned = ?a.fence,
                    "the broker's ownership epoch is below the stored checkpoint's fence (was the consumer group deleted?); taking the stored fence");
                a.fence = stored_fence;
            }
            let from_store = stored.map(|c| c.position.clone());
            let (after, needs_align) = self.start_after(&a, from_store.as_ref());
            if let (Some(s), true) = (&after, needs_align) {
                align.push(Checkpoint::new(a.partition.clone(), s.clone()).with_fence(a.fence));
            }
            let mut part = self.new_part(&a, after.clone()).await;
            if let (Some(s), Some(b)) = (&from_store, &a.broker_position) {
                if s < b {
                    // Records the broker counts as consumed are read again.
                    part.progress.rewound(Instant::now());
                }
            }
            if let Some(pos) = &after {
                self.committed.insert(
                    a.partition.clone(),
                    Checkpoint::new(a.partition.clone(), pos.clone()).with_fence(a.fence),
                );
            }
            self.next_incarnation += 1;
            if self.partitions.insert(a.partition.clone(), part).is_none() {
                self.order.push(a.partition.clone());
            }
            self.update_credit(&a.partition);
            starts.push(StartPosition {
                partition: a.partition,
                after,
            });
        }
        source.start(starts).await?;
        if !align.is_empty() {
            source.commit(&align).await?;
        }
        Ok(())
    }

    /// The pipeline's stored checkpoints, by partition (none without a store).
    async fn load_checkpoints(&self) -> Result<HashMap<PartitionId, Checkpoint>, Error> {
        let Some(store) = &self.store else {
            return Ok(HashMap::new());
        };
        let pipeline = self.name.clone();
        let loaded = retry_temporary(&self.settings.retry, "checkpoint load", || {
            store.load(&pipeline)
        })
        .await?;
        Ok(loaded
            .into_iter()
            .map(|c| (c.partition.clone(), c))
            .collect())
    }

    /// Where an assigned partition starts: after the stored checkpoint if there is one (the
    /// store is the source of truth), else after the broker's committed position, else at the
    /// source's default. Also whether the broker must be told the stored position.
    fn start_after(
        &self,
        a: &Assignment,
        from_store: Option<&Position>,
    ) -> (Option<Position>, bool) {
        match (from_store, &a.broker_position) {
            (Some(s), Some(b)) if s != b => {
                tracing::warn!(pipeline = %self.name, partition = %a.partition, checkpoint = %s, broker = %b,
                    "checkpoint store and broker disagree; the checkpoint store is the source of truth: committing its position to the broker");
                (Some(s.clone()), true)
            }
            (Some(s), None) if self.caps.broker_positions => {
                tracing::info!(pipeline = %self.name, partition = %a.partition, after = %s,
                    "starting after the stored checkpoint; the broker has no committed position: committing it there");
                (Some(s.clone()), true)
            }
            (Some(s), _) => {
                tracing::info!(pipeline = %self.name, partition = %a.partition, after = %s, "starting after the stored checkpoint");
                (Some(s.clone()), false)
            }
            (None, Some(b)) => {
                tracing::info!(pipeline = %self.name, partition = %a.partition, after = %b, "no stored checkpoint; starting after the broker's committed position");
                (Some(b.clone()), false)
            }
            (None, None) => {
                tracing::info!(pipeline = %self.name, partition = %a.partition, "no checkpoint anywhere; starting at the source's configured default");
                (None, false)
            }
        }
    }

    /// The state of a newly assigned partition that starts after `after`.
    async fn new_part(&self, a: &Assignment, after: Option<Position>) -> Part {
        let lanes = match self.settings.ordering {
            SinkOrdering::Key => self.settings.key_lanes,
            _ => 1,
        };
        let unit = match self.caps.lag_unit {
            Some(LagUnit::Millis) => "millis",
            _ => "records",
        };
        let mut tracker = AckTracker::new(0);
        tracker.set_initial(after);
        Part {
            incarnation: self.next_incarnation,
            fence: a.fence,
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            tracker,
            revoking: false,
            lag: None,
            progress: ProgressWindow::new(
                self.settings.health.lag_window,
                self.settings.health.stall_window,
            ),
            metrics: Some(PartitionMetrics::new(
                &self.name,
                a.partition.as_str(),
                unit,
            )),
            lookup: self.lookup_floor(&a.partition).await,
            unsettled: 0,
            commit_marks: VecDeque::new(),
            committed_seq: 0,
        }
    }

    /// Where positional dedup starts looking records up for a newly assigned partition: at
    /// the store's last mark for it. Every record is looked up if the store cannot tell.
    pub(super) async fn lookup_floor(&self, partition: &PartitionId) -> LookupFloor {
        let (Some(store), true) = (&self.workers.dedup, self.workers.positional) else {
            return LookupFloor::All;
        };
        if self.lingering.contains_key(partition) {
            // A batch of an earlier incarnation may still mark records after the read below.
            tracing::debug!(pipeline = %self.name, %partition, "batches of an earlier ownership still running: every record of the partition is looked up");
            return LookupFloor::All;
        }
        let res = retry_temporary(&self.settings.retry, "dedup last mark", || {
            store.last_marked_position(&self.name, partition)
        })
        .await;
        match res {
            Ok(last) => {
                tracing::debug!(pipeline = %self.name, %partition, last_mark = ?last, "positional dedup looks up records at or below the last mark");
                LookupFloor::Through(last)
            }
            Err(e) => {
                if e.kind() != ErrorKind::Unsupported {
                    tracing::warn!(pipeline = %self.name, %partition, error = %e, "cannot read the last dedup mark; every record of the partition is looked up");
                }
                LookupFloor::All
            }
        }
    }

    pub(super) fn revoke(&mut self, rev: Revocation) {
        self.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        self.metrics.rebalances.increment(1);
        for p in &rev.partitions {
            self.credits.remove(p);
            if let Some(part) = self.partitions.get_mut(p) {
                part.revoking = true;
                // Queued records were never sent: drop them; the next owner reads them again.
                for lane in &mut part.lanes {
                    self.bytes -= lane.clear();
                }
            }
        }
        self.publish_gauges();
        if rev.lost {
            tracing::warn!(pipeline = %self.name, partitions = ?rev.partitions, "partitions lost: in-flight results will be dropped, nothing committed");
            for p in &rev.partitions {
                self.remove_partition(p);
            }
            rev.complete(Vec::new());
        } else {
            let deadline = Instant::now() + self.settings.revoke_timeout;
            self.revokes.push(PendingRevoke {
                revocation: rev,
                deadline,
            });
        }
    }

    /// Completes revocations whose partitions have drained (or whose deadline passed).
    /// Returns true if it did something (the loop re-evaluates).
    pub(super) async fn finish_revokes(
        &mut self,
        now: Instant,
        commit_task: &mut Option<JoinHandle<CommitOutput>>,
        source: &mut Box<dyn Source>,
    ) -> bool {
        let Some(idx) = self.revokes.iter().position(|r| {
            now >= r.deadline
                || r.revocation.partitions.iter().all(|p| {
                    self.partitions
                        .get(p)
                        .is_none_or(|part| part.unsettled == 0)
                })
        }) else {
            return false;
        };
        let pending = self.revokes.swap_remove(idx);
        if let Some(task) = commit_task.take() {
            let res = task.await;
            self.on_commit_done(res, source).await;
        }
        let partitions = pending.revocation.partitions.clone();
        if let Err(e) = self.write_checkpoints(partitions.clone()).await {
            self.fail(e);
        }
        // The source commits the final positions of revoked partitions itself.
        let finals: Vec<Checkpoint> = partitions
            .iter()
            .filter_map(|p| self.committed.get(p).cloned())
            .collect();
        for p in &partitions {
            self.remove_partition(p);
        }
        tracing::info!(pipeline = %self.name, partitions = ?partitions, "revocation drained");
        pending.revocation.complete(finals);
        true
    }

    pub(super) fn remove_partition(&mut self, p: &PartitionId) {
        if let Some(part) = self.partitions.remove(p) {
            if part.unsettled > 0 {
                *self.lingering.entry(p.clone()).or_default() += part.unsettled;
            }
            let pending = part.tracker.pending() as u64;
            self.stats.in_flight.fetch_sub(
                pending.min(self.stats.in_flight.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            for lane in &part.lanes {
                self.bytes -= lane.queued_bytes;
            }
            // A revoked partition's gauges read nothing rather than its last value.
            if let Some(m) = &part.metrics {
                m.clear();
            }
        }
        self.order.retain(|x| x != p);
        self.committed.remove(p);
        self.credits.remove(p);
    }
}
