//! A lane: the records of one partition (or of one key group of it) waiting for a batch.

use std::collections::VecDeque;
use std::time::Instant;

use flowgate_core::Record;

use crate::worker::SeqRanges;

/// What the coordinator keeps of each queued record.
#[derive(Clone, Copy)]
pub(super) struct Slot {
    pub(super) seq: u64,
    pub(super) size: usize,
    /// Positional dedup looks this record up in the store (see [`LookupFloor`](crate::dedup)).
    pub(super) lookup: bool,
}

/// A run of records as the source delivered it. Records are kept in these runs, apart from
/// their slots, so that a run is queued without moving a record, and a batch that is a whole
/// run leaves without moving one either.
struct Chunk {
    records: VecDeque<Record>,
    /// Nothing was taken from its front: its buffer starts at its first record, so it becomes
    /// a batch's `Vec` as it is.
    whole: bool,
}

#[derive(Default)]
pub(super) struct Lane {
    chunks: VecDeque<Chunk>,
    slots: VecDeque<Slot>,
    pub(super) queued_bytes: usize,
    /// Batches of this lane at the sink.
    pub(super) busy: usize,
    /// When the oldest queued record arrived (linger runs from it).
    pub(super) first_at: Option<Instant>,
}

/// A batch taken from a lane's front.
pub(super) struct Taken {
    pub(super) records: Vec<Record>,
    pub(super) seqs: SeqRanges,
    pub(super) lookups: Vec<usize>,
    pub(super) bytes: usize,
}

impl Lane {
    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Queues one record.
    pub(super) fn push(&mut self, slot: Slot, record: Record, now: Instant) {
        self.push_slot(slot, now);
        match self.chunks.back_mut() {
            Some(chunk) => chunk.records.push_back(record),
            None => self.chunks.push_back(Chunk {
                records: VecDeque::from([record]),
                whole: false,
            }),
        }
    }

    /// Queues a run of records whose slots were pushed with [`Lane::push_slot`], as it is.
    pub(super) fn push_records(&mut self, records: Vec<Record>) {
        if !records.is_empty() {
            self.chunks.push_back(Chunk {
                records: VecDeque::from(records),
                whole: true,
            });
        }
    }

    /// The slot of a record queued next with [`Lane::push_records`].
    pub(super) fn push_slot(&mut self, slot: Slot, now: Instant) {
        self.note_first(now);
        self.queued_bytes += slot.size;
        self.slots.push_back(slot);
    }

    fn note_first(&mut self, now: Instant) {
        if self.slots.is_empty() {
            self.first_at = Some(now);
        }
    }

    /// The oldest queued record's sequence number.
    pub(super) fn front_seq(&self) -> Option<u64> {
        self.slots.front().map(|s| s.seq)
    }

    /// Drops the oldest queued record; its slot.
    pub(super) fn pop_front(&mut self) -> Option<Slot> {
        let slot = self.slots.pop_front()?;
        if let Some(chunk) = self.chunks.front_mut() {
            chunk.records.pop_front();
            chunk.whole = false;
            if chunk.records.is_empty() {
                self.chunks.pop_front();
            }
        }
        self.queued_bytes -= slot.size;
        if self.slots.is_empty() {
            self.first_at = None;
        }
        Some(slot)
    }

    /// Drops every queued record; the bytes they held.
    pub(super) fn clear(&mut self) -> usize {
        self.chunks.clear();
        self.slots.clear();
        self.first_at = None;
        std::mem::take(&mut self.queued_bytes)
    }

    /// The front of the queue up to `max_records` and `max_bytes` (at least one record).
    pub(super) fn take(&mut self, max_records: usize, max_bytes: usize, now: Instant) -> Taken {
        let mut take = 0;
        let mut bytes = 0;
        for s in &self.slots {
            if take > 0 && (take >= max_records || bytes + s.size > max_bytes) {
                break;
            }
            take += 1;
            bytes += s.size;
        }
        let mut seqs = SeqRanges::default();
        let mut lookups = Vec::new();
        for (i, s) in self.slots.drain(..take).enumerate() {
            seqs.push(s.seq);
            if s.lookup {
                lookups.push(i);
            }
        }
        let records = self.take_records(take);
        self.queued_bytes -= bytes;
        self.first_at = if self.slots.is_empty() {
            None
        } else {
            Some(now)
        };
        Taken {
            records,
            seqs,
            lookups,
            bytes,
        }
    }

    /// The first `n` records. A batch that is a whole run is that run's buffer; otherwise the
    /// records move one by one (a split or a merge of runs).
    fn take_records(&mut self, n: usize) -> Vec<Record> {
        if let Some(front) = self.chunks.front()
            && front.whole
            && front.records.len() == n
        {
            return self
                .chunks
                .pop_front()
                .map(|c| Vec::from(c.records))
                .unwrap_or_default();
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(chunk) = self.chunks.front_mut() else {
                break;
            };
            let k = (n - out.len()).min(chunk.records.len());
            out.extend(chunk.records.drain(..k));
            chunk.whole = false;
            if chunk.records.is_empty() {
                self.chunks.pop_front();
            }
        }
        out
    }
}
