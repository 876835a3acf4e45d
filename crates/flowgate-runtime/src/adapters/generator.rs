use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::{
    Assignment, Checkpoint, CreditGrant, Error, LagSample, LagUnit, PartitionId, Position, Record,
    Source, SourceCapabilities, SourceContext, SourceEvent, StartPosition,
};
use serde::{Deserialize, Serialize};

/// A period during which the generator's rate is multiplied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spike {
    /// When it starts, from the generator's start.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// How long it lasts.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Rate multiplier (2.0 = twice the rate).
    pub factor: f64,
}

/// Settings of the [`GeneratorSource`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Partitions, named `{prefix}-{index}`. Default 4.
    pub partitions: u32,
    /// Partition name prefix. Default `gen`.
    pub prefix: String,
    /// Records per second over all partitions; `None` (default) means as fast as credit
    /// allows.
    pub rate: Option<f64>,
    /// Rate spikes.
    pub spikes: Vec<Spike>,
    /// Payload bytes per record: a JSON string of this size. Default 100.
    pub payload_size: usize,
    /// Stop after this many records per partition (positions `0..n`); `None` (default):
    /// endless.
    pub records_per_partition: Option<u64>,
    /// Distinct keys (deterministic from partition and position); 0 for no keys. Default 1024.
    pub key_cardinality: u64,
    /// Largest batch returned by one `next`. Default 1024.
    pub max_batch: usize,
    /// How often lag samples are emitted. Default 250 ms.
    #[serde(with = "humantime_serde")]
    pub lag_interval: Duration,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            partitions: 4,
            prefix: "gen".into(),
            rate: None,
            spikes: Vec::new(),
            payload_size: 100,
            records_per_partition: None,
            key_cardinality: 1024,
            max_batch: 1024,
            lag_interval: Duration::from_millis(250),
        }
    }
}

/// Deterministic record generator: position `n` of partition `p` always has the same key, so
/// a replay produces the same records. Lag is the backlog behind the rate schedule (or, for a
/// finite generator without a rate, the records not yet delivered).
pub struct GeneratorSource {
    cfg: GeneratorConfig,
    ids: Vec<PartitionId>,
    keys: Vec<Bytes>,
    payload: Bytes,
    ctx: Option<SourceContext>,
    grants: Vec<Option<CreditGrant>>,
    next: Vec<u64>,
    emitted_since_start: Vec<u64>,
    time_base: Option<Instant>,
    assigned_sent: bool,
    last_lag: Instant,
    rr: usize,
}

impl GeneratorSource {
    /// A generator; the error names the invalid setting.
    pub fn new(cfg: GeneratorConfig) -> Result<Self, Error> {
        let bad = |k: &str, why: &str| {
            Error::config(format!("invalid generator setting `{k}`: {why}")).with_context("key", k)
        };
        if cfg.partitions == 0 {
            return Err(bad("partitions", "must be at least 1"));
        }
        if cfg.max_batch == 0 {
            return Err(bad("max_batch", "must be at least 1"));
        }
        if let Some(r) = cfg.rate {
            if !(r > 0.0 && r.is_finite()) {
                return Err(bad(
                    "rate",
                    "must be a positive number of records per second",
                ));
            }
        }
        if cfg
            .spikes
            .iter()
            .any(|s| !(s.factor >= 0.0 && s.factor.is_finite()))
        {
            return Err(bad("spikes.factor", "must be a non-negative number"));
        }
        let n = cfg.partitions as usize;
        let ids = (0..n)
            .map(|i| PartitionId::new(format!("{}-{i}", cfg.prefix)))
            .collect();
        let keys = (0..cfg.key_cardinality)
            .map(|k| Bytes::from(format!("key-{k:06}")))
            .collect();
        // A JSON string of `payload_size` bytes (quotes included), so JSON sinks take it.
        let payload = Bytes::from(
            (0..cfg.payload_size)
                .map(|i| match i {
                    0 => b'"',
                    i if i + 1 == cfg.payload_size => b'"',
                    i => b'a' + (i % 26) as u8,
                })
                .collect::<Vec<u8>>(),
        );
        Ok(GeneratorSource {
            ids,
            keys,
            payload,
            ctx: None,
            grants: vec![None; n],
            next: vec![0; n],
            emitted_since_start: vec![0; n],
            time_base: None,
            assigned_sent: false,
            last_lag: Instant::now(),
            rr: 0,
            cfg,
        })
    }

    /// The partitions this generator produces.
    pub fn partitions(&self) -> &[PartitionId] {
        &self.ids
    }

    /// Records per partition due at `elapsed` since start, following the rate and spikes.
    fn due_per_partition(&self, elapsed: Duration) -> Option<f64> {
        let rate = self.cfg.rate? / f64::from(self.cfg.partitions);
        let t = elapsed.as_secs_f64();
        let mut extra = 0.0;
        for s in &self.cfg.spikes {
            let start = s.at.as_secs_f64();
            let end = start + s.duration.as_secs_f64();
            let overlap = (t.min(end) - start).max(0.0);
            extra += overlap * (s.factor - 1.0);
        }
        Some(rate * (t + extra).max(0.0))
    }

    fn remaining(&self, p: usize) -> u64 {
        self.cfg
            .records_per_partition
            .map_or(u64::MAX, |total| total.saturating_sub(self.next[p]))
    }

    fn lag_samples(&self, now: Instant) -> Vec<LagSample> {
        let due = self
            .time_base
            .and_then(|t| self.due_per_partition(now.duration_since(t)));
        (0..self.ids.len())
            .filter(|p| self.grants[*p].is_some())
            .map(|p| {
                let lag = match due {
                    Some(d) => ((d as u64).saturating_sub(self.emitted_since_start[p]))
                        .min(self.remaining(p)),
                    None => self.remaining(p).min(u64::MAX / 2),
                };
                LagSample {
                    partition: self.ids[p].clone(),
                    lag: if lag == u64::MAX / 2 { 0 } else { lag },
                    unit: LagUnit::Records,
                }
            })
            .collect()
    }

    fn key_for(&self, p: usize, seq: u64) -> Option<Bytes> {
        if self.keys.is_empty() {
            return None;
        }
        let ix = (seq.wrapping_mul(2_654_435_761).wrapping_add(p as u64)) % self.keys.len() as u64;
        Some(self.keys[ix as usize].clone())
    }
}

#[async_trait]
impl Source for GeneratorSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::replayable_ordered()
    }

    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        self.ctx = Some(ctx);
        Ok(())
    }

    async fn next(&mut self) -> Result<SourceEvent, Error> {
        let Some(ctx) = self.ctx.clone() else {
            return Err(Error::fatal("GeneratorSource::next called before open"));
        };
        if !self.assigned_sent {
            self.assigned_sent = true;
            return Ok(SourceEvent::Assigned(
                self.ids.iter().cloned().map(Assignment::new).collect(),
            ));
        }
        loop {
            let started: Vec<usize> = (0..self.ids.len())
                .filter(|p| self.grants[*p].is_some())
                .collect();
            if !started.is_empty()
                && started.len() == self.ids.len()
                && started.iter().all(|p| self.remaining(*p) == 0)
            {
                return Ok(SourceEvent::End);
            }
            let now = Instant::now();
            if !started.is_empty() && now.duration_since(self.last_lag) >= self.cfg.lag_interval {
                self.last_lag = now;
                return Ok(SourceEvent::Lag(self.lag_samples(now)));
            }
            let due = self
                .time_base
                .and_then(|t| self.due_per_partition(now.duration_since(t)));
            let n_parts = self.ids.len();
            for i in 0..n_parts {
                let p = (self.rr + i) % n_parts;
                let Some(grant) = &self.grants[p] else {
                    continue;
                };
                let mut n = grant.available().min(self.cfg.max_batch) as u64;
                n = n.min(self.remaining(p));
                if let Some(d) = due {
                    n = n.min((d as u64).saturating_sub(self.emitted_since_start[p]));
                }
                if n == 0 {
                    continue;
                }
                let ts = SystemTime::now();
                let start = self.next[p];
                let mut records = Vec::with_capacity(n as usize);
                for seq in start..start + n {
                    records.push(Record {
                        partition: self.ids[p].clone(),
                        position: Position::from(seq),
                        key: self.key_for(p, seq),
                        payload: self.payload.clone(),
                        headers: Default::default(),
                        timestamp: Some(ts),
                        idempotency_key: None,
                        redelivered: false,
                    });
                }
                self.next[p] += n;
                self.emitted_since_start[p] += n;
                self.rr = p + 1;
                return Ok(SourceEvent::Records(records));
            }
            // Nothing to emit: wait for credit, the next due record, or the next lag sample.
            let mut wait = self
                .cfg
                .lag_interval
                .saturating_sub(now.duration_since(self.last_lag));
            if let (Some(rate), true) = (self.cfg.rate, due.is_some()) {
                let per_record = Duration::from_secs_f64(f64::from(self.cfg.partitions) / rate);
                wait = wait.min(per_record.max(Duration::from_millis(1)));
            }
            if started.is_empty() {
                wait = Duration::from_millis(50);
            }
            let changed = ctx.credits.changed();
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        let Some(ctx) = &self.ctx else {
            return Err(Error::fatal("GeneratorSource::start called before open"));
        };
        for s in starts {
            let Some(p) = self.ids.iter().position(|id| *id == s.partition) else {
                return Err(
                    Error::fatal("start for a partition the generator does not have")
                        .with_context("partition", &s.partition),
                );
            };
            self.next[p] = match &s.after {
                Some(pos) => pos.successor().as_u64().ok_or_else(|| {
                    Error::config("generator positions are u64").with_context("position", pos)
                })?,
                None => 0,
            };
            self.grants[p] = ctx.credits.grant(&s.partition);
            if self.grants[p].is_none() {
                return Err(Error::fatal(
                    "the runtime started a partition without registering its credit",
                )
                .with_context("partition", &s.partition));
            }
        }
        if self.time_base.is_none() {
            self.time_base = Some(Instant::now());
        }
        Ok(())
    }

    async fn commit(&mut self, _checkpoints: &[Checkpoint]) -> Result<(), Error> {
        Ok(())
    }

    async fn close(&mut self) -> Result<(), Error> {
        Ok(())
    }
}
