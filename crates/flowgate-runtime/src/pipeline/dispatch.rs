//! Dispatch: lanes into batches within the sink's limits and the concurrency, and what comes back from the workers.

use std::sync::atomic::Ordering;
use std::time::Instant;

use flowgate_core::Source;

use crate::settings::SinkOrdering;
use crate::stats::Stats;
use crate::worker::{self, Batch, Completion, WorkerEvent};

use super::*;

impl State {
    pub(super) fn dispatch(&mut self, now: Instant) {
        let n = self.order.len();
        if n == 0 {
            return;
        }
        let limit = self.concurrency.limit();
        let linger = self.linger();
        let force = self.drain_deadline.is_some();
        let unordered = self.settings.ordering == SinkOrdering::Unordered;
        if self.fatal.is_some() {
            return;
        }
        let start = self.rr;
        self.rr = (self.rr + 1) % n;
        for i in 0..n {
            if self.batches_in_flight >= limit {
                break;
            }
            let pid = self.order[(start + i) % n].clone();
            let Some(part) = self.partitions.get_mut(&pid) else {
                continue;
            };
            if part.revoking {
                continue;
            }
            for li in 0..part.lanes.len() {
                loop {
                    let lane = &mut part.lanes[li];
                    if lane.queue.is_empty()
                        || (lane.busy > 0 && !unordered)
                        || self.batches_in_flight >= limit
                    {
                        break;
                    }
                    let full = lane.queue.len() >= self.max_batch_records
                        || lane.queued_bytes >= self.max_batch_bytes;
                    let expired = lane
                        .first_at
                        .is_some_and(|t| now.duration_since(t) >= linger);
                    if !(full || expired || force) {
                        break;
                    }
                    // The batch: records from the front up to the record or byte limit
                    // (at least one), moved out of the queue once.
                    let mut take = 0;
                    let mut bytes = 0;
                    for q in &lane.queue {
                        if take > 0
                            && (take >= self.max_batch_records
                                || bytes + q.size > self.max_batch_bytes)
                        {
                            break;
                        }
                        take += 1;
                        bytes += q.size;
                    }
                    let mut records = Vec::with_capacity(take);
                    let mut seqs = Vec::with_capacity(take);
                    let mut lookups = Vec::new();
                    records.extend(lane.queue.drain(..take).enumerate().map(|(i, q)| {
                        if q.lookup {
                            lookups.push(i);
                        }
                        seqs.push(q.seq);
                        q.record
                    }));
                    lane.queued_bytes -= bytes;
                    lane.first_at = if lane.queue.is_empty() {
                        None
                    } else {
                        Some(now)
                    };
                    lane.busy += 1;
                    part.unsettled += 1;
                    self.batches_in_flight += 1;
                    let batch = Batch {
                        partition: pid.clone(),
                        incarnation: part.incarnation,
                        lane: li,
                        seqs,
                        records,
                        lookups,
                        bytes,
                    };
                    tokio::spawn(worker::run(self.shared.clone(), batch));
                }
            }
        }
        Stats::peak(
            &self.stats.peak_batches_in_flight,
            self.batches_in_flight as u64,
        );
    }

    pub(super) async fn on_worker_event(&mut self, ev: WorkerEvent, source: &mut Box<dyn Source>) {
        match ev {
            WorkerEvent::LaneFree {
                partition,
                incarnation,
                lane,
            } => {
                if let Some(part) = self.partitions.get_mut(&partition) {
                    if part.incarnation == incarnation {
                        if let Some(l) = part.lanes.get_mut(lane) {
                            l.busy = l.busy.saturating_sub(1);
                        }
                    }
                }
            }
            WorkerEvent::Done(c) => self.on_completion(c, source).await,
        }
    }

    pub(super) async fn on_completion(&mut self, c: Completion, source: &mut Box<dyn Source>) {
        let Completion {
            partition,
            incarnation,
            lane,
            lane_released,
            seqs,
            bytes,
            latency,
            throttled,
            rejects,
            result,
        } = c;
        self.batches_in_flight -= 1;
        self.bytes -= bytes;
        self.concurrency
            .on_batch(latency, throttled, Instant::now());
        let limit = self.concurrency.limit() as u64;
        self.stats.concurrency.store(limit, Ordering::Relaxed);
        self.metrics.concurrency.set(limit as f64);
        if let Err(e) = result {
            self.fail(e.with_context("partition", &partition));
            self.publish_gauges();
            return;
        }
        for (r, e) in &rejects {
            if let Err(err) = source.reject(r, e).await {
                self.fail(
                    err.with_context("partition", &r.partition)
                        .with_context("position", &r.position),
                );
                self.publish_gauges();
                return;
            }
        }
        let current = self
            .partitions
            .get(&partition)
            .is_some_and(|p| p.incarnation == incarnation);
        if !current {
            tracing::debug!(pipeline = %self.name, partition = %partition, "late completion for a partition no longer owned (or owned anew): dropped");
            if let Some(n) = self.lingering.get_mut(&partition) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.lingering.remove(&partition);
                }
            }
            self.publish_gauges();
            return;
        }
        let Some(part) = self.partitions.get_mut(&partition) else {
            return;
        };
        part.unsettled = part.unsettled.saturating_sub(1);
        if !lane_released {
            if let Some(l) = part.lanes.get_mut(lane) {
                l.busy = l.busy.saturating_sub(1);
            }
        }
        for s in &seqs {
            part.tracker.ack(*s);
        }
        let advanced = part.tracker.take_advanced();
        Stats::add(&self.stats.records_acked, seqs.len() as u64);
        self.uncommitted += advanced;
        if advanced > 0 && self.caps.eager_commit {
            self.force_commit = true;
        }
        self.update_credit(&partition);
        self.publish_gauges();
    }
}
