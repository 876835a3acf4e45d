//! Metrics exported through the [`metrics`] facade; install any recorder (Prometheus, …).
//!
//! Every series carries a `pipeline` label; per-partition series also carry `partition`.

use metrics::{Counter, Gauge, Histogram};

/// Names of every metric the runtime exports.
pub mod names {
    /// Counter: records received from the source.
    pub const RECORDS_IN: &str = "flowgate_records_in_total";
    /// Counter: records confirmed by the sink.
    pub const RECORDS_OUT: &str = "flowgate_records_out_total";
    /// Gauge: records received and not yet settled.
    pub const IN_FLIGHT: &str = "flowgate_in_flight_records";
    /// Gauge: bytes of records held by the runtime.
    pub const BUFFER_BYTES: &str = "flowgate_buffer_bytes";
    /// Gauge (per partition): source lag, in the unit of label `unit` (`records`, `millis`).
    pub const LAG: &str = "flowgate_lag";
    /// Gauge (per partition): lag rate of change per second over `health.lag_window`
    /// (positive: falling behind).
    pub const LAG_RATE: &str = "flowgate_lag_rate_per_second";
    /// Gauge (per partition): how long ago the partition's end stood where its committed
    /// position stands now.
    pub const LAG_SECONDS: &str = "flowgate_lag_seconds";
    /// Gauge (per partition): seconds until the lag reaches 0 at the current drain rate;
    /// `+Inf` while it does not shrink.
    pub const CATCH_UP: &str = "flowgate_catch_up_seconds";
    /// Gauge (per partition): 0 OK, 1 WARN, 2 STALL, 3 STOP, 4 REWIND (Burrow's statuses).
    pub const PARTITION_STATUS: &str = "flowgate_partition_status";
    /// Gauge: Unix time of the last checkpoint written.
    pub const LAST_CHECKPOINT: &str = "flowgate_last_checkpoint_timestamp_seconds";
    /// Histogram (seconds): record timestamp → sink confirmation, oldest record of each batch.
    pub const END_TO_END: &str = "flowgate_end_to_end_latency_seconds";
    /// Histogram (seconds): checkpoint store write + broker commit.
    pub const COMMIT_LATENCY: &str = "flowgate_commit_latency_seconds";
    /// Counter: sink write retries.
    pub const RETRIES: &str = "flowgate_retries_total";
    /// Counter: throttles met by the sink.
    pub const THROTTLES: &str = "flowgate_throttles_total";
    /// Counter: records shed by an overflow policy.
    pub const SHED: &str = "flowgate_shed_total";
    /// Counter: records sent to the dead-letter destination.
    pub const DEAD_LETTERS: &str = "flowgate_dead_letters_total";
    /// Counter: records skipped as already applied.
    pub const DEDUP_HITS: &str = "flowgate_dedup_hits_total";
    /// Counter: partition assignments and revocations.
    pub const REBALANCES: &str = "flowgate_rebalances_total";
    /// Counter: checkpoint commits.
    pub const COMMITS: &str = "flowgate_commits_total";
    /// Gauge: sink concurrency limit.
    pub const CONCURRENCY: &str = "flowgate_sink_concurrency";
    /// Gauge: 1 healthy, 0 unhealthy.
    pub const HEALTHY: &str = "flowgate_healthy";
    /// Gauge: 1 ready (`/ready` answers 200), 0 not (see `Stats::readiness`).
    pub const READY: &str = "flowgate_ready";
    /// Gauge: 1 while the source reaches its broker, 0 while it cannot.
    pub const SOURCE_CONNECTED: &str = "flowgate_source_connected";
    /// Gauge: 0 while the checkpoint store's last answer was a temporary failure, else 1.
    pub const STORE_CONNECTED: &str = "flowgate_store_connected";
}

/// Metric handles of one pipeline, registered once.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) records_in: Counter,
    pub(crate) records_out: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) buffer_bytes: Gauge,
    pub(crate) end_to_end: Histogram,
    pub(crate) commit_latency: Histogram,
    pub(crate) retries: Counter,
    pub(crate) throttles: Counter,
    pub(crate) shed: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) dedup_hits: Counter,
    pub(crate) rebalances: Counter,
    pub(crate) commits: Counter,
    pub(crate) concurrency: Gauge,
    pub(crate) healthy: Gauge,
    pub(crate) ready: Gauge,
    pub(crate) source_connected: Gauge,
    pub(crate) store_connected: Gauge,
    pub(crate) last_checkpoint: Gauge,
}

impl Metrics {
    pub(crate) fn new(pipeline: &str) -> Self {
        let p = pipeline.to_string();
        Metrics {
            records_in: metrics::counter!(names::RECORDS_IN, "pipeline" => p.clone()),
            records_out: metrics::counter!(names::RECORDS_OUT, "pipeline" => p.clone()),
            in_flight: metrics::gauge!(names::IN_FLIGHT, "pipeline" => p.clone()),
            buffer_bytes: metrics::gauge!(names::BUFFER_BYTES, "pipeline" => p.clone()),
            end_to_end: metrics::histogram!(names::END_TO_END, "pipeline" => p.clone()),
            commit_latency: metrics::histogram!(names::COMMIT_LATENCY, "pipeline" => p.clone()),
            retries: metrics::counter!(names::RETRIES, "pipeline" => p.clone()),
            throttles: metrics::counter!(names::THROTTLES, "pipeline" => p.clone()),
            shed: metrics::counter!(names::SHED, "pipeline" => p.clone()),
            dead_letters: metrics::counter!(names::DEAD_LETTERS, "pipeline" => p.clone()),
            dedup_hits: metrics::counter!(names::DEDUP_HITS, "pipeline" => p.clone()),
            rebalances: metrics::counter!(names::REBALANCES, "pipeline" => p.clone()),
            commits: metrics::counter!(names::COMMITS, "pipeline" => p.clone()),
            concurrency: metrics::gauge!(names::CONCURRENCY, "pipeline" => p.clone()),
            healthy: metrics::gauge!(names::HEALTHY, "pipeline" => p.clone()),
            ready: metrics::gauge!(names::READY, "pipeline" => p.clone()),
            source_connected: metrics::gauge!(names::SOURCE_CONNECTED, "pipeline" => p.clone()),
            store_connected: metrics::gauge!(names::STORE_CONNECTED, "pipeline" => p.clone()),
            last_checkpoint: metrics::gauge!(names::LAST_CHECKPOINT, "pipeline" => p),
        }
    }
}

/// Per-partition gauges.
pub(crate) struct PartitionMetrics {
    pub(crate) lag: Gauge,
    pub(crate) lag_rate: Gauge,
    pub(crate) lag_seconds: Gauge,
    pub(crate) catch_up: Gauge,
    pub(crate) status: Gauge,
}

impl PartitionMetrics {
    pub(crate) fn new(pipeline: &str, partition: &str, unit: &'static str) -> Self {
        let labels = [
            metrics::Label::new("pipeline", pipeline.to_string()),
            metrics::Label::new("partition", partition.to_string()),
        ];
        let with_unit = [
            labels[0].clone(),
            labels[1].clone(),
            metrics::Label::new("unit", unit),
        ];
        PartitionMetrics {
            lag: metrics::gauge!(names::LAG, with_unit.iter()),
            lag_rate: metrics::gauge!(names::LAG_RATE, labels.iter()),
            lag_seconds: metrics::gauge!(names::LAG_SECONDS, labels.iter()),
            catch_up: metrics::gauge!(names::CATCH_UP, labels.iter()),
            status: metrics::gauge!(names::PARTITION_STATUS, labels.iter()),
        }
    }

    /// A partition no longer owned here: nothing lags, nothing to catch up.
    pub(crate) fn clear(&self) {
        self.lag.set(0.0);
        self.lag_rate.set(0.0);
        self.lag_seconds.set(0.0);
        self.catch_up.set(0.0);
        self.status.set(0.0);
    }
}
