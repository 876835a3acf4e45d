//! Idempotency key extraction.

use std::fmt;
use std::sync::Arc;

use flowgate_core::{IdempotencyKey, Record};

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
