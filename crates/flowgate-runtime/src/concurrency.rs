//! Adaptive sink concurrency: additive increase, multiplicative decrease (AIMD).

use std::time::{Duration, Instant};

use crate::settings::{ConcurrencyMode, ConcurrencySettings};

/// The concurrency limit of the sink, adjusted after every batch.
///
/// - A batch that succeeds within the latency target adds `1 / limit` (one per round of
///   `limit` batches: additive increase).
/// - A throttle or a batch over the latency target multiplies the limit by
///   `decrease_factor`, at most once per latency target period (so one burst of throttled
///   batches halves the limit once, not to the floor).
/// - The limit always stays within `[min, max]`.
#[derive(Debug, Clone)]
pub(crate) struct Concurrency {
    limit: f64,
    min: f64,
    max: f64,
    adaptive: bool,
    target: Duration,
    factor: f64,
    last_decrease: Option<Instant>,
}

impl Concurrency {
    pub(crate) fn new(s: &ConcurrencySettings) -> Self {
        Concurrency {
            limit: s.initial as f64,
            min: s.min as f64,
            max: s.max as f64,
            adaptive: s.mode == ConcurrencyMode::Adaptive,
            target: s.latency_target,
            factor: s.decrease_factor,
            last_decrease: None,
        }
    }

    /// Batches allowed in flight.
    pub(crate) fn limit(&self) -> usize {
        self.limit.floor().max(1.0) as usize
    }

    /// Reports a finished batch: its latency and whether it met throttling.
    pub(crate) fn on_batch(&mut self, latency: Duration, throttled: bool, now: Instant) {
        if !self.adaptive {
            return;
        }
        if throttled || latency > self.target {
            let recently = self
                .last_decrease
                .is_some_and(|t| now.duration_since(t) < self.target);
            if !recently {
                self.limit = (self.limit * self.factor).max(self.min);
                self.last_decrease = Some(now);
            }
        } else {
            self.limit = (self.limit + 1.0 / self.limit).min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(initial: usize, min: usize, max: usize) -> ConcurrencySettings {
        ConcurrencySettings {
            initial,
            min,
            max,
            latency_target: Duration::from_millis(100),
            ..Default::default()
        }
    }

    #[test]
    fn throttles_halve_once_per_period_and_successes_climb_back() {
        let t0 = Instant::now();
        let mut c = Concurrency::new(&settings(32, 1, 64));
        c.on_batch(Duration::from_millis(1), true, t0);
        assert_eq!(c.limit(), 16);
        c.on_batch(
            Duration::from_millis(1),
            true,
            t0 + Duration::from_millis(10),
        );
        assert_eq!(c.limit(), 16, "one burst decreases once");
        c.on_batch(
            Duration::from_millis(1),
            true,
            t0 + Duration::from_millis(200),
        );
        assert_eq!(c.limit(), 8);
        for i in 0..200 {
            c.on_batch(
                Duration::from_millis(1),
                false,
                t0 + Duration::from_millis(300 + i),
            );
        }
        assert!(c.limit() > 8);
    }

    proptest! {
        /// The limit never leaves [min, max]; successes never lower it; throttles never raise it.
        #[test]
        fn limit_stays_in_bounds(
            min in 1usize..8, span in 0usize..64,
            events in proptest::collection::vec((0u64..400, any::<bool>(), 0u64..50), 1..300),
        ) {
            let max = min + span;
            let mut c = Concurrency::new(&settings(min + span / 2, min, max));
            let mut now = Instant::now();
            for (lat, throttled, dt) in events {
                now += Duration::from_millis(dt);
                let before = c.limit;
                c.on_batch(Duration::from_millis(lat), throttled, now);
                prop_assert!(c.limit() >= min && c.limit() <= max);
                if throttled || lat > 100 { prop_assert!(c.limit <= before); } else { prop_assert!(c.limit >= before); }
            }
        }
    }
}
