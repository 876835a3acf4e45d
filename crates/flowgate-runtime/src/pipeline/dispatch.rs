//! Dispatch: lanes into batches within the sink's limits and the concurrency, and what comes
//! back from the workers.

use std::sync::atomic::Ordering;
use std::time::Instant;

use flowgate_core::{Error, Source};
use futures_util::FutureExt;

use crate::settings::SinkOrdering;
use crate::stats::Stats;
use crate::worker::{Batch, Completion, Ticket};

use super::*;

impl State {
    pub(super) fn dispatch(&mut self, now: Instant) {
        let n = self.order.len();
        if n == 0 || self.fatal.is_some() {
            return;
        }
        let start = self.next_partition;
        self.next_partition = (self.next_partition + 1) % n;
        for i in 0..n {
            if self.batches_in_flight >= self.concurrency.limit() {
                break;
            }
            let pid = self.order[(start + i) % n].clone();
            self.dispatch_partition(&pid, now);
        }
        Stats::peak(
            &self.stats.peak_batches_in_flight,
            self.batches_in_flight as u64,
        );
    }

    /// Sends the batches `pid`'s lanes are ready to send, within the concurrency limit.
    fn dispatch_partition(&mut self, pid: &PartitionId, now: Instant) {
        let limit = self.concurrency.limit();
        let linger = self.linger();
        let force = self.drain_deadline.is_some();
        let unordered = self.settings.ordering == SinkOrdering::Unordered;
        let Some(part) = self.partitions.get_mut(pid) else {
            return;
        };
        if part.revoking {
            return;
        }
        for (li, lane) in part.lanes.iter_mut().enumerate() {
            while !lane.is_empty()
                && (lane.busy == 0 || unordered)
                && self.batches_in_flight < limit
            {
                let full = lane.len() >= self.max_batch_records
                    || lane.queued_bytes >= self.max_batch_bytes;
                let expired = lane
                    .first_at
                    .is_some_and(|t| now.duration_since(t) >= linger);
                if !(full || expired || force) {
                    break;
                }
                let taken = lane.take(self.max_batch_records, self.max_batch_bytes, now);
                lane.busy += 1;
                part.unsettled += 1;
                self.batches_in_flight += 1;
                self.workers.spawn(Batch {
                    ticket: Ticket {
                        partition: pid.clone(),
                        incarnation: part.incarnation,
                        lane: li,
                        seqs: taken.seqs,
                        lookups: taken.lookups,
                        bytes: taken.bytes,
                        started: now,
                    },
                    records: taken.records,
                });
            }
        }
    }

    /// A worker is done with a batch: its lane is free; the batch settles now, or once its
    /// dedup marks are durable.
    pub(super) async fn on_completion(&mut self, mut c: Completion, source: &mut Box<dyn Source>) {
        let t = &c.ticket;
        if let Some(part) = self.partitions.get_mut(&t.partition) {
            if part.incarnation == t.incarnation {
                if let Some(lane) = part.lanes.get_mut(t.lane) {
                    lane.busy = lane.busy.saturating_sub(1);
                }
            }
        }
        match c.marks.take() {
            Some(marks) if c.result.is_ok() => {
                self.settling.push(Box::pin(marks.map(move |marked| {
                    c.result =
                        marked.unwrap_or_else(|_| Err(Error::fatal("the dedup marker stopped")));
                    c
                })));
            }
            _ => self.settle(c, source).await,
        }
    }

    /// A batch is written (and its marks durable): its records are acknowledged.
    pub(super) async fn settle(&mut self, c: Completion, source: &mut Box<dyn Source>) {
        let Completion {
            ticket,
            throttled,
            rejects,
            result,
            ..
        } = c;
        self.batches_in_flight -= 1;
        self.bytes -= ticket.bytes;
        self.concurrency
            .on_batch(ticket.started.elapsed(), throttled, Instant::now());
        let limit = self.concurrency.limit() as u64;
        self.stats.concurrency.store(limit, Ordering::Relaxed);
        self.metrics.concurrency.set(limit as f64);
        if let Err(e) = result {
            self.fail(e.with_context("partition", &ticket.partition));
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
        self.acknowledge(&ticket);
        self.publish_gauges();
    }

    /// Acknowledges a settled batch's records, if its partition is still the one it came from.
    fn acknowledge(&mut self, ticket: &Ticket) {
        let pid = &ticket.partition;
        let Some(part) = self
            .partitions
            .get_mut(pid)
            .filter(|p| p.incarnation == ticket.incarnation)
        else {
            tracing::debug!(pipeline = %self.name, partition = %pid, "late completion for a partition no longer owned (or owned anew): dropped");
            if let Some(n) = self.lingering.get_mut(pid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.lingering.remove(pid);
                }
            }
            return;
        };
        part.unsettled = part.unsettled.saturating_sub(1);
        for seqs in ticket.seqs.ranges() {
            part.tracker.ack_range(seqs.clone());
        }
        let advanced = part.tracker.take_advanced();
        Stats::add(&self.stats.records_acked, ticket.seqs.count());
        self.uncommitted += advanced;
        if advanced > 0 && self.caps.eager_commit {
            self.force_commit = true;
        }
        self.update_credit(pid);
    }
}
