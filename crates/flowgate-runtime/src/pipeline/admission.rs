//! Admission: records into their partition's lanes within credit and the byte budget, the
//! overflow policies, and the credit handed back to the source.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::time::Instant;

use flowgate_core::{Error, PartitionId, Record};

use crate::settings::{OverflowPolicy, SinkOrdering};
use crate::stats::Stats;

use super::lane::Slot;
use super::*;

/// What became of one record under an overflow policy.
enum Overflow {
    /// Queue it.
    Admit,
    /// Queue it: the oldest queued record was shed to make room.
    AdmitAfterShedding,
    /// It was shed (acknowledged without being written).
    Shed,
}

impl State {
    pub(super) fn ingest(&mut self, records: Vec<Record>) {
        let n = records.len() as u64;
        Stats::add(&self.stats.records_in, n);
        self.metrics.records_in.increment(n);
        let mut shed = 0u64;
        let mut touched: Vec<PartitionId> = Vec::new();
        for run in partition_runs(records) {
            match self.admit_run(run, &mut touched) {
                Ok(n) => shed += n,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
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

    /// Queues a run of one partition's records; how many were shed.
    fn admit_run(
        &mut self,
        mut run: Vec<Record>,
        touched: &mut Vec<PartitionId>,
    ) -> Result<u64, Error> {
        let Some(pid) = run.first().map(|r| r.partition.clone()) else {
            return Ok(0);
        };
        let Some(part) = self.partitions.get_mut(&pid) else {
            tracing::debug!(pipeline = %self.name, partition = %pid, "records for a partition not owned; dropped (they will be redelivered to its owner)");
            return Ok(0);
        };
        touched.push(pid.clone());
        if part.revoking {
            return Ok(0);
        }
        if let Some(ex) = &self.extractor {
            for r in run.iter_mut().filter(|r| r.idempotency_key.is_none()) {
                r.idempotency_key = ex.extract(r);
            }
        }
        let now = Instant::now();
        let positional = self.workers.positional;
        if self.settings.overflow == OverflowPolicy::Block && part.lanes.len() == 1 {
            // One lane and no overflow: the run is queued whole, moved once.
            let Part {
                lanes,
                tracker,
                lookup,
                ..
            } = part;
            let Some(lane) = lanes.first_mut() else {
                return Ok(0);
            };
            for r in &run {
                let size = r.byte_size();
                let slot = Slot {
                    seq: tracker.push(r.position.clone()),
                    size,
                    lookup: positional && lookup.lookup(&r.position),
                };
                lane.push_slot(slot, now);
                self.bytes += size;
            }
            lane.push_records(run);
            return Ok(0);
        }
        let mut shed = 0;
        for r in run {
            let size = r.byte_size();
            match self.overflow(&pid, &r, size)? {
                Overflow::Admit => {}
                Overflow::AdmitAfterShedding => shed += 1,
                Overflow::Shed => {
                    shed += 1;
                    continue;
                }
            }
            let Some(part) = self.partitions.get_mut(&pid) else {
                return Ok(shed);
            };
            let lane = match self.settings.ordering {
                SinkOrdering::Key => {
                    let mut h = DefaultHasher::new();
                    r.key.as_deref().unwrap_or(&[]).hash(&mut h);
                    (h.finish() % part.lanes.len() as u64) as usize
                }
                _ => 0,
            };
            let slot = Slot {
                seq: part.tracker.push(r.position.clone()),
                size,
                lookup: positional && part.lookup.lookup(&r.position),
            };
            if let Some(lane) = part.lanes.get_mut(lane) {
                lane.push(slot, r, now);
                self.bytes += size;
            }
        }
        Ok(shed)
    }

    /// Applies the overflow policy to a record of `size` bytes arriving for `pid`: admit it
    /// (after shedding the oldest queued record, for `shed_oldest`), shed it, or fail.
    fn overflow(&mut self, pid: &PartitionId, r: &Record, size: usize) -> Result<Overflow, Error> {
        let policy = self.settings.overflow;
        let limit = self.settings.max_in_flight_per_partition;
        let over_budget = self.bytes + size > self.settings.max_buffer_bytes;
        let Some(part) = self.partitions.get_mut(pid) else {
            return Ok(Overflow::Admit);
        };
        if policy == OverflowPolicy::Block || (part.tracker.pending() < limit && !over_budget) {
            return Ok(Overflow::Admit);
        }
        match policy {
            OverflowPolicy::ShedNewest => {}
            OverflowPolicy::ShedOldest => {
                // Drop the oldest record still queued (never one already sent).
                let oldest = part
                    .lanes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, l)| l.front_seq().map(|seq| (seq, i)))
                    .min();
                if let Some((_, li)) = oldest {
                    if let Some(slot) = part.lanes.get_mut(li).and_then(|l| l.pop_front()) {
                        self.bytes -= slot.size;
                        part.tracker.ack(slot.seq);
                    }
                    return Ok(Overflow::AdmitAfterShedding);
                }
            }
            OverflowPolicy::FailFast => {
                return Err(Error::fatal("overflow: a partition is full and the overflow policy is fail_fast")
                    .with_context("partition", &r.partition)
                    .with_context("in_flight", part.tracker.pending())
                    .with_hint("raise `max_in_flight_per_partition` / `max_buffer_bytes`, speed up the sink, or use overflow = \"block\""));
            }
            OverflowPolicy::Block => return Ok(Overflow::Admit),
        }
        // Shed the newcomer: its position still advances the watermark.
        let seq = part.tracker.push(r.position.clone());
        part.tracker.ack(seq);
        Ok(Overflow::Shed)
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

/// Splits a source's records into runs of one partition, in order. Sources deliver runs of
/// one partition (most often a single run), so each run is cut off once, not record by record.
fn partition_runs(mut records: Vec<Record>) -> Vec<Vec<Record>> {
    let starts: Vec<usize> = records
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[0].partition != w[1].partition)
        .map(|(i, _)| i + 1)
        .collect();
    let mut runs = Vec::with_capacity(starts.len() + 1);
    for start in starts.into_iter().rev() {
        runs.push(records.split_off(start));
    }
    if !records.is_empty() {
        runs.push(records);
    }
    runs.reverse();
    runs
}
