//! The one backoff of flowgate: exponential delays with jitter (on `backon`), bounded by a
//! number of attempts and a time budget. The runtime's sink retries, the stores' reconnects
//! and the adapters' reconnects and re-reads all wait with it, so every retry in flowgate
//! grows, caps and gives up the same way.
//!
//! ```
//! use std::time::Duration;
//! use flowgate_core::retry::BackoffPolicy;
//!
//! let policy = BackoffPolicy::new(Duration::from_millis(50), Duration::from_secs(2))
//!     .with_give_up_after(Duration::from_secs(30));
//! let mut backoff = policy.start();
//! let first = backoff.next_delay().expect("within the budget");
//! assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
//! ```

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::Error;

/// How a retry waits: the first delay, doubling up to `max`, with up to as much again of
/// random jitter (so that clients cut off together do not return together), until
/// `max_attempts` retries or `give_up_after` since the start are spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay (before jitter).
    pub max: Duration,
    /// Most retries (attempts after the first); `None`: no limit but the time budget.
    pub max_attempts: Option<usize>,
    /// No retry may start later than this after the first attempt; `None`: no time budget.
    pub give_up_after: Option<Duration>,
    /// Random jitter of up to the delay itself (on by default).
    pub jitter: bool,
}

impl BackoffPolicy {
    /// `initial` doubling to `max`, with jitter, no limit.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        BackoffPolicy {
            initial,
            max,
            max_attempts: None,
            give_up_after: None,
            jitter: true,
        }
    }

    /// At most `n` retries.
    pub const fn with_max_attempts(mut self, n: usize) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// No retry starting later than `budget` after the first attempt.
    pub const fn with_give_up_after(mut self, budget: Duration) -> Self {
        self.give_up_after = Some(budget);
        self
    }

    /// Without jitter (exact delays: tests, and waits that must not grow).
    pub const fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// A fresh sequence of delays, its time budget counted from now.
    pub fn start(&self) -> Backoff {
        Backoff {
            policy: *self,
            delays: self.delays(),
            started: Instant::now(),
            attempts: 0,
        }
    }

    fn delays(&self) -> ExponentialBackoff {
        let mut b = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0);
        b = match self.max_attempts {
            Some(n) => b.with_max_times(n),
            None => b.without_max_times(),
        };
        if self.jitter {
            b = b.with_jitter();
        }
        b.build()
    }
}

/// One sequence of retries under a [`BackoffPolicy`].
#[derive(Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    delays: ExponentialBackoff,
    started: Instant,
    attempts: usize,
}

impl Backoff {
    /// How long to wait before the next attempt, or `None` when the attempts or the time
    /// budget are spent (a wait that would end past the budget is not started).
    pub fn next_delay(&mut self) -> Option<Duration> {
        let delay = self.delays.next()?;
        if let Some(budget) = self.policy.give_up_after {
            if self.started.elapsed() + delay > budget {
                return None;
            }
        }
        self.attempts += 1;
        Some(delay)
    }

    /// How long to wait after `err`. When it says (`retry_after`: a throttling broker knows
    /// when it has room again, and a wait grown by earlier refusals would idle the sink long
    /// after), its wait, at least the policy's first delay; such a wait neither grows the
    /// next delays nor spends `max_attempts`, only the time budget. Otherwise the next
    /// exponential delay. `None` when the attempts or the time budget are spent.
    pub fn delay_after(&mut self, err: &Error) -> Option<Duration> {
        let Some(asked) = err.retry_after() else {
            return self.next_delay();
        };
        let wait = asked.max(self.policy.initial);
        if let Some(budget) = self.policy.give_up_after {
            if self.started.elapsed() + wait > budget {
                return None;
            }
        }
        self.attempts += 1;
        Some(wait)
    }

    /// Starts over (after a success): the next delay is the first again, and the budget is
    /// counted from now.
    pub fn reset(&mut self) {
        *self = self.policy.start();
    }

    /// Retries so far.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// Time since the first attempt.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_then_stop_at_the_attempts() {
        let policy = BackoffPolicy::new(Duration::from_millis(100), Duration::from_millis(500))
            .with_max_attempts(5)
            .without_jitter();
        let mut b = policy.start();
        let got: Vec<u128> = std::iter::from_fn(|| b.next_delay())
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert_eq!(b.next_delay(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn a_throttle_that_says_when_is_retried_then_however_many_came_before() {
        let policy = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(5))
            .with_max_attempts(10)
            .without_jitter();
        let mut b = policy.start();
        let plain = Error::transient("refused");
        let hinted = Error::throttled("slow down").with_retry_after(Duration::from_millis(20));
        for _ in 0..5 {
            b.delay_after(&plain);
        }
        let grown = b.delay_after(&plain).unwrap_or_default();
        assert!(grown >= Duration::from_millis(3_200), "{grown:?}");
        assert_eq!(
            b.delay_after(&hinted),
            Some(Duration::from_millis(100)),
            "the hint, at least the first delay"
        );
        for _ in 0..20 {
            assert!(
                b.delay_after(&hinted).is_some(),
                "hinted waits spend no attempts"
            );
        }
        let after = b.delay_after(&plain).unwrap_or_default();
        assert!(
            after >= Duration::from_millis(5_000),
            "{after:?}: not grown by hints"
        );
        assert_eq!(b.attempts(), 28);
    }

    #[test]
    fn jitter_stays_within_one_delay() {
        let policy = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..50 {
            let d = policy.start().next_delay().unwrap();
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn no_wait_starts_that_would_end_past_the_budget() {
        let policy = BackoffPolicy::new(Duration::from_millis(30), Duration::from_millis(30))
            .with_give_up_after(Duration::from_millis(50))
            .without_jitter();
        let mut b = policy.start();
        assert_eq!(b.next_delay(), Some(Duration::from_millis(30)));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            b.next_delay(),
            None,
            "30 ms more would end at 60 ms > 50 ms"
        );
    }
}
