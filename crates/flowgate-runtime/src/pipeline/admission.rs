//! Admission: records into their partition's lanes within credit and the byte budget, the overflow policies, and the credit handed back to the source.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::time::Instant;

use flowgate_core::{Error, PartitionId, Record};

use crate::settings::{OverflowPolicy, SinkOrdering};
use crate::stats::Stats;

use super::*;

impl State {
    pub(super) fn ingest(&mut self, records: Vec<Record>) {
        let n = records.len() as u64;
        Stats::add(&self.stats.records_in, n);
        self.metrics.records_in.increment(n);
        let now = Instant::now();
        let limit = self.settings.max_in_flight_per_partition;
        let budget = self.settings.max_buffer_bytes;
        let policy = self.settings.overflow;
        let lanes_mode = self.settings.ordering;
        let positional = self.shared.positional;
        let mut shed = 0u64;
        let mut touched: Vec<PartitionId> = Vec::new();
        let mut failed: Option<Error> = None;
        // Sources deliver runs of one partition: the partition is looked up once per run.
        let mut records = records.into_iter().peekable();
        'runs: while let Some(pid) = records.peek().map(|r| r.partition.clone()) {
            let run = std::iter::from_fn(|| records.next_if(|r| r.partition == pid));
            let Some(part) = self.partitions.get_mut(&pid) else {
                tracing::debug!(pipeline = %self.name, partition = %pid, "records for a partition not owned; dropped (they will be redelivered to its owner)");
                run.for_each(drop);
                continue;
            };
            touched.push(pid.clone());
            if part.revoking {
                run.for_each(drop);
                continue;
            }
            for mut r in run {
                if let Some(ex) = &self.extractor {
                    if r.idempotency_key.is_none() {
                        r.idempotency_key = ex.extract(&r);
                    }
                }
                let size = r.byte_size();
                if policy != OverflowPolicy::Block
                    && (part.tracker.pending() >= limit || self.bytes + size > budget)
                {
                    match policy {
                        OverflowPolicy::ShedNewest => {
                            let seq = part.tracker.push(r.position.clone());
                            part.tracker.ack(seq);
                            shed += 1;
                            continue;
                        }
                        OverflowPolicy::ShedOldest => {
                            // Drop the oldest record still queued (never one already sent).
                            let oldest = part
                                .lanes
                                .iter()
                                .enumerate()
                                .filter_map(|(i, l)| l.queue.front().map(|q| (q.seq, i)))
                                .min();
                            if let Some((_, li)) = oldest {
                                let lane = &mut part.lanes[li];
                                if let Some(q) = lane.queue.pop_front() {
                                    lane.queued_bytes -= q.size;
                                    self.bytes -= q.size;
                                    part.tracker.ack(q.seq);
                                    if lane.queue.is_empty() {
                                        lane.first_at = None;
                                    }
                                }
                            } else {
                                let seq = part.tracker.push(r.position.clone());
                                part.tracker.ack(seq);
                                shed += 1;
                                continue;
                            }
                            shed += 1;
                        }
                        OverflowPolicy::FailFast => {
                            failed = Some(Error::fatal("overflow: a partition is full and the overflow policy is fail_fast")
                                .with_context("partition", &r.partition)
                                .with_context("in_flight", part.tracker.pending())
                                .with_hint("raise `max_in_flight_per_partition` / `max_buffer_bytes`, speed up the sink, or use overflow = \"block\""));
                            break 'runs;
                        }
                        OverflowPolicy::Block => {}
                    }
                }
                let seq = part.tracker.push(r.position.clone());
                let lane_ix = match lanes_mode {
                    SinkOrdering::Key => {
                        let mut h = DefaultHasher::new();
                        r.key.as_deref().unwrap_or(&[]).hash(&mut h);
                        (h.finish() % part.lanes.len() as u64) as usize
                    }
                    _ => 0,
                };
                let lookup = positional && part.lookup.lookup(&r.position);
                let lane = &mut part.lanes[lane_ix];
                if lane.queue.is_empty() {
                    lane.first_at = Some(now);
                }
                lane.queue.push_back(Queued {
                    seq,
                    record: r,
                    size,
                    lookup,
                });
                lane.queued_bytes += size;
                self.bytes += size;
            }
        }
        if let Some(e) = failed {
            self.fail(e);
            return;
        }
        if shed > 0 {
            Stats::add(&self.stats.shed, shed);
            self.metrics.shed.increment(shed);
        }
        for p in &touched {
            if let Some(part) = self.partitions.get_mut(p) {
                let advanced = part.tracker.take_advanced();
                self.uncommitted += advanced;
                Stats::add(&self.stats.records_acked, advanced);
                let pending = part.tracker.pending() as u64;
                Stats::peak(&self.stats.peak_partition_in_flight, pending);
            }
            self.update_credit(p);
        }
        self.publish_gauges();
    }

    pub(super) fn update_credit(&mut self, p: &PartitionId) {
        let Some(part) = self.partitions.get(p) else {
            return;
        };
        let limit = self.settings.max_in_flight_per_partition;
        let credit = match self.settings.overflow {
            OverflowPolicy::Block => limit.saturating_sub(part.tracker.pending()),
            _ => limit,
        };
        self.credits.set(p, if part.revoking { 0 } else { credit });
    }

    pub(super) fn publish_gauges(&mut self) {
        let in_flight: usize = self.partitions.values().map(|p| p.tracker.pending()).sum();
        self.stats
            .in_flight
            .store(in_flight as u64, Ordering::Relaxed);
        self.stats
            .buffer_bytes
            .store(self.bytes as u64, Ordering::Relaxed);
        Stats::peak(&self.stats.peak_buffer_bytes, self.bytes as u64);
        self.metrics.in_flight.set(in_flight as f64);
        self.metrics.buffer_bytes.set(self.bytes as f64);
        let open = self.settings.overflow != OverflowPolicy::Block
            || self.bytes < self.settings.max_buffer_bytes;
        self.credits.set_open(open);
    }
}
