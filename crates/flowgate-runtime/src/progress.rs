//! A partition's progress over a window of samples: lag rate of change, lag in seconds, a
//! catch-up estimate, and a status after Burrow's rules adapted to an in-process view.
//!
//! Each sample holds the partition's end and committed position, counted in records the
//! runtime numbered for this incarnation (the committed position is the last checkpoint
//! written; the end is what was received plus what the source still reports behind it), so
//! the rules are the same for Kafka offsets, Kinesis sequence numbers and RabbitMQ deliveries.
//!
//! - **Lag in seconds** interpolates the time at which the end stood where the committed
//!   position stands now (kafka-lag-exporter's method): the error is at most one sample
//!   interval while the committed position is inside the window; beyond it, the end's growth
//!   rate over the window extrapolates, and with no growth the window's span is a lower bound.
//! - **Status**: `REWIND` the partition was started before the broker's committed position
//!   (records are read again) within the window; `OK` no lag; `STOP` lagging, nothing committed
//!   for the stall window and nothing received to work on (the source delivers nothing);
//!   `STALL` lagging, nothing committed for the stall window while records wait for the sink
//!   or the store; `WARN` the lag never fell over the window (each quarter's mean above the
//!   previous quarter's); `OK` else.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What a partition is doing (Burrow's statuses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PartitionState {
    /// Keeping up, or catching up.
    #[default]
    Ok,
    /// The lag never fell over the window: the partition falls behind while it progresses.
    Warn,
    /// Lagging, and nothing committed for the stall window although records wait to be
    /// confirmed (a stuck sink or checkpoint store).
    Stall,
    /// Lagging, and nothing committed for the stall window with nothing received to work on
    /// (the source stopped delivering this partition).
    Stop,
    /// Started before the broker's committed position within the window: records are read
    /// again.
    Rewind,
}

impl PartitionState {
    /// The value of the `flowgate_partition_status` gauge: 0 OK, 1 WARN, 2 STALL, 3 STOP,
    /// 4 REWIND.
    pub fn code(self) -> u8 {
        match self {
            PartitionState::Ok => 0,
            PartitionState::Warn => 1,
            PartitionState::Stall => 2,
            PartitionState::Stop => 3,
            PartitionState::Rewind => 4,
        }
    }
}

impl std::fmt::Display for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PartitionState::Ok => "OK",
            PartitionState::Warn => "WARN",
            PartitionState::Stall => "STALL",
            PartitionState::Stop => "STOP",
            PartitionState::Rewind => "REWIND",
        })
    }
}

/// One reading of a partition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sample {
    pub(crate) at: Instant,
    /// Lag as reported (records, or milliseconds for a source reporting time).
    pub(crate) lag: u64,
    /// Received plus still behind at the source, in the incarnation's record numbering.
    pub(crate) end: u64,
    /// Covered by the last checkpoint written, same numbering.
    pub(crate) committed: u64,
    /// Received and not yet covered by a checkpoint.
    pub(crate) waiting: u64,
}

/// The samples of one partition within the window.
#[derive(Debug)]
pub(crate) struct ProgressWindow {
    span: Duration,
    stall: Duration,
    samples: VecDeque<Sample>,
    /// When the committed position last moved (or the window started).
    committed_moved_at: Option<Instant>,
    rewound_at: Option<Instant>,
}

/// The shortest stretch of samples the rate and `WARN` are judged on.
const MIN_SPAN: Duration = Duration::from_secs(5);

impl ProgressWindow {
    /// A window of `span` (rate of change, `WARN`); `stall` judges `STALL` and `STOP`.
    pub(crate) fn new(span: Duration, stall: Duration) -> Self {
        ProgressWindow {
            span,
            stall,
            samples: VecDeque::new(),
            committed_moved_at: None,
            rewound_at: None,
        }
    }

    /// Records that the partition starts before the broker's committed position.
    pub(crate) fn rewound(&mut self, at: Instant) {
        self.rewound_at = Some(at);
    }

    /// Adds a sample and forgets those older than the window (one older sample is kept so the
    /// window is always covered).
    pub(crate) fn push(&mut self, s: Sample) {
        match self.samples.back() {
            Some(last) if last.committed == s.committed => {}
            _ => self.committed_moved_at = Some(s.at),
        }
        self.samples.push_back(s);
        while self.samples.len() > 2 && s.at.duration_since(self.samples[1].at) >= self.span {
            self.samples.pop_front();
        }
    }

    fn covered(&self) -> Option<(&Sample, &Sample, f64)> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let dt = last.at.duration_since(first.at);
        (dt >= MIN_SPAN.min(self.span)).then_some((first, last, dt.as_secs_f64()))
    }

    /// Lag change per second over the window (positive: falling behind); 0 until the window
    /// covers a few seconds.
    pub(crate) fn rate(&self) -> f64 {
        match self.covered() {
            Some((first, last, dt)) => (last.lag as f64 - first.lag as f64) / dt,
            None => 0.0,
        }
    }

    /// Seconds until the lag reaches 0 at the window's net drain rate: `Some(0)` with no lag,
    /// `None` while it does not shrink ("falling behind").
    pub(crate) fn catch_up_seconds(&self) -> Option<f64> {
        let last = self.samples.back()?;
        if last.lag == 0 {
            return Some(0.0);
        }
        let rate = self.rate();
        (rate < 0.0).then(|| last.lag as f64 / -rate)
    }

    /// How long ago the partition's end stood where its committed position stands now.
    pub(crate) fn lag_seconds(&self, now: Instant) -> Option<f64> {
        let last = self.samples.back()?;
        if last.committed >= last.end {
            return Some(0.0);
        }
        let target = last.committed;
        // Newest to oldest: the first pair whose ends bracket the committed position.
        let mut newer = last;
        for older in self.samples.iter().rev().skip(1) {
            if older.end <= target {
                let span = newer.end.saturating_sub(older.end) as f64;
                let frac = if span > 0.0 {
                    (target - older.end) as f64 / span
                } else {
                    1.0
                };
                let dt = newer.at.duration_since(older.at).as_secs_f64();
                let at = older.at + Duration::from_secs_f64(dt * frac);
                return Some(now.saturating_duration_since(at).as_secs_f64());
            }
            newer = older;
        }
        // Older than the window: extrapolate at the end's growth rate over the window.
        let oldest = self.samples.front()?;
        let before = now.saturating_duration_since(oldest.at).as_secs_f64();
        let dt = last.at.duration_since(oldest.at).as_secs_f64();
        let growth = last.end.saturating_sub(oldest.end) as f64;
        let missing = oldest.end.saturating_sub(target) as f64;
        if dt > 0.0 && growth > 0.0 {
            Some(before + missing / (growth / dt))
        } else {
            Some(before)
        }
    }

    /// Lag never fell over the window, judged quarter by quarter: each quarter's mean lag is
    /// above the previous one's (samples within a quarter rise and fall with each checkpoint,
    /// so sample-by-sample the rule would never hold).
    fn rising(&self) -> bool {
        let Some((first, last, span)) = self.covered() else {
            return false;
        };
        let mut sums = [(0f64, 0u32); 4];
        for s in &self.samples {
            let at = s.at.duration_since(first.at).as_secs_f64() / span;
            let q = ((at * 4.0) as usize).min(3);
            sums[q].0 += s.lag as f64;
            sums[q].1 += 1;
        }
        let means: Vec<f64> = sums
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(sum, n)| sum / f64::from(*n))
            .collect();
        means.len() >= 3 && means.windows(2).all(|w| w[1] > w[0]) && last.lag > first.lag
    }

    /// The partition's status at `now`.
    pub(crate) fn status(&self, now: Instant) -> PartitionState {
        if self
            .rewound_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.span)
        {
            return PartitionState::Rewind;
        }
        let Some(last) = self.samples.back() else {
            return PartitionState::Ok;
        };
        if last.lag == 0 && last.waiting == 0 {
            return PartitionState::Ok;
        }
        let still = self
            .committed_moved_at
            .is_some_and(|at| now.saturating_duration_since(at) >= self.stall);
        if still {
            return if last.waiting > 0 {
                PartitionState::Stall
            } else {
                PartitionState::Stop
            };
        }
        if self.rising() {
            return PartitionState::Warn;
        }
        PartitionState::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(t0: Instant, secs: u64, lag: u64, end: u64, committed: u64) -> Sample {
        Sample {
            at: t0 + Duration::from_secs(secs),
            lag,
            end,
            committed,
            waiting: 0,
        }
    }

    fn window() -> ProgressWindow {
        ProgressWindow::new(Duration::from_secs(60), Duration::from_secs(30))
    }

    #[test]
    fn an_idle_partition_with_no_lag_is_ok_forever() {
        let t0 = Instant::now();
        let mut w = window();
        for s in 0..300 {
            w.push(sample(t0, s, 0, 100, 100));
        }
        assert_eq!(w.status(t0 + Duration::from_secs(300)), PartitionState::Ok);
        assert_eq!(w.lag_seconds(t0 + Duration::from_secs(300)), Some(0.0));
        assert_eq!(w.catch_up_seconds(), Some(0.0));
    }

    #[test]
    fn a_sink_that_confirms_nothing_stalls_the_partition() {
        let t0 = Instant::now();
        let mut w = window();
        for s in 0..=31 {
            // 100 records/s arrive, nothing is committed after 1,000.
            let mut x = sample(t0, s, 100 * s, 1_000 + 100 * s, 1_000);
            x.waiting = 100 * s;
            w.push(x);
        }
        assert_eq!(
            w.status(t0 + Duration::from_secs(31)),
            PartitionState::Stall
        );
        // The end stood at 1,000 at t0: the lag is 31 s old.
        let secs = w.lag_seconds(t0 + Duration::from_secs(31)).unwrap();
        assert!((secs - 31.0).abs() < 1e-6, "{secs}");
        assert_eq!(w.catch_up_seconds(), None);
    }

    #[test]
    fn lagging_with_nothing_received_is_stop() {
        let t0 = Instant::now();
        let mut w = window();
        for s in 0..=31 {
            w.push(sample(t0, s, 500, 1_500, 1_000));
        }
        assert_eq!(w.status(t0 + Duration::from_secs(31)), PartitionState::Stop);
    }

    #[test]
    fn lag_that_never_falls_while_commits_move_is_warn() {
        let t0 = Instant::now();
        let mut w = window();
        for s in 0..=10 {
            // 200 records/s in, 100 committed/s.
            w.push(sample(t0, s, 100 * s, 200 * s, 100 * s));
        }
        assert_eq!(w.status(t0 + Duration::from_secs(10)), PartitionState::Warn);
        assert!((w.rate() - 100.0).abs() < 1e-6);
        // Committed 1,000 = the end at 5 s: 5 s behind.
        let secs = w.lag_seconds(t0 + Duration::from_secs(10)).unwrap();
        assert!((secs - 5.0).abs() < 1e-6, "{secs}");
        // Catching up for a while: no longer WARN.
        for s in 11..=16 {
            w.push(sample(
                t0,
                s,
                1_000 - 150 * (s - 10),
                2_000,
                1_000 + 150 * (s - 10),
            ));
        }
        assert_eq!(w.status(t0 + Duration::from_secs(16)), PartitionState::Ok);
    }

    #[test]
    fn a_sawtooth_that_climbs_is_warn() {
        let t0 = Instant::now();
        let mut w = window();
        for s in 0..=40 {
            // Each checkpoint takes 300 off, every second 200 more arrive than are confirmed.
            let lag = 100 * s + if s % 2 == 0 { 300 } else { 0 };
            w.push(sample(t0, s, lag, 1_000 + 200 * s, 1_000 + 200 * s - lag));
        }
        assert_eq!(w.status(t0 + Duration::from_secs(40)), PartitionState::Warn);
    }

    #[test]
    fn catching_up_estimates_the_time_left() {
        let t0 = Instant::now();
        let mut w = window();
        for s in 0..=10 {
            w.push(sample(t0, s, 2_000 - 100 * s, 10_000, 8_000 + 100 * s));
        }
        assert_eq!(w.status(t0 + Duration::from_secs(10)), PartitionState::Ok);
        let eta = w.catch_up_seconds().unwrap();
        assert!((eta - 10.0).abs() < 1e-6, "{eta}");
    }

    #[test]
    fn a_rewind_shows_for_the_window() {
        let t0 = Instant::now();
        let mut w = window();
        w.rewound(t0);
        w.push(sample(t0, 0, 10, 10, 0));
        assert_eq!(
            w.status(t0 + Duration::from_secs(59)),
            PartitionState::Rewind
        );
        w.push(sample(t0, 61, 0, 10, 10));
        assert_eq!(w.status(t0 + Duration::from_secs(61)), PartitionState::Ok);
    }

    #[test]
    fn lag_older_than_the_window_is_extrapolated() {
        let t0 = Instant::now();
        let mut w = ProgressWindow::new(Duration::from_secs(10), Duration::from_secs(30));
        for s in 100..=130 {
            // 10 records/s arrive; committed stuck at 0, which the end passed at t0.
            w.push(sample(t0, s, 10 * s, 10 * s, 0));
        }
        let secs = w.lag_seconds(t0 + Duration::from_secs(130)).unwrap();
        assert!((secs - 130.0).abs() < 1.0, "{secs}");
    }

    proptest! {
        /// Whatever the readings, lag seconds are finite and not negative, a partition with
        /// no lag and nothing waiting is OK, and the window never grows past its span.
        #[test]
        fn readings_keep_the_window_sane(steps in proptest::collection::vec((0u64..5_000, 0u64..100, 0u64..100, 0u64..50), 1..200)) {
            let t0 = Instant::now();
            let mut w = window();
            let (mut end, mut committed, mut t) = (0u64, 0u64, 0u64);
            for (dt_ms, grow, commit, waiting) in steps {
                t += dt_ms;
                end += grow;
                committed = (committed + commit).min(end);
                let at = t0 + Duration::from_millis(t);
                w.push(Sample { at, lag: end - committed, end, committed, waiting });
                let secs = w.lag_seconds(at).unwrap();
                prop_assert!(secs.is_finite() && secs >= 0.0);
                if end == committed && waiting == 0 {
                    prop_assert_eq!(w.status(at), PartitionState::Ok);
                    prop_assert_eq!(secs, 0.0);
                }
                if w.samples.len() > 2 {
                    prop_assert!(at.duration_since(w.samples[1].at) < Duration::from_secs(60));
                }
            }
        }
    }
}
