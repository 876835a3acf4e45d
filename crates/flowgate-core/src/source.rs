use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::{
    Checkpoint, Credits, Error, LagUnit, PartitionId, Position, Record, SourceCapabilities,
};

/// What the runtime hands a source when it opens it.
#[derive(Clone, Debug)]
pub struct SourceContext {
    /// The pipeline's name (consumer group defaults, checkpoint namespace, log fields).
    pub pipeline: String,
    /// Per-partition credit; the source MUST NOT fetch for a partition without credit.
    pub credits: Credits,
    /// The most records the runtime holds in flight for one partition: a partition's credit
    /// never exceeds it. A source whose broker pushes into a window of its own (RabbitMQ's
    /// `basic.qos` prefetch) makes that window no larger, so the broker never sends more than
    /// the runtime can take. `usize::MAX` when the runtime sets no such limit.
    pub max_in_flight_per_partition: usize,
}

impl SourceContext {
    /// A context with no per-partition limit.
    pub fn new(pipeline: impl Into<String>, credits: Credits) -> Self {
        SourceContext {
            pipeline: pipeline.into(),
            credits,
            max_in_flight_per_partition: usize::MAX,
        }
    }

    /// Builder-style setter for `max_in_flight_per_partition`.
    pub fn with_max_in_flight_per_partition(mut self, max: usize) -> Self {
        self.max_in_flight_per_partition = max;
        self
    }
}

/// A partition newly owned by this source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The partition.
    pub partition: PartitionId,
    /// Ownership epoch (Kafka group generation, Kinesis lease counter), used as the fencing
    /// token of the checkpoints written for this partition.
    pub fence: Option<u64>,
    /// Where the broker itself says to resume (the last processed position, inclusive): the
    /// Kafka group's committed offset − 1, for example. `None` if the broker has nothing.
    pub broker_position: Option<Position>,
}

impl Assignment {
    /// An assignment without fence or broker position.
    pub fn new(partition: PartitionId) -> Self {
        Assignment {
            partition,
            fence: None,
            broker_position: None,
        }
    }
}

/// Where a partition starts, decided by the runtime after an [`Assignment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartPosition {
    /// The partition.
    pub partition: PartitionId,
    /// Resume *after* this position (the last processed one); `None` means the source's
    /// configured default (`earliest`, `TRIM_HORIZON`, …).
    pub after: Option<Position>,
}

/// A lag reading for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LagSample {
    /// The partition.
    pub partition: PartitionId,
    /// Lag in `unit`.
    pub lag: u64,
    /// What `lag` counts.
    pub unit: LagUnit,
}

/// Whether a source can reach its broker; see [`SourceEvent::Connection`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    /// The broker answers again.
    Up,
    /// The broker cannot be reached.
    Down {
        /// What was being reached (bootstrap servers, URL without credentials, endpoint).
        endpoint: String,
        /// Why, as the client library said it.
        cause: String,
    },
}

/// A revocation in progress: the source gives up these partitions once the runtime has
/// drained them and hands back their final checkpoints.
///
/// The runtime MUST call [`Revocation::complete`] after finishing (bounded by its drain
/// timeout) the in-flight records of these partitions and writing their checkpoints; the
/// source MUST commit the returned positions to the broker before releasing the partitions
/// (Kafka: inside the rebalance callback). Dropping a `Revocation` completes it with nothing
/// to commit.
#[derive(Debug)]
pub struct Revocation {
    /// The partitions being revoked.
    pub partitions: Vec<PartitionId>,
    /// The partitions are already lost (lease stolen, session expired): nothing may be
    /// committed for them, in-flight results are dropped.
    pub lost: bool,
    done: Option<oneshot::Sender<Vec<Checkpoint>>>,
}

/// The source's side of a [`Revocation`]: waits for the runtime to finish draining.
#[derive(Debug)]
pub struct RevocationWaiter {
    rx: oneshot::Receiver<Vec<Checkpoint>>,
}

impl Revocation {
    /// A revocation and the waiter the source keeps.
    pub fn new(partitions: Vec<PartitionId>, lost: bool) -> (Revocation, RevocationWaiter) {
        let (tx, rx) = oneshot::channel();
        (
            Revocation {
                partitions,
                lost,
                done: Some(tx),
            },
            RevocationWaiter { rx },
        )
    }

    /// Reports the drain as finished, with the final checkpoints to commit.
    pub fn complete(mut self, checkpoints: Vec<Checkpoint>) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(checkpoints);
        }
    }
}

impl RevocationWaiter {
    /// Waits (at most `timeout`) for the runtime's final checkpoints. Returns an empty list if
    /// the runtime dropped the revocation or the timeout passed: then nothing is committed and
    /// the records will be redelivered to the next owner (at-least-once).
    pub async fn wait(self, timeout: Duration) -> Vec<Checkpoint> {
        match tokio::time::timeout(timeout, self.rx).await {
            Ok(Ok(cps)) => cps,
            _ => Vec::new(),
        }
    }

    /// Blocking variant for sources whose rebalance callbacks run on their own thread
    /// (rdkafka). Must not be called from inside an async runtime worker.
    pub fn wait_blocking(self, timeout: Duration) -> Vec<Checkpoint> {
        let deadline = std::time::Instant::now() + timeout;
        let mut rx = self.rx;
        loop {
            match rx.try_recv() {
                Ok(cps) => return cps,
                Err(oneshot::error::TryRecvError::Closed) => return Vec::new(),
                Err(oneshot::error::TryRecvError::Empty) => {
                    if std::time::Instant::now() >= deadline {
                        return Vec::new();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
}

/// Something the source has to say: records, a change of ownership, a lag reading, or the end.
#[derive(Debug)]
pub enum SourceEvent {
    /// Records, in position order per partition.
    Records(Vec<Record>),
    /// Partitions newly owned; the runtime answers with [`Source::start`].
    Assigned(Vec<Assignment>),
    /// Partitions being given up; see [`Revocation`].
    Revoked(Revocation),
    /// Lag readings.
    Lag(Vec<LagSample>),
    /// The connection to the broker went down or came back. A source reports
    /// [`Connection::Down`] when it cannot reach its broker (at start or mid-run) and
    /// [`Connection::Up`] once it can again; the runtime turns this into health, a metric,
    /// repeated warnings and, after its disconnect timeout, a fatal error naming the endpoint.
    Connection(Connection),
    /// The source is finite and has delivered everything.
    End,
}

/// A source of records: a broker consumer, a generator, a file.
///
/// The full contract is in `docs/specs/adapter.md`; in short:
///
/// - [`open`](Source::open) first; then the first events SHOULD be the initial
///   [`SourceEvent::Assigned`]. The source MUST NOT deliver records of a partition before
///   [`start`](Source::start) was called for it.
/// - [`next`](Source::next) MUST be cancel-safe: the runtime races it against acknowledgements
///   and drops it when they win; no record may be lost by that.
/// - The source MUST stop fetching a partition whose credit (see [`Credits`]) is 0, and MUST
///   keep the broker session alive meanwhile (poll, heartbeat, keep the channel open).
/// - [`commit`](Source::commit) is called only with positions the sink confirmed and the
///   checkpoint store recorded; the source MUST NOT commit anything on its own
///   (no auto-commit, no auto-ack).
#[async_trait]
pub trait Source: Send {
    /// What this source can do.
    fn capabilities(&self) -> SourceCapabilities;

    /// Connects, joins the group, declares what it must. Errors of kind `Config` or `Fatal`
    /// stop the pipeline; `Transient` ones are retried by the runtime.
    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error>;

    /// The next event. MUST be cancel-safe.
    async fn next(&mut self) -> Result<SourceEvent, Error>;

    /// Where assigned partitions start. Called once per [`Assignment`].
    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error>;

    /// Commits positions to the broker (Kafka offsets, RabbitMQ acks up to a delivery tag,
    /// Kinesis lease checkpoints). Positions are inclusive: everything at or before them is done.
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error>;

    /// Dead-letters one record on the broker itself (RabbitMQ `basic.reject` to the
    /// dead-letter exchange). Only called when `capabilities().native_dead_letter`.
    async fn reject(&mut self, record: &Record, error: &Error) -> Result<(), Error> {
        let _ = (record, error);
        Err(Error::unsupported(
            "this source cannot dead-letter records on the broker",
        ))
    }

    /// Stops fetching and releases the broker session. MUST return within a bounded time.
    async fn close(&mut self) -> Result<(), Error>;

    /// Reads the pipeline's partitions from the broker without opening the source (no group
    /// joined, no lease taken, nothing consumed): committed and end positions, lag after
    /// `checkpoints` (the pipeline's stored ones; the broker's committed position where a
    /// partition has none), and the owner. Also proves the broker reachable with these
    /// credentials. Sources that cannot answer return an `Unsupported` error.
    async fn inspect(
        &mut self,
        pipeline: &str,
        checkpoints: &[Checkpoint],
    ) -> Result<Vec<crate::PartitionView>, Error> {
        let _ = (pipeline, checkpoints);
        Err(Error::unsupported(
            "this source cannot be read from outside a running pipeline",
        ))
    }
}

#[async_trait]
impl<S: Source + ?Sized> Source for Box<S> {
    fn capabilities(&self) -> SourceCapabilities {
        (**self).capabilities()
    }
    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        (**self).open(ctx).await
    }
    async fn next(&mut self) -> Result<SourceEvent, Error> {
        (**self).next().await
    }
    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        (**self).start(starts).await
    }
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        (**self).commit(checkpoints).await
    }
    async fn reject(&mut self, record: &Record, error: &Error) -> Result<(), Error> {
        (**self).reject(record, error).await
    }
    async fn close(&mut self) -> Result<(), Error> {
        (**self).close().await
    }
    async fn inspect(
        &mut self,
        pipeline: &str,
        checkpoints: &[Checkpoint],
    ) -> Result<Vec<crate::PartitionView>, Error> {
        (**self).inspect(pipeline, checkpoints).await
    }
}
