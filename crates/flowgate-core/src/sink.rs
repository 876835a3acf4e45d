use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, IdempotencyKey, Record, SinkCapabilities};

/// Why a `write` did not fully succeed.
#[derive(Debug)]
pub enum WriteError {
    /// The whole batch failed with this error; nothing of it may be assumed written.
    Batch(Error),
    /// Some records failed (by index into the batch); the others were confirmed.
    Partial(Vec<(usize, Error)>),
}

impl From<Error> for WriteError {
    fn from(e: Error) -> Self {
        WriteError::Batch(e)
    }
}

/// What a transactional sink commits together with its output: the dedup marks of the records
/// it writes. Output and marks become durable in one transaction, so a replay skips exactly
/// the records whose output exists (exactly-once for that sink). The runtime writes the
/// checkpoint afterwards through the [`CheckpointStore`](crate::CheckpointStore), as for any
/// sink: a checkpoint only decides where a replay starts, and the marks make that replay
/// skip what is already applied.
#[derive(Debug)]
pub struct TxContext<'a> {
    /// The pipeline's name: the namespace of the dedup marks and checkpoints.
    pub pipeline: &'a str,
    /// Idempotency keys of the records being written, to be marked in the same transaction.
    pub dedup_marks: &'a [IdempotencyKey],
    /// How long the marks must be kept.
    pub dedup_ttl: Duration,
}

/// A destination for records: a broker producer, a file, a table.
///
/// The full contract is in `docs/specs/adapter.md`; in short:
///
/// - `write` returns `Ok` only when every record of the batch is durable by the sink's own
///   standard (Kafka delivery report, RabbitMQ publisher confirm, Kinesis PutRecords entry
///   result, file write returned). The runtime commits nothing before that.
/// - Errors carry an [`ErrorKind`](crate::ErrorKind): temporary ones are retried by the
///   runtime, poison ones dead-lettered; a sink MUST NOT retry forever on its own.
/// - `write` may be called concurrently (up to the runtime's concurrency limit); calls for one
///   partition are never concurrent unless the pipeline opted into unordered processing.
#[async_trait]
pub trait Sink: Send + Sync {
    /// What this sink can do.
    fn capabilities(&self) -> SinkCapabilities;

    /// Writes a batch and waits for it to be confirmed.
    async fn write(&self, batch: &[Record]) -> Result<(), WriteError>;

    /// Writes a batch and commits it together with `tx` (its dedup marks) in one transaction. Only called when `capabilities().transactional`.
    async fn write_transactional(
        &self,
        batch: &[Record],
        tx: &TxContext<'_>,
    ) -> Result<(), WriteError> {
        let _ = (batch, tx);
        Err(WriteError::Batch(Error::unsupported(
            "this sink cannot write transactionally",
        )))
    }

    /// Flushes anything buffered. Called before the final checkpoint.
    async fn flush(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Releases resources. MUST return within a bounded time.
    async fn close(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Proves the destination reachable with the configured credentials, writing nothing
    /// (`flowgate validate`): `Ok(true)` checked, `Ok(false)` nothing to check (no
    /// connection behind this sink).
    async fn check(&self) -> Result<bool, Error> {
        Ok(false)
    }
}

/// `Sink` for smart pointers to a sink (`Arc<dyn Sink>`, `Box<dyn Sink>`): every method
/// forwards to the pointee, so an override a sink makes is never lost.
macro_rules! forward_sink {
    ($($ptr:ident)::+) => {
        #[async_trait]
        impl<S: Sink + ?Sized> Sink for $($ptr)::+<S> {
            fn capabilities(&self) -> SinkCapabilities {
                (**self).capabilities()
            }
            async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
                (**self).write(batch).await
            }
            async fn write_transactional(
                &self,
                batch: &[Record],
                tx: &TxContext<'_>,
            ) -> Result<(), WriteError> {
                (**self).write_transactional(batch, tx).await
            }
            async fn flush(&self) -> Result<(), Error> {
                (**self).flush().await
            }
            async fn close(&self) -> Result<(), Error> {
                (**self).close().await
            }
            async fn check(&self) -> Result<bool, Error> {
                (**self).check().await
            }
        }
    };
}

forward_sink!(std::sync::Arc);
forward_sink!(Box);
