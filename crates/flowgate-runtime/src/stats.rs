//! Live statistics and health of a pipeline.
//!
//! Everything here is also exported through the `metrics` facade (see [`crate::metric_names`]);
//! [`Stats`] is the in-process view used by the status line, the CLI and tests.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

/// Health of a pipeline: *progress*, not mere liveness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Health {
    /// Not running yet.
    #[default]
    Starting,
    /// Acknowledging records, or nothing to do.
    Healthy,
    /// Lag grew while nothing was acknowledged for the stall window.
    Unhealthy,
    /// The source cannot reach its broker (or the checkpoint store cannot be reached).
    Disconnected,
    /// Finished.
    Stopped,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            3 => Health::Stopped,
            4 => Health::Disconnected,
            _ => Health::Starting,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            Health::Starting => 0,
            Health::Healthy => 1,
            Health::Unhealthy => 2,
            Health::Stopped => 3,
            Health::Disconnected => 4,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Stopped => "stopped",
            Health::Disconnected => "disconnected",
        })
    }
}

/// Counters and gauges of one pipeline, readable while it runs.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) records_in: AtomicU64,
    pub(crate) records_out: AtomicU64,
    pub(crate) records_acked: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) shed: AtomicU64,
    pub(crate) dedup_hits: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) throttles: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) rebalances: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) peak_partition_in_flight: AtomicU64,
    pub(crate) buffer_bytes: AtomicU64,
    pub(crate) peak_buffer_bytes: AtomicU64,
    pub(crate) concurrency: AtomicU64,
    pub(crate) peak_batches_in_flight: AtomicU64,
    pub(crate) lag: AtomicU64,
    /// Lag rate of change in milli-units per second (signed).
    pub(crate) lag_rate_milli: AtomicI64,
    pub(crate) health: AtomicU8,
    /// The last temporary error of the checkpoint store, while it lasts.
    pub(crate) store_failure: std::sync::Mutex<Option<String>>,
    /// Why the source cannot reach its broker, while it cannot: (endpoint, cause).
    pub(crate) source_failure: std::sync::Mutex<Option<(String, String)>>,
    /// Every owned partition, refreshed four times a second.
    pub(crate) partitions: std::sync::Mutex<Vec<PartitionStatus>>,
}

/// Why a pipeline is not ready; see [`Stats::readiness`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NotReady {
    /// The partition concerned, or none for the whole pipeline.
    pub partition: Option<String>,
    /// `stalled`, `stopped reading`, `sink failing`, `source disconnected`, `store failing`,
    /// `starting` or `stopped`.
    pub reason: &'static str,
    /// What was seen (lag, the endpoint and the client's cause).
    pub detail: String,
}

/// One owned partition as the runtime sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: String,
    /// The last checkpoint written (inclusive position), if any.
    pub checkpoint: Option<String>,
    /// Distance from the committed position to the partition's end, as the broker's own tools
    /// count it: `source_lag` plus `uncommitted` (in records; for a source reporting lag in
    /// milliseconds, `source_lag` alone).
    pub lag: Option<u64>,
    /// `records` or `millis`.
    pub lag_unit: &'static str,
    /// How long ago the partition's end stood where its committed position stands now
    /// (interpolated from the samples of the lag window; for a source reporting lag in
    /// milliseconds, that reading).
    pub lag_seconds: Option<f64>,
    /// What the source has not delivered yet (its last reading).
    pub source_lag: Option<u64>,
    /// Records received and not covered by a written checkpoint yet (in flight, or confirmed
    /// and waiting for the next checkpoint).
    pub uncommitted: u64,
    /// Records received and not settled yet.
    pub in_flight: u64,
    /// Rate of change of `lag` per second over the lag window (positive: falling behind).
    pub lag_rate: f64,
    /// Seconds until `lag` reaches 0 at the current drain rate; `None` while it does not shrink.
    pub catch_up_seconds: Option<f64>,
    /// OK / WARN / STALL / STOP / REWIND.
    pub status: crate::PartitionState,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Records received from the source.
    pub records_in: u64,
    /// Records confirmed by the sink.
    pub records_out: u64,
    /// Records settled (confirmed, dead-lettered, shed or skipped as duplicates).
    pub records_acked: u64,
    /// Records sent to the dead-letter destination.
    pub dead_lettered: u64,
    /// Records dropped by an overflow policy.
    pub shed: u64,
    /// Records skipped because their idempotency key was already marked.
    pub dedup_hits: u64,
    /// Sink write retries.
    pub retries: u64,
    /// Sink throttles met.
    pub throttles: u64,
    /// Checkpoint commits written.
    pub commits: u64,
    /// Assignments and revocations seen.
    pub rebalances: u64,
    /// Records received and not yet settled.
    pub in_flight: u64,
    /// Largest number of records one partition held at once.
    pub peak_partition_in_flight: u64,
    /// Bytes of records held now.
    pub buffer_bytes: u64,
    /// Most bytes held at once.
    pub peak_buffer_bytes: u64,
    /// Current sink concurrency limit.
    pub concurrency: u64,
    /// Most sink batches in flight at once.
    pub peak_batches_in_flight: u64,
    /// Source lag (sum over partitions, in the source's unit).
    pub lag: u64,
    /// Lag rate of change per second (positive: growing).
    pub lag_rate: f64,
    /// Health.
    pub health: Health,
}

impl Stats {
    /// Current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            records_in: l(&self.records_in),
            records_out: l(&self.records_out),
            records_acked: l(&self.records_acked),
            dead_lettered: l(&self.dead_lettered),
            shed: l(&self.shed),
            dedup_hits: l(&self.dedup_hits),
            retries: l(&self.retries),
            throttles: l(&self.throttles),
            commits: l(&self.commits),
            rebalances: l(&self.rebalances),
            in_flight: l(&self.in_flight),
            peak_partition_in_flight: l(&self.peak_partition_in_flight),
            buffer_bytes: l(&self.buffer_bytes),
            peak_buffer_bytes: l(&self.peak_buffer_bytes),
            concurrency: l(&self.concurrency),
            peak_batches_in_flight: l(&self.peak_batches_in_flight),
            lag: l(&self.lag),
            lag_rate: self.lag_rate_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            health: self.health(),
        }
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Why the checkpoint store cannot be reached, while it cannot.
    pub fn store_failure(&self) -> Option<String> {
        self.store_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every owned partition, as of the last refresh (four times a second).
    pub fn partitions(&self) -> Vec<PartitionStatus> {
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Progress: empty while records are acknowledged, or the source is idle with no lag;
    /// otherwise every reason the pipeline is not ready (a partition in `STALL` or `STOP`, a
    /// sink confirming nothing, an unreachable broker or store, starting, stopped).
    pub fn readiness(&self) -> Vec<NotReady> {
        let health = self.health();
        let mut reasons = Vec::new();
        let whole = |reason, detail: String| NotReady {
            partition: None,
            reason,
            detail,
        };
        if let Some((endpoint, cause)) = self.source_failure() {
            reasons.push(whole("source disconnected", format!("{endpoint}: {cause}")));
        }
        if let Some(cause) = self.store_failure() {
            reasons.push(whole("store failing", cause));
        }
        match health {
            Health::Starting => {
                reasons.push(whole("starting", "the source is being opened".into()))
            }
            Health::Stopped => reasons.push(whole("stopped", "the pipeline has ended".into())),
            _ => {}
        }
        for p in self.partitions() {
            let (reason, what) = match p.status {
                crate::PartitionState::Stall => (
                    "stalled",
                    format!(
                        "{} records wait for the sink or the checkpoint store",
                        p.uncommitted
                    ),
                ),
                crate::PartitionState::Stop => {
                    ("stopped reading", "the source delivers nothing".to_string())
                }
                _ => continue,
            };
            reasons.push(NotReady {
                detail: format!(
                    "lag {} {}; {what}, and nothing was committed within the stall window",
                    p.lag.unwrap_or(0),
                    p.lag_unit
                ),
                partition: Some(p.partition),
                reason,
            });
        }
        if health == Health::Unhealthy && reasons.is_empty() {
            reasons.push(whole(
                "sink failing",
                "records wait and none was acknowledged within the stall window".into(),
            ));
        }
        reasons
    }

    /// Why the source cannot reach its broker, while it cannot: (endpoint, cause).
    pub fn source_failure(&self) -> Option<(String, String)> {
        self.source_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_source_failure(&self, failure: Option<(String, String)>) {
        *self
            .source_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = failure;
    }

    pub(crate) fn set_partitions(&self, partitions: Vec<PartitionStatus>) {
        *self
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = partitions;
    }

    pub(crate) fn set_store_failure(&self, failure: Option<String>) {
        *self
            .store_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = failure;
    }

    pub(crate) fn set_health(&self, h: Health) {
        self.health.store(h.as_u8(), Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn peak(counter: &AtomicU64, value: u64) {
        counter.fetch_max(value, Ordering::Relaxed);
    }
}

/// What a finished run did.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    /// The pipeline's name.
    pub pipeline: String,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Final statistics.
    pub stats: StatsSnapshot,
    /// The last checkpoints written, per partition.
    pub checkpoints: Vec<flowgate_core::Checkpoint>,
    /// Whether the drain finished before the drain timeout.
    pub drained: bool,
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "pipeline {} ran {:.1}s{}",
            self.pipeline,
            secs,
            if self.drained {
                ""
            } else {
                " (drain timed out)"
            }
        )?;
        writeln!(
            f,
            "  in {} ({:.0}/s), out {} ({:.0}/s), dead-lettered {}, shed {}, dedup hits {}",
            s.records_in,
            s.records_in as f64 / secs,
            s.records_out,
            s.records_out as f64 / secs,
            s.dead_lettered,
            s.shed,
            s.dedup_hits
        )?;
        writeln!(
            f,
            "  retries {}, throttles {}, commits {}, rebalances {}, peak buffer {} KiB, peak in-flight/partition {}",
            s.retries,
            s.throttles,
            s.commits,
            s.rebalances,
            s.peak_buffer_bytes / 1024,
            s.peak_partition_in_flight
        )?;
        let mut cps: Vec<_> = self
            .checkpoints
            .iter()
            .map(|c| format!("{}@{}", c.partition, c.position))
            .collect();
        cps.sort();
        write!(
            f,
            "  checkpoints: {}",
            if cps.is_empty() {
                "none".to_string()
            } else {
                cps.join(", ")
            }
        )
    }
}
