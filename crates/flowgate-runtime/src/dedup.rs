//! Idempotency key extraction, and which records positional dedup looks up.

use std::fmt;
use std::sync::Arc;

use flowgate_core::{IdempotencyKey, Position, Record};

/// A function computing a record's idempotency key.
pub type KeyFn = Arc<dyn Fn(&Record) -> Option<IdempotencyKey> + Send + Sync>;

/// Where a record's idempotency key comes from, when the source did not set one.
#[derive(Clone)]
pub enum KeyExtractor {
    /// A header's value (producers that stamp a message id).
    Header(String),
    /// The record's broker key (latest-value streams keyed by entity and version).
    Key,
    /// Partition and position: unique for replayable sources (Kafka, Kinesis, streams).
    SourcePosition,
    /// Your own function.
    Custom(KeyFn),
}

impl KeyExtractor {
    /// The key of a record; `None` if it has none (the record is processed without dedup and
    /// counted).
    pub fn extract(&self, r: &Record) -> Option<IdempotencyKey> {
        if let Some(k) = &r.idempotency_key {
            return Some(k.clone());
        }
        match self {
            KeyExtractor::Header(name) => {
                r.headers.get(name).map(|v| IdempotencyKey::new(v.clone()))
            }
            KeyExtractor::Key => r.key.clone().map(IdempotencyKey::new),
            KeyExtractor::SourcePosition => {
                Some(IdempotencyKey::from_position(&r.partition, &r.position))
            }
            KeyExtractor::Custom(f) => f(r),
        }
    }
}

impl fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyExtractor::Header(h) => write!(f, "Header({h:?})"),
            KeyExtractor::Key => f.write_str("Key"),
            KeyExtractor::SourcePosition => f.write_str("SourcePosition"),
            KeyExtractor::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Which records of one partition positional dedup looks up in the store.
///
/// Marks of a partition are written by its owners, one at a time. When a partition is
/// assigned, the store's last mark for it bounds every mark an earlier owner left; after
/// that, only this owner marks it, and only records it delivered. So a record above that
/// bound *and* above every record delivered since cannot be marked: it skips the store. A
/// record at or below either (a replay, a source that rewound) is looked up as before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LookupFloor {
    /// Every record is looked up (the store cannot tell its last mark).
    All,
    /// Records at or below this position are looked up; `None`: none is.
    Through(Option<Position>),
}

impl LookupFloor {
    /// Whether the record at `position`, delivered now, must be looked up; raises the floor
    /// to it.
    pub(crate) fn lookup(&mut self, position: &Position) -> bool {
        match self {
            LookupFloor::All => true,
            LookupFloor::Through(floor) => match floor {
                Some(f) if position <= f => true,
                _ => {
                    *floor = Some(position.clone());
                    false
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_above_the_last_mark_and_every_delivery_skip_the_store() {
        let mut f = LookupFloor::Through(Some(Position::new(10)));
        let looked: Vec<bool> = [9u128, 10, 11, 12, 12, 5, 13]
            .iter()
            .map(|p| f.lookup(&Position::new(*p)))
            .collect();
        assert_eq!(looked, [true, true, false, false, true, true, false]);
        let mut all = LookupFloor::All;
        assert!(all.lookup(&Position::new(1_000)));
        let mut none = LookupFloor::Through(None);
        assert!(!none.lookup(&Position::new(0)));
        assert!(none.lookup(&Position::new(0)), "a redelivery is looked up");
    }

    proptest! {
        /// Whatever the order of deliveries: a record is skipped only if it is above the
        /// stored mark and above everything delivered before it, so a record that could
        /// carry a mark (its position marked before, or delivered before) is always looked up.
        #[test]
        fn a_record_that_could_be_marked_is_always_looked_up(
            stored in proptest::option::of(0u128..50),
            deliveries in proptest::collection::vec(0u128..60, 0..80),
        ) {
            let mut f = LookupFloor::Through(stored.map(Position::new));
            let mut before: Vec<u128> = Vec::new();
            for p in deliveries {
                let could_be_marked = stored.is_some_and(|s| p <= s) || before.iter().any(|b| p <= *b);
                let looked = f.lookup(&Position::new(p));
                prop_assert_eq!(looked, could_be_marked);
                before.push(p);
            }
        }
    }
}
