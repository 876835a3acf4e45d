//! Kafka messages as flowgate records, and the partition ids the adapter uses
//! (`topic/partition`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flowgate_core::{Headers, PartitionId, Position, Record};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers as _};

pub(crate) type Key = (String, i32);

/// `topic/partition`, the partition id the Kafka adapter uses.
pub fn partition_id(topic: &str, partition: i32) -> PartitionId {
    PartitionId::new(format!("{topic}/{partition}"))
}

pub(crate) fn parse_partition_id(p: &PartitionId) -> Option<Key> {
    let (topic, part) = p.as_str().rsplit_once('/')?;
    Some((topic.to_string(), part.parse().ok()?))
}

/// A flowgate record from the parts of a Kafka message.
pub(crate) fn record(
    id: &PartitionId,
    offset: i64,
    key: Option<Bytes>,
    payload: Bytes,
    headers: Headers,
    timestamp_ms: Option<i64>,
) -> Option<Record> {
    let timestamp = timestamp_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms as u64));
    Some(Record {
        partition: id.clone(),
        position: Position::from_offset(offset)?,
        key,
        payload,
        headers,
        timestamp: timestamp.or_else(|| Some(SystemTime::now())),
        idempotency_key: None,
        redelivered: false,
    })
}

/// A flowgate record from a message of the main queue (payload, key and headers copied).
pub(crate) fn to_record(m: &BorrowedMessage<'_>, id: &PartitionId) -> Option<Record> {
    let mut headers = Headers::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            headers.push(h.key, Bytes::copy_from_slice(h.value.unwrap_or_default()));
        }
    }
    record(
        id,
        m.offset(),
        m.key().map(Bytes::copy_from_slice),
        Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        headers,
        m.timestamp().to_millis().filter(|ms| *ms >= 0),
    )
}
