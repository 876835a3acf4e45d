//! Runtime settings: one serde struct, every field with a documented default.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every knob of the runtime. Unknown keys are refused (`deny_unknown_fields`), so a typo in
/// a configuration file is an error naming the key rather than a silently ignored setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Records received but not yet acknowledged, per partition (the partition's credit).
    /// Default 10 000.
    pub max_in_flight_per_partition: usize,
    /// Bytes of records held by the runtime across all partitions; when spent, every
    /// partition's credit drops to zero. Default 64 MiB.
    pub max_buffer_bytes: usize,
    /// Ordering promise towards the sink. Default `partition`.
    pub ordering: SinkOrdering,
    /// Number of ordered lanes per partition when `ordering = "key"`. Default 16.
    pub key_lanes: usize,
    /// Batching towards the sink.
    pub batch: BatchSettings,
    /// Sink concurrency.
    pub concurrency: ConcurrencySettings,
    /// Retries of temporary sink errors.
    pub retry: RetrySettings,
    /// What happens when a partition is full. Default `block`.
    pub overflow: OverflowPolicy,
    /// Checkpoint cadence.
    pub commit: CommitSettings,
    /// How long a shutdown waits for in-flight records before the final checkpoint.
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long a revocation waits for in-flight records of the revoked partitions.
    /// Default 10 s.
    #[serde(with = "humantime_serde")]
    pub revoke_timeout: Duration,
    /// Health evaluation.
    pub health: HealthSettings,
    /// How long dedup marks are kept. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
    /// Dedup marks are committed to the store at most once per this interval: marks of
    /// batches confirmed meanwhile share the next commit (one durable write, one `fsync` for
    /// the embedded store). A mark is never delayed more than this past the previous commit,
    /// and not at all when the store was idle that long; nor once a quarter of the current
    /// concurrency limit waits for its marks (those batches hold credit and concurrency).
    /// `0ms` commits as soon as the previous commit finished. Default 5 ms.
    #[serde(with = "humantime_serde")]
    pub dedup_mark_interval: Duration,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            max_in_flight_per_partition: 10_000,
            max_buffer_bytes: 64 * 1024 * 1024,
            ordering: SinkOrdering::Partition,
            key_lanes: 16,
            batch: BatchSettings::default(),
            concurrency: ConcurrencySettings::default(),
            retry: RetrySettings::default(),
            overflow: OverflowPolicy::Block,
            commit: CommitSettings::default(),
            drain_timeout: Duration::from_secs(30),
            revoke_timeout: Duration::from_secs(10),
            health: HealthSettings::default(),
            dedup_ttl: Duration::from_secs(7 * 24 * 3600),
            dedup_mark_interval: Duration::from_millis(5),
        }
    }
}

impl RuntimeSettings {
    /// Checks the values; the error names the offending key.
    pub fn validate(&self) -> Result<(), flowgate_core::Error> {
        fn bad(key: &str, why: &str) -> flowgate_core::Error {
            flowgate_core::Error::config(format!("invalid runtime setting `{key}`: {why}"))
                .with_context("key", key)
        }
        if self.max_in_flight_per_partition == 0 {
            return Err(bad("max_in_flight_per_partition", "must be at least 1"));
        }
        if self.max_buffer_bytes < 1024 {
            return Err(bad("max_buffer_bytes", "must be at least 1024"));
        }
        if self.key_lanes == 0 {
            return Err(bad("key_lanes", "must be at least 1"));
        }
        if self.batch.max_records == 0 {
            return Err(bad("batch.max_records", "must be at least 1"));
        }
        if self.batch.max_bytes == 0 {
            return Err(bad("batch.max_bytes", "must be at least 1"));
        }
        let c = &self.concurrency;
        if c.min == 0 || c.min > c.max || c.initial < c.min || c.initial > c.max {
            return Err(bad("concurrency", "needs 1 <= min <= initial <= max"));
        }
        if !(0.05..1.0).contains(&c.decrease_factor) {
            return Err(bad("concurrency.decrease_factor", "must be in [0.05, 1)"));
        }
        if self.commit.every_records == 0 {
            return Err(bad("commit.every_records", "must be at least 1"));
        }
        if self.commit.min_interval > self.commit.every {
            return Err(bad(
                "commit.min_interval",
                "must not exceed commit.every (the floor would defer every timed checkpoint)",
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(bad(
                "retry.max_attempts",
                "must be at least 1 (1 = no retry)",
            ));
        }
        Ok(())
    }
}

/// Ordering promise towards the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkOrdering {
    /// Records of one partition reach the sink in order: one batch per partition in flight.
    Partition,
    /// Records with the same key reach the sink in order; different keys of a partition may
    /// be written concurrently (`key_lanes` lanes per partition).
    Key,
    /// No ordering: several batches of one partition may be in flight.
    Unordered,
}

/// Batching towards the sink. A batch is sent when it is full (records or bytes) or its
/// oldest record has waited `linger`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    /// Records per batch. Default 500 (capped further by the sink's own limit).
    pub max_records: usize,
    /// Bytes per batch. Default 1 MiB (capped further by the sink's own limit).
    pub max_bytes: usize,
    /// How long a partial batch waits for more records. Default 5 ms. `0` sends a partial
    /// batch as soon as its lane is free — the lowest latency; batches still fill while the
    /// sink is busy with the previous one. Not applied to sources whose broker credit is tied
    /// to acknowledgements (`eager_commit`, RabbitMQ): their partial batches go at once.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_records: 500,
            max_bytes: 1024 * 1024,
            linger: Duration::from_millis(5),
        }
    }
}

/// Fixed or adaptive (AIMD) sink concurrency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConcurrencySettings {
    /// `fixed` (always `initial`) or `adaptive` (AIMD between `min` and `max`). Default
    /// `adaptive`.
    pub mode: ConcurrencyMode,
    /// Batches in flight at start. Default 4.
    pub initial: usize,
    /// Lower bound. Default 1.
    pub min: usize,
    /// Upper bound. Default 64.
    pub max: usize,
    /// Sink latency above which concurrency decreases. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub latency_target: Duration,
    /// Multiplicative decrease on throttles and latency overshoot. Default 0.5.
    pub decrease_factor: f64,
}

impl Default for ConcurrencySettings {
    fn default() -> Self {
        ConcurrencySettings {
            mode: ConcurrencyMode::Adaptive,
            initial: 4,
            min: 1,
            max: 64,
            latency_target: Duration::from_millis(500),
            decrease_factor: 0.5,
        }
    }
}

/// Concurrency mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConcurrencyMode {
    /// Always `initial` batches in flight.
    Fixed,
    /// Additive increase, multiplicative decrease within `[min, max]`.
    Adaptive,
}

/// Retries of temporary (transient, throttled) errors: exponential backoff with jitter and a
/// bounded budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// First delay. Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Largest delay. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Attempts in all, the first included. Default 20.
    pub max_attempts: usize,
    /// Total time spent retrying one batch before giving up. Default 120 s.
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
    /// What to do once the budget is spent. Default `stop`.
    pub on_exhausted: ExhaustedPolicy,
}

impl RetrySettings {
    /// The backoff these settings describe: `max_attempts` attempts in all (so one fewer
    /// retries), no retry starting after `max_elapsed`.
    pub(crate) fn policy(&self) -> flowgate_core::retry::BackoffPolicy {
        flowgate_core::retry::BackoffPolicy::new(self.initial_backoff, self.max_backoff)
            .with_max_attempts(self.max_attempts.saturating_sub(1))
            .with_give_up_after(self.max_elapsed)
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            max_attempts: 20,
            max_elapsed: Duration::from_secs(120),
            on_exhausted: ExhaustedPolicy::Stop,
        }
    }
}

/// What happens to records whose retry budget is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExhaustedPolicy {
    /// Stop the pipeline with the last error (nothing is acknowledged; a restart retries).
    Stop,
    /// Dead-letter the records and go on.
    DeadLetter,
}

/// What happens when a partition holds `max_in_flight_per_partition` records (or the byte
/// budget is spent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Backpressure to the broker: the source gets no credit (Kafka pause, RabbitMQ
    /// prefetch, no Kinesis reads). Nothing is dropped.
    Block,
    /// Keep fetching; drop the oldest queued (not yet sent) record. For latest-value streams.
    /// Shed records are acknowledged and counted.
    ShedOldest,
    /// Keep fetching; drop the incoming record. Shed records are acknowledged and counted.
    ShedNewest,
    /// Stop the pipeline with an error.
    FailFast,
}

/// When checkpoints are written: every `every_records` acknowledged records or `every`,
/// whichever comes first, and always on revoke and shutdown. At most one write is in flight;
/// the next one covers everything acknowledged meanwhile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommitSettings {
    /// Records. Default 1000.
    pub every_records: u64,
    /// Time. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    /// The least time from the start of one checkpoint write to the start of the next, however
    /// fast records are acknowledged. Default 10 ms. Each write is an `fsync` (embedded store)
    /// or a round trip (PostgreSQL, Redis): at 400,000 records/s, `every_records = 1000` alone
    /// asks for 400 of them a second. Revocation and shutdown write at once. 0: no floor.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
}

impl Default for CommitSettings {
    fn default() -> Self {
        CommitSettings {
            every_records: 1000,
            every: Duration::from_secs(5),
            min_interval: Duration::from_millis(10),
        }
    }
}

/// Health: the pipeline is unhealthy when lag grows while nothing is acknowledged for
/// `stall_window`, and disconnected while its source cannot reach the broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub stall_window: Duration,
    /// How long the source may stay unable to reach its broker (at start or mid-run) before
    /// the pipeline stops with a fatal error naming the endpoint. Default 120 s.
    #[serde(with = "humantime_serde")]
    pub disconnect_timeout: Duration,
    /// The window a partition's lag rate of change, catch-up estimate and `WARN` status are
    /// judged over (its `STALL` and `STOP` use `stall_window`). Default 60 s.
    #[serde(with = "humantime_serde")]
    pub lag_window: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            stall_window: Duration::from_secs(30),
            disconnect_timeout: Duration::from_secs(120),
            lag_window: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let s = RuntimeSettings::default();
        s.validate().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let back: RuntimeSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(json.contains("\"drain_timeout\":\"30s\""), "{json}");
    }

    #[test]
    fn unknown_and_invalid_keys_are_named() {
        let err = serde_json::from_str::<RuntimeSettings>(r#"{"max_inflight": 3}"#).unwrap_err();
        assert!(err.to_string().contains("max_inflight"), "{err}");
        let s: RuntimeSettings = serde_json::from_str(r#"{"concurrency": {"min": 0}}"#).unwrap();
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("concurrency"), "{err}");
    }
}
