use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use flowgate_core::{Record, Sink, SinkCapabilities, WriteError};

/// Confirms every record at once and counts them. Clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct NullSink {
    records: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl NullSink {
    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Payload bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Sink for NullSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic().with_idempotent_writes(true)
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        self.records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(
            batch.iter().map(|r| r.payload.len() as u64).sum(),
            Ordering::Relaxed,
        );
        Ok(())
    }
}
