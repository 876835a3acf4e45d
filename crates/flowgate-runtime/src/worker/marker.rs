//! The group commit of dedup marks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flowgate_core::{DedupStore, Error, IdempotencyKey, PositionRange};
use tokio::sync::{mpsc, oneshot};

use crate::retry::retry_temporary;
use crate::settings::RetrySettings;
use crate::stats::Stats;

/// The marks of one batch, and where to say when they are durable.
pub(crate) struct MarkRequest {
    pub(super) keys: Vec<IdempotencyKey>,
    pub(super) ranges: Vec<PositionRange>,
    pub(super) done: oneshot::Sender<Result<(), Error>>,
}

/// Coalesces concurrent mark requests into one store call: with a durable store each call
/// costs an fsync, so batches confirmed while one call runs share the next one. Calls start
/// at most once per `interval` — those confirmed meanwhile wait and share it — unless a
/// quarter of the current concurrency limit (`stats`) is waiting already: a waiting batch
/// holds its credit and a slot of the limit, so waiting longer would slow the pipeline down.
pub(crate) async fn marker_task(
    store: Arc<dyn DedupStore>,
    pipeline: String,
    ttl: Duration,
    (interval, stats): (Duration, Arc<Stats>),
    retry: RetrySettings,
    mut rx: mpsc::UnboundedReceiver<MarkRequest>,
) {
    let mut last_call: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut requests = vec![first];
        if let Some(due) = last_call.map(|at| at + interval) {
            let limit = stats.concurrency.load(Ordering::Relaxed);
            let max_waiting = usize::try_from(limit / 4).unwrap_or(usize::MAX).max(1);
            while requests.len() < max_waiting {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => requests.push(r),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(due) => break,
                }
            }
        }
        last_call = Some(tokio::time::Instant::now());
        while let Ok(r) = rx.try_recv() {
            requests.push(r);
        }
        let res = write_marks(&*store, &pipeline, ttl, &retry, &requests).await;
        for r in requests {
            let _ = r
                .done
                .send(res.as_ref().map(|_| ()).map_err(Error::duplicate));
        }
    }
}

/// One store call for the keys and one for the ranges of all `requests`.
async fn write_marks(
    store: &dyn DedupStore,
    pipeline: &str,
    ttl: Duration,
    retry: &RetrySettings,
    requests: &[MarkRequest],
) -> Result<(), Error> {
    let keys: Vec<IdempotencyKey> = requests
        .iter()
        .flat_map(|r| r.keys.iter().cloned())
        .collect();
    let ranges: Vec<PositionRange> = requests
        .iter()
        .flat_map(|r| r.ranges.iter().cloned())
        .collect();
    if !keys.is_empty() {
        retry_temporary(retry, "dedup mark", || store.mark(pipeline, &keys, ttl)).await?;
    }
    if !ranges.is_empty() {
        retry_temporary(retry, "dedup mark", || {
            store.mark_ranges(pipeline, &ranges, ttl)
        })
        .await?;
    }
    Ok(())
}
