//! Commits: one checkpoint write at a time covering everything acknowledged before it started, then the broker commit; the store watched for failures.

use std::sync::Arc;
use std::time::Instant;

use flowgate_core::{Checkpoint, CheckpointStore, Error, ErrorKind, PartitionId, Source};
use tokio::task::JoinHandle;

use crate::retry::retry_temporary;
use crate::stats::Stats;

use super::*;

impl State {
    pub(super) fn pending_checkpoints(
        &mut self,
        partitions: impl Iterator<Item = PartitionId>,
    ) -> Vec<Checkpoint> {
        let committed = &self.committed;
        partitions
            .filter_map(|p| {
                let part = self.partitions.get_mut(&p)?;
                let w = part.tracker.watermark()?.clone();
                if committed.get(&p).is_some_and(|c| c.position == w) {
                    return None;
                }
                part.commit_marks
                    .push_back((w.clone(), part.tracker.prefix_end()));
                Some(Checkpoint::new(p, w).with_fence(part.fence))
            })
            .collect()
    }

    /// A checkpoint was written: the records it covers no longer count as lag.
    pub(super) fn note_committed(&mut self, c: Checkpoint) {
        if let Some(part) = self.partitions.get_mut(&c.partition) {
            while let Some((pos, seq)) = part.commit_marks.front() {
                if *pos > c.position {
                    break;
                }
                part.committed_seq = part.committed_seq.max(*seq);
                part.commit_marks.pop_front();
            }
        }
        self.committed.insert(c.partition.clone(), c);
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.last_checkpoint.set(unix);
    }

    pub(super) async fn maybe_start_commit(
        &mut self,
        now: Instant,
        source: &mut Box<dyn Source>,
    ) -> Option<JoinHandle<CommitOutput>> {
        let since = now.duration_since(self.last_commit_at);
        let due = self.force_commit
            || (since >= self.settings.commit.min_interval
                && (self.uncommitted >= self.settings.commit.every_records
                    || (self.uncommitted > 0 && since >= self.settings.commit.every)));
        if !due {
            return None;
        }
        self.force_commit = false;
        self.uncommitted = 0;
        self.last_commit_at = now;
        let cps = self.pending_checkpoints(self.order.clone().into_iter());
        if cps.is_empty() {
            return None;
        }
        match &self.store {
            Some(store) => {
                let store = store.clone();
                let pipeline = self.name.clone();
                let retry = self.settings.retry.clone();
                Some(tokio::spawn(async move {
                    let started = Instant::now();
                    let res = retry_temporary(&retry, "checkpoint commit", || {
                        store.commit(&pipeline, &cps)
                    })
                    .await;
                    match res {
                        Err(e) if e.kind() == ErrorKind::Fenced && cps.len() > 1 => {
                            let (written, res) =
                                commit_apart(&*store, &pipeline, &retry, cps).await;
                            (written, res, started)
                        }
                        Err(e) if e.kind() == ErrorKind::Fenced => {
                            warn_refused(&pipeline, &cps, &e);
                            (Vec::new(), Ok(()), started)
                        }
                        res => (cps, res, started),
                    }
                }))
            }
            None => {
                let started = Instant::now();
                self.after_store_commit(cps, Ok(()), started, source).await;
                None
            }
        }
    }

    pub(super) async fn on_commit_done(&mut self, res: CommitResult, source: &mut Box<dyn Source>) {
        match res {
            Ok((cps, res, started)) => self.after_store_commit(cps, res, started, source).await,
            Err(join) => {
                self.fail(Error::fatal("the checkpoint task panicked").with_context("cause", join))
            }
        }
    }

    pub(super) async fn after_store_commit(
        &mut self,
        cps: Vec<Checkpoint>,
        res: Result<(), Error>,
        started: Instant,
        source: &mut Box<dyn Source>,
    ) {
        if let Err(e) = res {
            self.fail(e.with_context("while", "writing checkpoints"));
            return;
        }
        // Only partitions still owned are committed to the broker.
        let owned: Vec<Checkpoint> = cps
            .into_iter()
            .filter(|c| {
                self.partitions
                    .get(&c.partition)
                    .is_some_and(|p| p.fence == c.fence)
            })
            .collect();
        if owned.is_empty() {
            return;
        }
        if let Err(e) = source.commit(&owned).await {
            if e.is_temporary() {
                tracing::warn!(pipeline = %self.name, error = %e, "broker commit failed; the next commit covers it");
            } else {
                self.fail(e.with_context("while", "committing to the broker"));
                return;
            }
        }
        self.metrics
            .commit_latency
            .record(started.elapsed().as_secs_f64());
        self.metrics.commits.increment(1);
        Stats::add(&self.stats.commits, 1);
        for c in owned {
            self.note_committed(c);
        }
    }

    /// Writes the checkpoints of `partitions` to the store now (revoke); returns what was written.
    pub(super) async fn write_checkpoints(
        &mut self,
        partitions: Vec<PartitionId>,
    ) -> Result<Vec<Checkpoint>, Error> {
        let cps = self.pending_checkpoints(partitions.into_iter());
        if cps.is_empty() {
            return Ok(cps);
        }
        if let Some(store) = &self.store {
            let pipeline = self.name.clone();
            retry_temporary(&self.settings.retry, "checkpoint commit", || {
                store.commit(&pipeline, &cps)
            })
            .await?;
            Stats::add(&self.stats.commits, 1);
        }
        for c in &cps {
            self.note_committed(c.clone());
        }
        Ok(cps)
    }

    /// Final checkpoint: store, then broker.
    pub(super) async fn commit_now(
        &mut self,
        source: &mut Box<dyn Source>,
        partitions: Vec<PartitionId>,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let cps = self.pending_checkpoints(partitions.into_iter());
        if cps.is_empty() {
            return Ok(());
        }
        let res = match &self.store {
            Some(store) => {
                let pipeline = self.name.clone();
                retry_temporary(&self.settings.retry, "final checkpoint", || {
                    store.commit(&pipeline, &cps)
                })
                .await
            }
            None => Ok(()),
        };
        self.after_store_commit(cps, res, started, source).await;
        Ok(())
    }
}

/// The checkpoint store as the coordinator uses it: a temporary failure marks the store
/// unreachable in the pipeline's stats (health `disconnected`), a success clears it.
pub(super) struct WatchedStore {
    pub(super) inner: Arc<dyn CheckpointStore>,
    pub(super) stats: Arc<Stats>,
}

impl WatchedStore {
    pub(super) fn observe<T>(&self, res: Result<T, Error>) -> Result<T, Error> {
        match &res {
            Err(e) if e.is_temporary() => self.stats.set_store_failure(Some(e.to_string())),
            // Any other answer (a refused write included) means the store was reached.
            _ => {
                if self.stats.store_failure().is_some() {
                    self.stats.set_store_failure(None);
                }
            }
        }
        res
    }
}

#[async_trait::async_trait]
impl CheckpointStore for WatchedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        self.observe(self.inner.load(pipeline).await)
    }
    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        self.observe(self.inner.commit(pipeline, checkpoints).await)
    }
    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        self.observe(self.inner.reset(pipeline, partitions).await)
    }
}

/// After a fenced commit: commits each checkpoint on its own, so that a partition another
/// worker took over (a stolen lease, a newer group generation) does not stop the progress of
/// the others. The refused ones are dropped with a warning: the source revokes those
/// partitions as lost, and their records are redelivered to the new owner.
pub(super) async fn commit_apart(
    store: &dyn CheckpointStore,
    pipeline: &str,
    retry: &crate::settings::RetrySettings,
    cps: Vec<Checkpoint>,
) -> (Vec<Checkpoint>, Result<(), Error>) {
    let mut written = Vec::with_capacity(cps.len());
    for cp in cps {
        let one = std::slice::from_ref(&cp);
        match retry_temporary(retry, "checkpoint commit", || store.commit(pipeline, one)).await {
            Ok(()) => written.push(cp),
            Err(e) if e.kind() == ErrorKind::Fenced => warn_refused(pipeline, one, &e),
            Err(e) => return (written, Err(e)),
        }
    }
    (written, Ok(()))
}

pub(super) fn warn_refused(pipeline: &str, cps: &[Checkpoint], e: &Error) {
    for cp in cps {
        tracing::warn!(pipeline = %pipeline, partition = %cp.partition, error = %e,
            "checkpoint refused: another owner holds this partition; its progress here is dropped");
    }
}
