//! Reading an AWS KCL (2.x / 3.x) lease table, to continue a Kinesis application's work
//! where its KCL workers left it.
//!
//! A KCL lease item: `leaseKey` (the shard id, or `account:stream:creation-epoch:shard-id` for
//! a multi-stream application), `checkpoint` (the last processed sequence number, or
//! `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`, `SHARD_END`), `checkpointSubSequenceNumber` (the
//! KPL sub-record within it), `leaseOwner`, `leaseCounter` (raised by every renewal) and
//! `parentShardId` (a string set).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use flowgate_core::Error;

use super::{DynamoDbConfig, DynamoDbStore, get_n, get_s};

/// Where a KCL application stands in a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KclCheckpoint {
    /// The last processed record: its sequence number and KPL sub-sequence number.
    Sequence {
        /// The record's sequence number.
        sequence_number: String,
        /// Its sub-record within a KPL aggregate (0 for a plain record).
        sub_sequence: u64,
    },
    /// The shard was processed to its end (closed by resharding).
    ShardEnd,
    /// Nothing processed yet; KCL would start at the oldest record.
    TrimHorizon,
    /// Nothing processed yet; KCL would start at the newest record.
    Latest,
    /// Nothing processed yet; KCL would start at a timestamp.
    AtTimestamp,
}

/// One lease of a KCL lease table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KclLease {
    /// The item's `leaseKey`.
    pub lease_key: String,
    /// The shard id (`shardId-000000000001`).
    pub shard_id: String,
    /// The stream, for a multi-stream application's lease (`None` otherwise).
    pub stream: Option<String>,
    /// Where the application stands.
    pub checkpoint: KclCheckpoint,
    /// The worker holding the lease, if any.
    pub owner: Option<String>,
    /// `leaseCounter`: raised by every renewal, so a changing counter means a live worker.
    pub counter: u64,
    /// The shards this one was split or merged from.
    pub parents: Vec<String>,
}

impl KclLease {
    fn decode(item: &HashMap<String, AttributeValue>) -> Result<KclLease, String> {
        let lease_key = get_s(item, "leaseKey").ok_or("no leaseKey")?.to_string();
        let (stream, shard_id) = match lease_key.split(':').collect::<Vec<_>>()[..] {
            [_account, stream, _epoch, shard] => (Some(stream.to_string()), shard.to_string()),
            _ => (None, lease_key.clone()),
        };
        let checkpoint = match get_s(item, "checkpoint").ok_or("no checkpoint")? {
            "SHARD_END" => KclCheckpoint::ShardEnd,
            "TRIM_HORIZON" => KclCheckpoint::TrimHorizon,
            "LATEST" => KclCheckpoint::Latest,
            "AT_TIMESTAMP" => KclCheckpoint::AtTimestamp,
            seq if !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()) => {
                KclCheckpoint::Sequence {
                    sequence_number: seq.to_string(),
                    sub_sequence: get_n(item, "checkpointSubSequenceNumber").unwrap_or(0),
                }
            }
            other => {
                return Err(format!(
                    "checkpoint {other:?} is neither a sequence number nor a KCL sentinel"
                ));
            }
        };
        let parents = match item.get("parentShardId") {
            Some(AttributeValue::Ss(set)) => set.clone(),
            Some(AttributeValue::S(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        Ok(KclLease {
            lease_key,
            shard_id,
            stream,
            checkpoint,
            owner: get_s(item, "leaseOwner").map(str::to_string),
            counter: get_n(item, "leaseCounter").unwrap_or(0),
            parents,
        })
    }
}

/// Every lease of the KCL lease table `table`, reached with `cfg`'s region, endpoint and
/// credentials (its `table` and `key_prefix` are not used), sorted by lease key.
pub async fn read_kcl_leases(cfg: &DynamoDbConfig, table: &str) -> Result<Vec<KclLease>, Error> {
    // A store handle on the KCL table, for its retries and error mapping; the table is read,
    // never created or written.
    let reader = DynamoDbStore {
        client: super::client::build(cfg).await,
        cfg: DynamoDbConfig {
            table: table.to_string(),
            create_table: false,
            ..cfg.clone()
        },
        throttles: Default::default(),
        calls: Default::default(),
        seen_leases: Default::default(),
    };
    let mut leases = Vec::new();
    let mut start = None;
    loop {
        let page = reader
            .call("reading the KCL lease table", || {
                reader
                    .client
                    .scan()
                    .table_name(table)
                    .consistent_read(true)
                    .set_exclusive_start_key(start.clone())
                    .send()
            })
            .await?
            .map_err(|e| {
                let missing = aws_sdk_dynamodb::error::ProvideErrorMetadata::code(&e)
                    == Some("ResourceNotFoundException");
                if missing {
                    Error::config("the KCL lease table does not exist")
                        .with_context("table", table)
                        .with_hint("pass the KCL application's lease table: by default it is named after the application (`applicationName`)")
                } else {
                    reader.failed("reading the KCL lease table", e)
                }
            })?;
        for item in page.items() {
            let lease = KclLease::decode(item).map_err(|why| {
                Error::config("an item of the KCL lease table is not a KCL lease")
                    .with_context("table", table)
                    .with_context("item", get_s(item, "leaseKey").unwrap_or("(no leaseKey)"))
                    .with_context("why", why)
            })?;
            leases.push(lease);
        }
        match page.last_evaluated_key() {
            Some(k) if !k.is_empty() => start = Some(k.clone()),
            _ => break,
        }
    }
    leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn kcl_items_decode_as_kcl_writes_them() {
        let s = |v: &str| AttributeValue::S(v.into());
        let n = |v: u64| AttributeValue::N(v.to_string());
        let child = item(&[
            ("leaseKey", s("shardId-000000000002")),
            (
                "checkpoint",
                s("49590338271490256608559692538361571095921575989136588898"),
            ),
            ("checkpointSubSequenceNumber", n(3)),
            ("leaseOwner", s("worker-1")),
            ("leaseCounter", n(42)),
            (
                "parentShardId",
                AttributeValue::Ss(vec!["shardId-000000000000".into()]),
            ),
        ]);
        let lease = KclLease::decode(&child).unwrap();
        assert_eq!(lease.shard_id, "shardId-000000000002");
        assert_eq!(lease.parents, vec!["shardId-000000000000".to_string()]);
        assert_eq!(
            lease.checkpoint,
            KclCheckpoint::Sequence {
                sequence_number: "49590338271490256608559692538361571095921575989136588898".into(),
                sub_sequence: 3
            }
        );
        assert_eq!(
            (lease.owner.as_deref(), lease.counter),
            (Some("worker-1"), 42)
        );

        let multi = item(&[
            (
                "leaseKey",
                s("123456789012:orders:1700000000:shardId-000000000001"),
            ),
            ("checkpoint", s("SHARD_END")),
        ]);
        let lease = KclLease::decode(&multi).unwrap();
        assert_eq!(lease.stream.as_deref(), Some("orders"));
        assert_eq!(lease.shard_id, "shardId-000000000001");
        assert_eq!(lease.checkpoint, KclCheckpoint::ShardEnd);

        let odd = item(&[("leaseKey", s("x")), ("checkpoint", s("12ab"))]);
        assert!(KclLease::decode(&odd).is_err());
    }
}
