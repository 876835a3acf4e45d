use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::Position;

/// Names a partition: a Kafka topic partition, a Kinesis shard, a RabbitMQ queue.
///
/// Adapters choose the text (the Kafka adapter uses `topic/partition`, the Kinesis adapter the
/// shard id); the runtime and the stores treat it as opaque. Cloning is a reference-count bump.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId(Arc<str>);

impl PartitionId {
    /// A partition id from its text.
    pub fn new(id: impl AsRef<str>) -> Self {
        PartitionId(Arc::from(id.as_ref()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl From<&str> for PartitionId {
    fn from(s: &str) -> Self {
        PartitionId::new(s)
    }
}

impl From<String> for PartitionId {
    fn from(s: String) -> Self {
        PartitionId(Arc::from(s))
    }
}

impl serde::Serialize for PartitionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for PartitionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(PartitionId::from)
    }
}

/// The key under which a record is deduplicated, here and by the next hop.
///
/// Sinks forward it downstream (Kafka header, RabbitMQ `message_id`, …).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Bytes);

impl IdempotencyKey {
    /// A key from bytes.
    pub fn new(key: impl Into<Bytes>) -> Self {
        IdempotencyKey(key.into())
    }

    /// A key derived from a record's partition and position: unique for replayable sources.
    ///
    /// Encoded as `partition`, `@`, then the position: 16 big-endian bytes when it fits in a
    /// `u128`, else its decimal text. Built without formatting (this runs once per record).
    pub fn from_position(partition: &PartitionId, position: &Position) -> Self {
        let p = partition.as_str().as_bytes();
        let mut v = Vec::with_capacity(p.len() + 17);
        v.extend_from_slice(p);
        v.push(b'@');
        match position.as_u128() {
            Some(n) => v.extend_from_slice(&n.to_be_bytes()),
            None => v.extend_from_slice(position.to_string().as_bytes()),
        }
        IdempotencyKey(Bytes::from(v))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key as `Bytes` (cheap clone).
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "IdempotencyKey({s:?})"),
            Err(_) => write!(f, "IdempotencyKey({:?})", &self.0[..]),
        }
    }
}

/// One record header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub name: Arc<str>,
    /// Header value.
    pub value: Bytes,
}

/// A record's headers, in order; names may repeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<Header>);

impl Headers {
    /// No headers (does not allocate).
    pub const fn new() -> Self {
        Headers(Vec::new())
    }

    /// Appends a header.
    pub fn push(&mut self, name: impl AsRef<str>, value: impl Into<Bytes>) {
        self.0.push(Header {
            name: Arc::from(name.as_ref()),
            value: value.into(),
        });
    }

    /// Replaces every header of that name with one value.
    pub fn set(&mut self, name: impl AsRef<str>, value: impl Into<Bytes>) {
        let name = name.as_ref();
        self.0.retain(|h| &*h.name != name);
        self.push(name, value);
    }

    /// The first value of a header.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.0.iter().find(|h| &*h.name == name).map(|h| &h.value)
    }

    /// Iterates over the headers in order.
    pub fn iter(&self) -> impl Iterator<Item = &Header> {
        self.0.iter()
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn byte_size(&self) -> usize {
        self.0
            .iter()
            .map(|h| h.name.len() + h.value.len() + 16)
            .sum()
    }
}

impl FromIterator<(String, Bytes)> for Headers {
    fn from_iter<T: IntoIterator<Item = (String, Bytes)>>(iter: T) -> Self {
        Headers(
            iter.into_iter()
                .map(|(n, v)| Header {
                    name: Arc::from(n),
                    value: v,
                })
                .collect(),
        )
    }
}

/// One record read from a source or written to a sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The partition it was read from (or is routed to).
    pub partition: PartitionId,
    /// Its position in that partition.
    pub position: Position,
    /// The broker key (Kafka key, Kinesis partition key, RabbitMQ routing key).
    pub key: Option<Bytes>,
    /// The payload.
    pub payload: Bytes,
    /// Headers (Kafka headers, AMQP headers).
    pub headers: Headers,
    /// When the broker (or producer) stamped it; used for end-to-end latency.
    pub timestamp: Option<SystemTime>,
    /// The key used for deduplication, set by the source or the pipeline's extractor.
    pub idempotency_key: Option<IdempotencyKey>,
    /// The broker says this record may have been delivered before (RabbitMQ `redelivered`).
    pub redelivered: bool,
}

impl Record {
    /// A record with a payload at a position, everything else empty.
    pub fn new(partition: PartitionId, position: Position, payload: impl Into<Bytes>) -> Self {
        Record {
            partition,
            position,
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
            timestamp: None,
            idempotency_key: None,
            redelivered: false,
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    /// Bytes this record accounts for in the runtime's memory budget: payload, key, headers
    /// and a fixed overhead for the struct itself.
    pub fn byte_size(&self) -> usize {
        const OVERHEAD: usize = std::mem::size_of::<Record>();
        OVERHEAD
            + self.payload.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + if self.headers.is_empty() {
                0
            } else {
                self.headers.byte_size()
            }
    }
}
