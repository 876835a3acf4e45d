use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::{Error, Record, Sink, SinkCapabilities, TxContext, WriteError};
use serde::{Deserialize, Serialize};

/// What a [`FaultInjectingSink`] does to the writes it wraps. Every fault is off by default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Fixed latency per write call.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// A shared resource that processes this many records per second, one write at a time
    /// (a slow database): throughput is capped whatever the concurrency.
    pub capacity_per_sec: Option<f64>,
    /// Rate limit (records per second, token bucket of one second): writes over it fail with
    /// a `Throttled` error carrying `retry_after`.
    pub throttle_above_per_sec: Option<f64>,
    /// Probability that a write call fails with a transient error.
    pub transient_failure_rate: f64,
    /// Records whose payload starts with this are refused as poison.
    pub poison_prefix: Option<String>,
    /// From this long after creation, every write waits …
    #[serde(with = "humantime_serde::option")]
    pub stall_after: Option<Duration>,
    /// … until this much later (a stalled sink that recovers).
    #[serde(with = "humantime_serde")]
    pub stall_for: Duration,
    /// Seed of the failure dice. Default 0.
    pub seed: u64,
}

/// Wraps a sink and injects latency, limited capacity, throttling, transient failures, stalls
/// and poison records, to reproduce the failure scenarios without a broker.
pub struct FaultInjectingSink<S> {
    inner: S,
    cfg: FaultConfig,
    created: Instant,
    rng: Mutex<fastrand::Rng>,
    bucket: Mutex<(f64, Instant)>,
    resource: tokio::sync::Mutex<()>,
    poison: Option<Bytes>,
}

impl<S: Sink> FaultInjectingSink<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, cfg: FaultConfig) -> Self {
        let tokens = cfg.throttle_above_per_sec.unwrap_or(0.0);
        FaultInjectingSink {
            inner,
            rng: Mutex::new(fastrand::Rng::with_seed(cfg.seed)),
            poison: cfg.poison_prefix.as_ref().map(|p| Bytes::from(p.clone())),
            cfg,
            created: Instant::now(),
            bucket: Mutex::new((tokens, Instant::now())),
            resource: tokio::sync::Mutex::new(()),
        }
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn before(&self, n: usize) -> Result<(), WriteError> {
        if let Some(after) = self.cfg.stall_after {
            let start = self.created + after;
            let end = start + self.cfg.stall_for;
            let now = Instant::now();
            if now >= start && now < end {
                tokio::time::sleep_until(end.into()).await;
            }
        }
        if !self.cfg.latency.is_zero() {
            tokio::time::sleep(self.cfg.latency).await;
        }
        if let Some(rate) = self.cfg.throttle_above_per_sec {
            let mut b = self
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(rate.max(n as f64));
            b.1 = now;
            if b.0 < n as f64 {
                let wait = Duration::from_secs_f64((n as f64 - b.0) / rate);
                return Err(WriteError::Batch(
                    Error::throttled("injected rate limit").with_retry_after(wait),
                ));
            }
            b.0 -= n as f64;
        }
        if self.cfg.transient_failure_rate > 0.0 {
            let roll = self
                .rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .f64();
            if roll < self.cfg.transient_failure_rate {
                return Err(WriteError::Batch(Error::transient(
                    "injected transient failure",
                )));
            }
        }
        if let Some(cap) = self.cfg.capacity_per_sec {
            let _busy = self.resource.lock().await;
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / cap)).await;
        }
        Ok(())
    }

    fn split_poison(&self, batch: &[Record]) -> (Vec<Record>, Vec<(usize, Error)>) {
        let Some(prefix) = &self.poison else {
            return (batch.to_vec(), Vec::new());
        };
        let mut good = Vec::with_capacity(batch.len());
        let mut bad = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            if r.payload.starts_with(prefix) {
                bad.push((
                    i,
                    Error::poison("injected poison record: payload cannot be decoded"),
                ));
            } else {
                good.push(r.clone());
            }
        }
        (good, bad)
    }
}

#[async_trait]
impl<S: Sink> Sink for FaultInjectingSink<S> {
    fn capabilities(&self) -> SinkCapabilities {
        self.inner.capabilities()
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        self.before(batch.len()).await?;
        let (good, bad) = self.split_poison(batch);
        if bad.is_empty() {
            return self.inner.write(batch).await;
        }
        self.inner.write(&good).await?;
        Err(WriteError::Partial(bad))
    }

    async fn write_transactional(
        &self,
        batch: &[Record],
        tx: &TxContext<'_>,
    ) -> Result<(), WriteError> {
        self.before(batch.len()).await?;
        let (_, bad) = self.split_poison(batch);
        if !bad.is_empty() {
            // A transaction is all or nothing: refuse the batch; the runtime dead-letters the
            // poison records and writes the rest again.
            return Err(WriteError::Partial(bad));
        }
        self.inner.write_transactional(batch, tx).await
    }

    async fn flush(&self) -> Result<(), Error> {
        self.inner.flush().await
    }

    async fn check(&self) -> Result<bool, Error> {
        self.inner.check().await
    }

    async fn close(&self) -> Result<(), Error> {
        self.inner.close().await
    }
}
