//! Lag: the source's readings, and what each partition's status and gauges say about them.

use std::sync::atomic::Ordering;
use std::time::Instant;

use flowgate_core::{LagSample, LagUnit};

use crate::progress::Sample;
use crate::stats::PartitionStatus;

use super::*;

impl State {
    pub(super) fn on_lag(&mut self, samples: Vec<LagSample>) {
        for s in samples {
            if let Some(part) = self.partitions.get_mut(&s.partition) {
                part.lag = Some(s.lag);
            }
        }
    }

    /// The source's own lag readings, summed (what it has not delivered yet).
    pub(super) fn source_lag(&self) -> u64 {
        self.partitions.values().filter_map(|p| p.lag).sum()
    }

    /// Refreshes the per-partition view (`Stats::partitions`, `/status`), the per-partition
    /// gauges and the pipeline's lag: the distance from the committed position to the end.
    /// Adds a progress sample per partition once a second.
    pub(super) fn publish_partitions(&mut self, now: Instant) {
        let millis = matches!(self.caps.lag_unit, Some(LagUnit::Millis));
        let sample = now.duration_since(self.last_sample_at) >= PROGRESS_SAMPLE_EVERY;
        if sample {
            self.last_sample_at = now;
        }
        let mut total = 0u64;
        let mut total_rate = 0.0;
        let mut view = Vec::with_capacity(self.order.len());
        for id in &self.order {
            let Some(part) = self.partitions.get_mut(id) else {
                continue;
            };
            let source_lag = part.lag;
            let uncommitted = part.uncommitted();
            let lag = if millis {
                source_lag
            } else {
                Some(source_lag.unwrap_or(0) + uncommitted)
            };
            if sample {
                let received = part.tracker.prefix_end() + part.tracker.pending() as u64;
                part.progress.push(Sample {
                    at: now,
                    lag: lag.unwrap_or(0),
                    end: received + if millis { 0 } else { source_lag.unwrap_or(0) },
                    committed: part.committed_seq,
                    waiting: uncommitted,
                });
            }
            let lag_rate = part.progress.rate();
            let status = part.progress.status(now);
            let catch_up_seconds = part.progress.catch_up_seconds();
            let lag_seconds = if millis {
                lag.map(|ms| ms as f64 / 1000.0)
            } else {
                part.progress.lag_seconds(now)
            };
            if let Some(m) = &part.metrics {
                if let Some(l) = lag {
                    m.lag.set(l as f64);
                }
                m.lag_rate.set(lag_rate);
                m.lag_seconds.set(lag_seconds.unwrap_or(0.0));
                m.catch_up.set(catch_up_seconds.unwrap_or(f64::INFINITY));
                m.status.set(f64::from(status.code()));
            }
            total += lag.unwrap_or(0);
            total_rate += lag_rate;
            view.push(PartitionStatus {
                partition: id.to_string(),
                checkpoint: self.committed.get(id).map(|c| c.position.to_string()),
                lag,
                lag_unit: if millis { "millis" } else { "records" },
                lag_seconds,
                source_lag,
                uncommitted,
                in_flight: part.tracker.pending() as u64,
                lag_rate,
                catch_up_seconds,
                status,
            });
        }
        self.stats.lag.store(total, Ordering::Relaxed);
        self.stats
            .lag_rate_milli
            .store((total_rate * 1000.0) as i64, Ordering::Relaxed);
        self.stats.set_partitions(view);
    }
}
