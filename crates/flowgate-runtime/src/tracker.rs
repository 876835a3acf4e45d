//! Ack tracking → contiguous watermark.
//!
//! Acknowledgements arrive out of order (concurrent batches, key lanes, dead letters). The
//! committable position of a partition is the position of the last record of the longest
//! fully acknowledged prefix of the delivery order — never past a record still in flight.
//!
//! Records are numbered by the runtime in delivery order (`seq`), so the tracker works for
//! sources whose positions are not dense (Kinesis sequence numbers, delivery tags).

use std::collections::VecDeque;

use flowgate_core::Position;

/// Per-partition ack tracker.
#[derive(Debug, Default)]
pub(crate) struct AckTracker {
    /// Seq of `slots[0]`.
    base: u64,
    slots: VecDeque<Slot>,
    /// Last position of the acknowledged prefix.
    watermark: Option<Position>,
    /// Records in the acknowledged prefix since the last `take_advanced`.
    advanced: u64,
}

#[derive(Debug)]
struct Slot {
    position: Position,
    acked: bool,
}

impl AckTracker {
    /// A tracker whose first record will get `seq == first_seq`.
    pub(crate) fn new(first_seq: u64) -> Self {
        AckTracker {
            base: first_seq,
            ..Default::default()
        }
    }

    /// Registers the next delivered record; returns its seq.
    pub(crate) fn push(&mut self, position: Position) -> u64 {
        let seq = self.base + self.slots.len() as u64;
        self.slots.push_back(Slot {
            position,
            acked: false,
        });
        seq
    }

    /// Acknowledges one record. Unknown or already settled seqs are ignored (a late ack from a
    /// previous incarnation never moves the watermark).
    pub(crate) fn ack(&mut self, seq: u64) {
        let Some(idx) = seq.checked_sub(self.base) else {
            return;
        };
        if let Some(slot) = self.slots.get_mut(idx as usize) {
            slot.acked = true;
        }
        if idx == 0 {
            self.advance();
        }
    }

    /// Acknowledges every sequence number in `seqs` (a batch's run of deliveries).
    pub(crate) fn ack_range(&mut self, seqs: std::ops::Range<u64>) {
        let start = seqs.start.max(self.base) - self.base;
        let end = seqs
            .end
            .saturating_sub(self.base)
            .min(self.slots.len() as u64);
        if start >= end {
            return;
        }
        for slot in self.slots.range_mut(start as usize..end as usize) {
            slot.acked = true;
        }
        if start == 0 {
            self.advance();
        }
    }

    fn advance(&mut self) {
        let done = self.slots.iter().take_while(|s| s.acked).count();
        if done == 0 {
            return;
        }
        if let Some(last) = self.slots.drain(..done).next_back() {
            self.watermark = Some(last.position);
        }
        self.base += done as u64;
        self.advanced += done as u64;
    }

    /// Last position of the fully acknowledged prefix.
    pub(crate) fn watermark(&self) -> Option<&Position> {
        self.watermark.as_ref()
    }

    /// Records acknowledged into the prefix since the last call.
    pub(crate) fn take_advanced(&mut self) -> u64 {
        std::mem::take(&mut self.advanced)
    }

    /// Seq just past the acknowledged prefix: how many records (counted from the tracker's
    /// first seq) are in it.
    pub(crate) fn prefix_end(&self) -> u64 {
        self.base
    }

    /// Records delivered and not yet in the acknowledged prefix.
    pub(crate) fn pending(&self) -> usize {
        self.slots.len()
    }

    /// Sets the watermark to a position already committed (start after a checkpoint), so
    /// that a partition with nothing new still reports its checkpoint.
    pub(crate) fn set_initial(&mut self, position: Option<Position>) {
        if self.slots.is_empty() {
            self.watermark = position;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_acks_wait_for_the_gap() {
        let mut t = AckTracker::new(0);
        for p in [10u64, 20, 30, 40] {
            t.push(Position::from(p));
        }
        t.ack(2);
        t.ack(1);
        assert_eq!(t.watermark(), None);
        t.ack(0);
        assert_eq!(t.watermark(), Some(&Position::from(30)));
        assert_eq!(t.take_advanced(), 3);
        t.ack(99);
        t.ack(2);
        assert_eq!(t.pending(), 1);
        t.ack(3);
        assert_eq!(t.watermark(), Some(&Position::from(40)));
    }

    proptest! {
        /// Acknowledging whole ranges, in any order and some twice, keeps the watermark at the
        /// last position of the acknowledged prefix.
        #[test]
        fn range_acks_keep_the_watermark_contiguous(
            n in 1u64..300,
            cuts in proptest::collection::vec(1u64..300, 0..40),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 1..80),
        ) {
            let mut t = AckTracker::new(7);
            for p in 0..n {
                t.push(Position::from(p * 3));
            }
            let mut bounds: Vec<u64> = cuts.into_iter().filter(|c| *c < n).collect();
            bounds.extend([0, n]);
            bounds.sort_unstable();
            bounds.dedup();
            let ranges: Vec<(u64, u64)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
            let mut acked = vec![false; n as usize];
            for ix in order {
                let (lo, hi) = ranges[ix.index(ranges.len())];
                t.ack_range(7 + lo..7 + hi);
                for a in &mut acked[lo as usize..hi as usize] {
                    *a = true;
                }
                let prefix = acked.iter().take_while(|a| **a).count() as u64;
                let expect = prefix.checked_sub(1).map(|p| Position::from(p * 3));
                prop_assert_eq!(t.watermark(), expect.as_ref());
                prop_assert_eq!(t.pending() as u64, n - prefix);
                prop_assert_eq!(t.prefix_end(), 7 + prefix);
            }
        }

        /// For random ack orders the watermark is always the last position of the acked
        /// prefix and never passes an unacknowledged record.
        #[test]
        fn watermark_is_contiguous(
            n in 1usize..200,
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 1..400),
            gaps in proptest::collection::vec(1u64..1000, 200),
        ) {
            let mut t = AckTracker::new(0);
            let mut positions = Vec::new();
            let mut pos = 0u64;
            for gap in gaps.iter().take(n) {
                pos += gap;
                positions.push(Position::from(pos));
                t.push(Position::from(pos));
            }
            let mut acked = vec![false; n];
            for ix in order {
                let seq = ix.index(n);
                acked[seq] = true;
                t.ack(seq as u64);
                let prefix = acked.iter().take_while(|a| **a).count();
                let expect = if prefix == 0 { None } else { Some(&positions[prefix - 1]) };
                prop_assert_eq!(t.watermark(), expect);
                prop_assert_eq!(t.pending(), n - prefix);
                if let Some(w) = t.watermark() {
                    // Never past an unacknowledged record.
                    for (i, a) in acked.iter().enumerate() {
                        if !a { prop_assert!(&positions[i] > w); }
                    }
                }
            }
        }
    }
}
