//! How the builder's parts fit together: the dedup mode, the checkpoint store as the
//! pipeline watches it, the dedup marker, the batch limits.

use std::sync::Arc;

use flowgate_core::{CheckpointStore, DedupStore, Error, SinkCapabilities, SourceCapabilities};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::dedup::KeyExtractor;
use crate::settings::RuntimeSettings;
use crate::stats::Stats;
use crate::worker;

use super::commits::WatchedStore;

/// How a pipeline deduplicates, from its source, sink and dedup settings.
pub(super) struct DedupMode {
    /// The sink writes the dedup marks in its own transaction.
    pub(super) transactional: bool,
    /// Marks are position ranges rather than one key per record.
    pub(super) positional: bool,
    /// The key extractor, when keys must be materialised on records.
    pub(super) extractor: Option<KeyExtractor>,
}

pub(super) fn dedup_mode(
    name: &str,
    caps: &SourceCapabilities,
    sink_caps: &SinkCapabilities,
    store: Option<&Arc<dyn DedupStore>>,
    extractor: Option<KeyExtractor>,
) -> Result<DedupMode, Error> {
    let has_store = store.is_some();
    let by_position = matches!(extractor, Some(KeyExtractor::SourcePosition));
    if by_position && !caps.replayable {
        return Err(Error::config(
            "dedup by source position needs a replayable source: this source's positions change when a record is redelivered",
        )
        .with_context("key", "dedup.key")
        .with_hint("deduplicate by a message id instead (RabbitMQ queues: the AMQP message_id is the idempotency key; `key = \"key\"` or `header:NAME` uses it)"));
    }
    let transactional = sink_caps.transactional && has_store;
    if sink_caps.transactional && !has_store {
        tracing::warn!(pipeline = %name, "the sink is transactional but no dedup store is configured: writes are at-least-once");
    }
    let positional =
        by_position && store.is_some_and(|s| s.supports_position_ranges()) && !transactional;
    // With positional marks the key is only materialised for sinks that forward it.
    let extractor = if positional && !sink_caps.forwards_idempotency_key {
        None
    } else {
        extractor
    };
    Ok(DedupMode {
        transactional,
        positional,
        extractor,
    })
}

/// The checkpoint store as the pipeline uses it: every answer tells the pipeline's health
/// whether the store can be reached; none for a source that cannot start from a position (a
/// RabbitMQ queue), whose positions mean nothing to a later process (its broker keeps the
/// progress, as acks).
pub(super) fn checkpoint_store(
    store: Option<Arc<dyn CheckpointStore>>,
    caps: &SourceCapabilities,
    stats: &Arc<Stats>,
    name: &str,
) -> Option<Arc<dyn CheckpointStore>> {
    let inner = store?;
    if !caps.replayable {
        tracing::info!(pipeline = %name, "the source is not replayable (its broker keeps the progress): the checkpoint store is not used");
        return None;
    }
    Some(Arc::new(WatchedStore {
        inner,
        stats: stats.clone(),
    }))
}

/// The task that commits dedup marks, and the channel that feeds it.
pub(super) fn spawn_marker(
    store: Arc<dyn DedupStore>,
    name: &str,
    settings: &RuntimeSettings,
    stats: &Arc<Stats>,
) -> (mpsc::UnboundedSender<worker::MarkRequest>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(worker::marker_task(
        store,
        name.to_string(),
        settings.dedup_ttl,
        (settings.dedup_mark_interval, stats.clone()),
        settings.retry.clone(),
        rx,
    ));
    (tx, task)
}

/// Records and bytes per batch: the settings', within the sink's own limits, at least 1.
pub(super) fn batch_limits(sink: &SinkCapabilities, settings: &RuntimeSettings) -> (usize, usize) {
    let records = sink
        .max_batch_records
        .map_or(settings.batch.max_records, |m| {
            m.min(settings.batch.max_records)
        });
    let bytes = sink.max_batch_bytes.map_or(settings.batch.max_bytes, |m| {
        m.min(settings.batch.max_bytes)
    });
    (records.max(1), bytes.max(1))
}
