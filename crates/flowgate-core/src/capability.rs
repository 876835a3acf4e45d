/// Unit in which a source reports lag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LagUnit {
    /// Records behind the end of the partition (Kafka high watermark, queue depth).
    Records,
    /// Milliseconds behind the newest record (Kinesis `MillisBehindLatest`).
    Millis,
}

/// What a source can do. The runtime and the conformance suite key off these instead of
/// special-casing adapters.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceCapabilities {
    /// Records of one partition are delivered in position order.
    pub ordered_per_partition: bool,
    /// The source can start from a checkpointed position (Kafka, Kinesis, RabbitMQ streams,
    /// the generator) rather than only from where the broker kept it (RabbitMQ queues).
    pub replayable: bool,
    /// Broker credit is tied to acknowledgements (RabbitMQ prefetch): the runtime commits as
    /// soon as the watermark moves instead of on the record/time cadence.
    pub eager_commit: bool,
    /// The source can dead-letter a record on the broker itself ([`Source::reject`]).
    ///
    /// [`Source::reject`]: crate::Source::reject
    pub native_dead_letter: bool,
    /// Partitions are assigned and revoked at run time (consumer groups, leases).
    pub dynamic_assignment: bool,
    /// The broker keeps committed positions of its own (Kafka's group offsets), reported in
    /// [`Assignment::broker_position`](crate::Assignment::broker_position) and moved by
    /// [`Source::commit`](crate::Source::commit). When the checkpoint store's position differs
    /// from them (or the broker has none), the runtime commits the stored position right after
    /// the start — the store is the source of truth, in either direction — so the broker's own
    /// tools show the true lag after a crash.
    pub broker_positions: bool,
    /// The unit of the lag samples this source emits, if any.
    pub lag_unit: Option<LagUnit>,
}

impl SourceCapabilities {
    /// Capabilities of an ordered, replayable, statically assigned source.
    pub const fn replayable_ordered() -> Self {
        SourceCapabilities {
            ordered_per_partition: true,
            replayable: true,
            eager_commit: false,
            native_dead_letter: false,
            dynamic_assignment: false,
            broker_positions: false,
            lag_unit: Some(LagUnit::Records),
        }
    }

    /// Builder-style setter for `eager_commit`.
    pub const fn with_eager_commit(mut self, eager: bool) -> Self {
        self.eager_commit = eager;
        self
    }

    /// Builder-style setter for `native_dead_letter`.
    pub const fn with_native_dead_letter(mut self, native: bool) -> Self {
        self.native_dead_letter = native;
        self
    }

    /// Builder-style setter for `dynamic_assignment`.
    pub const fn with_dynamic_assignment(mut self, dynamic: bool) -> Self {
        self.dynamic_assignment = dynamic;
        self
    }

    /// Builder-style setter for `broker_positions`.
    pub const fn with_broker_positions(mut self, kept: bool) -> Self {
        self.broker_positions = kept;
        self
    }

    /// Builder-style setter for `replayable`.
    pub const fn with_replayable(mut self, replayable: bool) -> Self {
        self.replayable = replayable;
        self
    }

    /// Builder-style setter for `lag_unit`.
    pub const fn with_lag_unit(mut self, unit: Option<LagUnit>) -> Self {
        self.lag_unit = unit;
        self
    }
}

/// What a sink can do.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkCapabilities {
    /// Largest batch (records) one `write` call accepts (Kinesis PutRecords: 500).
    pub max_batch_records: Option<usize>,
    /// Largest batch (bytes) one `write` call accepts (Kinesis PutRecords: 5 MiB).
    pub max_batch_bytes: Option<usize>,
    /// Largest single record; a larger one is poison.
    pub max_record_bytes: Option<usize>,
    /// The sink can commit its output, dedup marks and checkpoints in one transaction
    /// ([`Sink::write_transactional`]): exactly-once for this sink.
    ///
    /// [`Sink::write_transactional`]: crate::Sink::write_transactional
    pub transactional: bool,
    /// The sink forwards the idempotency key downstream (header, `message_id`, column).
    pub forwards_idempotency_key: bool,
    /// Writing the same record twice leaves one copy (upsert by key).
    pub idempotent_writes: bool,
}

impl SinkCapabilities {
    /// A sink with no batch limits that forwards nothing.
    pub const fn basic() -> Self {
        SinkCapabilities {
            max_batch_records: None,
            max_batch_bytes: None,
            max_record_bytes: None,
            transactional: false,
            forwards_idempotency_key: false,
            idempotent_writes: false,
        }
    }

    /// Builder-style setter for `transactional`.
    pub const fn with_transactional(mut self, tx: bool) -> Self {
        self.transactional = tx;
        self
    }

    /// Builder-style setter for `forwards_idempotency_key`.
    pub const fn with_forwards_idempotency_key(mut self, fwd: bool) -> Self {
        self.forwards_idempotency_key = fwd;
        self
    }

    /// Builder-style setter for the batch limits.
    pub const fn with_batch_limits(mut self, records: Option<usize>, bytes: Option<usize>) -> Self {
        self.max_batch_records = records;
        self.max_batch_bytes = bytes;
        self
    }

    /// Builder-style setter for `max_record_bytes`.
    pub const fn with_max_record_bytes(mut self, bytes: Option<usize>) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    /// Builder-style setter for `idempotent_writes`.
    pub const fn with_idempotent_writes(mut self, idempotent: bool) -> Self {
        self.idempotent_writes = idempotent;
        self
    }
}
