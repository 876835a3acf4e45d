//! Records aggregated by the Kinesis Producer Library (KPL), split into their user records.
//!
//! An aggregated Kinesis record is the magic bytes `F3 89 9A C2`, a protobuf
//! `AggregatedRecord` (a table of partition keys and the user records, each naming its key by
//! index), and the MD5 of that protobuf. Anything else — or an aggregate whose checksum or
//! protobuf does not check out — is a plain record, as the KCL treats it.
//!
//! Every record of a shard gets the position `sequence number × 2^20 + sub-sequence number`
//! (0 for a plain record), so each user record of an aggregate has a position of its own, in
//! order, and checkpoints and dedup by position work per user record. A resumed reader asks
//! for the iterator *at* the checkpoint's sequence number and drops what it already had, so
//! it neither repeats nor skips the sub-records after a checkpoint inside an aggregate.

use bytes::Bytes;
use flowgate_core::Position;
use md5::{Digest, Md5};
use num_bigint::BigUint;
use prost::Message;

/// The first four bytes of every KPL aggregate.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Sub-records per aggregate that positions leave room for (2^20; a 1 MiB record holds far
/// fewer: each user record costs at least a few bytes of protobuf).
pub const SUB_SEQUENCE_LIMIT: u64 = 1 << 20;

/// The KPL's `AggregatedRecord` message.
#[derive(Clone, PartialEq, Message)]
pub struct AggregatedRecord {
    /// Partition keys, referenced by index.
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    /// Explicit hash keys, referenced by index.
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    /// The user records.
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<UserRecord>,
}

/// One user record inside an [`AggregatedRecord`].
#[derive(Clone, PartialEq, Message)]
pub struct UserRecord {
    /// Index into `partition_key_table`.
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    /// Index into `explicit_hash_key_table`.
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    /// The payload.
    #[prost(bytes = "bytes", required, tag = "3")]
    pub data: Bytes,
}

/// A user record taken out of a Kinesis record: its sub-sequence number, key and payload.
#[derive(Debug, PartialEq)]
pub struct Part {
    /// 0 for a plain record, else the index inside the aggregate.
    pub sub_sequence: u64,
    /// The user record's partition key (the Kinesis record's own for a plain record).
    pub partition_key: Bytes,
    /// The payload.
    pub data: Bytes,
}

/// The user records of one Kinesis record: itself if it is not a well-formed aggregate.
pub fn split(data: Bytes, partition_key: Bytes) -> Vec<Part> {
    match decode(&data) {
        Some(agg) => agg
            .records
            .into_iter()
            .enumerate()
            .map(|(i, r)| Part {
                sub_sequence: i as u64,
                partition_key: usize::try_from(r.partition_key_index)
                    .ok()
                    .and_then(|k| agg.partition_key_table.get(k))
                    .map_or_else(|| partition_key.clone(), |k| Bytes::from(k.clone())),
                data: r.data,
            })
            .collect(),
        None => vec![Part {
            sub_sequence: 0,
            partition_key,
            data,
        }],
    }
}

/// The aggregate in `data`, if it is one: magic, protobuf, and a matching MD5; and no more
/// user records than positions leave room for.
fn decode(data: &[u8]) -> Option<AggregatedRecord> {
    let body = data.strip_prefix(&MAGIC)?;
    if body.len() < 16 {
        return None;
    }
    let (proto, digest) = body.split_at(body.len() - 16);
    if Md5::digest(proto).as_slice() != digest {
        return None;
    }
    let agg = AggregatedRecord::decode(proto).ok()?;
    let fits = (agg.records.len() as u64) <= SUB_SEQUENCE_LIMIT && !agg.records.is_empty();
    fits.then_some(agg)
}

/// An aggregate of `records` (partition key, payload), as the KPL writes it: for tests and
/// for producers that batch the KPL way.
pub fn aggregate(records: &[(&str, &[u8])]) -> Bytes {
    let mut keys: Vec<String> = Vec::new();
    let mut user = Vec::with_capacity(records.len());
    for (key, data) in records {
        let index = match keys.iter().position(|k| k == key) {
            Some(i) => i,
            None => {
                keys.push((*key).to_string());
                keys.len() - 1
            }
        };
        user.push(UserRecord {
            partition_key_index: index as u64,
            explicit_hash_key_index: None,
            data: Bytes::copy_from_slice(data),
        });
    }
    let proto = AggregatedRecord {
        partition_key_table: keys,
        explicit_hash_key_table: Vec::new(),
        records: user,
    }
    .encode_to_vec();
    let mut out = Vec::with_capacity(4 + proto.len() + 16);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&proto);
    out.extend_from_slice(Md5::digest(&proto).as_slice());
    Bytes::from(out)
}

/// The position of sub-record `sub_sequence` of the Kinesis record `sequence_number`.
pub fn position(sequence_number: &str, sub_sequence: u64) -> Option<Position> {
    let seq = BigUint::parse_bytes(sequence_number.as_bytes(), 10)?;
    let value = seq * BigUint::from(SUB_SEQUENCE_LIMIT) + BigUint::from(sub_sequence);
    Position::parse_decimal(&value.to_str_radix(10)).ok()
}

/// The Kinesis sequence number and sub-sequence number of a position.
pub fn sequence_of(position: &Position) -> Option<(String, u64)> {
    let value = BigUint::parse_bytes(position.to_string().as_bytes(), 10)?;
    let limit = BigUint::from(SUB_SEQUENCE_LIMIT);
    let seq = &value / &limit;
    let sub = u64::try_from(&value % &limit).ok()?;
    Some((seq.to_str_radix(10), sub))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_aggregate_splits_into_its_user_records_with_their_keys() {
        let agg = aggregate(&[("a", b"one"), ("b", b"two"), ("a", b"three")]);
        let parts = split(agg, Bytes::from_static(b"outer"));
        let got: Vec<(u64, &[u8], &[u8])> = parts
            .iter()
            .map(|p| (p.sub_sequence, &p.partition_key[..], &p.data[..]))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, &b"a"[..], &b"one"[..]),
                (1, &b"b"[..], &b"two"[..]),
                (2, &b"a"[..], &b"three"[..])
            ]
        );
    }

    #[test]
    fn a_plain_record_or_a_broken_aggregate_passes_as_one_record() {
        for data in [
            Bytes::from_static(b"plain payload"),
            Bytes::from_static(&MAGIC),
            {
                let mut bad = aggregate(&[("a", b"one")]).to_vec();
                let last = bad.len() - 1;
                bad[last] ^= 1; // checksum no longer matches
                Bytes::from(bad)
            },
        ] {
            let parts = split(data.clone(), Bytes::from_static(b"k"));
            assert_eq!(parts.len(), 1);
            assert_eq!(parts[0].data, data);
            assert_eq!(parts[0].sub_sequence, 0);
        }
    }

    proptest! {
        #[test]
        fn positions_order_by_sequence_then_sub_sequence_and_round_trip(
            a in "[1-9][0-9]{0,55}", b in "[1-9][0-9]{0,55}",
            sa in 0u64..SUB_SEQUENCE_LIMIT, sb in 0u64..SUB_SEQUENCE_LIMIT,
        ) {
            let (pa, pb) = (position(&a, sa).unwrap(), position(&b, sb).unwrap());
            let (na, nb) = (
                BigUint::parse_bytes(a.as_bytes(), 10).unwrap(),
                BigUint::parse_bytes(b.as_bytes(), 10).unwrap(),
            );
            prop_assert_eq!(pa.cmp(&pb), (na, sa).cmp(&(nb, sb)));
            prop_assert_eq!(sequence_of(&pa).unwrap(), (a.clone(), sa));
        }
    }
}
