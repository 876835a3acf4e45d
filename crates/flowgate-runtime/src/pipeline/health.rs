//! Health: progress, the source's connection, and the periodic tick.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flowgate_core::{Connection, Error};

use crate::stats::Health;

use super::*;

impl State {
    pub(super) fn on_connection(&mut self, c: Connection, now: Instant) {
        match c {
            Connection::Down { endpoint, cause } => {
                self.metrics.source_connected.set(0.0);
                match &mut self.health.disconnected {
                    Some(d) => {
                        self.stats
                            .set_source_failure(Some((endpoint.clone(), cause.clone())));
                        d.endpoint = endpoint;
                        d.cause = cause;
                    }
                    None => {
                        tracing::warn!(pipeline = %self.name, %endpoint, %cause,
                            timeout = ?self.settings.health.disconnect_timeout,
                            "the source cannot reach its broker; retrying");
                        self.stats
                            .set_source_failure(Some((endpoint.clone(), cause.clone())));
                        self.health.disconnected = Some(Disconnected {
                            endpoint,
                            cause,
                            since: now,
                            next_warning: now + Duration::from_secs(1),
                            warning_every: Duration::from_secs(1),
                        });
                    }
                }
            }
            Connection::Up => {
                self.metrics.source_connected.set(1.0);
                self.stats.set_source_failure(None);
                if let Some(d) = self.health.disconnected.take() {
                    tracing::info!(pipeline = %self.name, endpoint = %d.endpoint,
                        after = ?now.duration_since(d.since), "the source reaches its broker again");
                    // The outage is not a stall of the sink: progress is measured afresh.
                    self.health.last_progress_at = now;
                }
            }
        }
        self.on_tick(now);
    }

    /// Repeats the disconnection warning with a growing gap; fails the pipeline once the
    /// disconnection has lasted `health.disconnect_timeout`.
    pub(super) fn check_disconnected(&mut self, now: Instant) {
        let timeout = self.settings.health.disconnect_timeout;
        let Some(d) = &mut self.health.disconnected else {
            return;
        };
        let down_for = now.duration_since(d.since);
        if down_for >= timeout {
            let err = Error::fatal(format!(
                "the source could not reach its broker for {down_for:.0?}: {}",
                d.cause
            ))
            .with_context("endpoint", &d.endpoint)
            .with_hint(format!(
                "check that the broker at {} is running and reachable from here (address, port, TLS and credentials); `runtime.health.disconnect_timeout` ({timeout:?}) sets how long flowgate waits",
                d.endpoint
            ));
            if self.fatal.is_none() {
                self.fail(err);
            }
        } else if now >= d.next_warning {
            tracing::warn!(pipeline = %self.name, endpoint = %d.endpoint, cause = %d.cause,
                down_for = ?down_for, gives_up_in = ?(timeout - down_for),
                "the source still cannot reach its broker");
            d.warning_every = (d.warning_every * 2).min(MAX_DISCONNECT_WARNING_GAP);
            d.next_warning = now + d.warning_every;
        }
    }

    pub(super) fn on_tick(&mut self, now: Instant) {
        self.check_disconnected(now);
        let acked = self.stats.records_acked.load(Ordering::Relaxed);
        let in_flight = self.stats.in_flight.load(Ordering::Relaxed);
        let lag = self.source_lag() + in_flight;
        if acked != self.health.last_acked || lag == 0 {
            self.health.last_acked = acked;
            self.health.last_progress_at = now;
            self.health.lag_at_progress = lag;
        }
        let stalled =
            now.duration_since(self.health.last_progress_at) >= self.settings.health.stall_window;
        let growing = lag > self.health.lag_at_progress || in_flight > 0;
        let store_failure = self.stats.store_failure();
        match (&store_failure, self.health.store_down) {
            (Some(cause), false) => {
                tracing::warn!(pipeline = %self.name, store = self.store.as_ref().map(|s| s.describe()), %cause,
                    "the checkpoint store cannot be reached; retrying (records wait for their checkpoint)");
                self.health.store_down = true;
                self.metrics.store_connected.set(0.0);
            }
            (None, true) => {
                tracing::info!(pipeline = %self.name, "the checkpoint store answers again");
                self.health.store_down = false;
                self.metrics.store_connected.set(1.0);
            }
            _ => {}
        }
        let health = if self.health.disconnected.is_some() || store_failure.is_some() {
            Health::Disconnected
        } else if stalled && growing {
            Health::Unhealthy
        } else {
            Health::Healthy
        };
        if health != self.stats.health() && self.stats.health() != Health::Stopped {
            match health {
                Health::Unhealthy => {
                    tracing::warn!(pipeline = %self.name, lag, stalled_for = ?now.duration_since(self.health.last_progress_at), "unhealthy: lag grows and nothing is acknowledged")
                }
                Health::Disconnected => {}
                _ => {
                    tracing::info!(pipeline = %self.name, "healthy again: records are being acknowledged")
                }
            }
            self.stats.set_health(health);
        }
        self.metrics
            .healthy
            .set(if health == Health::Healthy { 1.0 } else { 0.0 });
        self.publish_partitions(now);
        let ready = health == Health::Healthy && self.stats.readiness().is_empty();
        self.metrics.ready.set(if ready { 1.0 } else { 0.0 });
    }
}

pub(super) struct HealthTracker {
    pub(super) last_acked: u64,
    pub(super) last_progress_at: Instant,
    pub(super) lag_at_progress: u64,
    /// Set while the source reports its broker unreachable.
    pub(super) disconnected: Option<Disconnected>,
    /// The checkpoint store's last answer was a temporary failure.
    pub(super) store_down: bool,
}

/// A source that cannot reach its broker: since when, and when to warn again.
pub(super) struct Disconnected {
    pub(super) endpoint: String,
    pub(super) cause: String,
    pub(super) since: Instant,
    pub(super) next_warning: Instant,
    pub(super) warning_every: Duration,
}

/// The longest gap between two warnings about the same disconnection.
pub(super) const MAX_DISCONNECT_WARNING_GAP: Duration = Duration::from_secs(30);

impl HealthTracker {
    pub(super) fn new() -> Self {
        HealthTracker {
            last_acked: 0,
            last_progress_at: Instant::now(),
            lag_at_progress: 0,
            disconnected: None,
            store_down: false,
        }
    }
}
