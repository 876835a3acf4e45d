//! DynamoDB checkpoint, dedup and lease store, shared by every worker of a pipeline.
//!
//! One table (created on demand when `create_table` is set) with a string partition key `pk`
//! and a string sort key `sk`. Several pipelines, or several deployments with different
//! `key_prefix`es, share it:
//!
//! | item | `pk` | `sk` | attributes |
//! |---|---|---|---|
//! | a partition of a pipeline | `<prefix>p#<pipeline>` | partition id | checkpoint `cp_pos` (S, hex of the order-preserving position bytes), `cp_fence` (N, -1 for none); lease `lease_epoch`, `lease_counter`, `lease_ttl_ms` (N), `lease_owner` (S, absent when not held), `lease_finished` (BOOL) |
//! | a dedup mark | `<prefix>d#<pipeline>#<hex key>` | `m` | `expires_at` (N, seconds: the table's TTL attribute), `expires_ms` (N) |
//!
//! - Checkpoints: conditional writes, compare-and-set on position and fence, and on the
//!   partition's lease epoch (the checkpoint and the lease share one item). A commit of several
//!   checkpoints is one `TransactWriteItems` (all or none, up to 100 per transaction).
//! - Leases: conditional updates on epoch and counter. Expiry is judged the way the AWS KCL
//!   judges it, by the reader's monotonic clock: a lease expires for a worker once it has seen
//!   the same counter for the lease's ttl, so no two machines' clocks need to agree. A worker
//!   that has never seen a lease waits one ttl before it can take it.
//! - Dedup marks: one item per mark; `seen` ignores marks past `expires_ms` by this machine's
//!   clock; DynamoDB's TTL deletes them later (within days, on AWS).
//! - Throttling (`ProvisionedThroughputExceededException`, `ThrottlingException`,
//!   `RequestLimitExceeded`, unprocessed batch items) and lost connections are retried with
//!   backoff until `give_up_after` and counted (`flowgate_store_throttled_total`); then the
//!   call fails as `Throttled` or `Transient`, never as a lost write. Refused credentials or a
//!   missing permission fail at once as a config error naming the table and the action.

mod checkpoints;
mod client;
mod dedup;
mod kcl;
mod leases;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use flowgate_core::{Error, ErrorKind, IdempotencyKey};
use serde::{Deserialize, Serialize};

use crate::rules;

pub use kcl::{KclCheckpoint, KclLease, read_kcl_leases};

/// Settings of the [`DynamoDbStore`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoDbConfig {
    /// Table name. Default `flowgate`.
    pub table: String,
    /// Prefix of every key flowgate writes, for a table shared by several deployments.
    /// Default empty.
    pub key_prefix: String,
    /// Create the table (on-demand capacity, TTL on `expires_at`) when it does not exist.
    /// Default `true`; needs `dynamodb:CreateTable` and `dynamodb:UpdateTimeToLive`.
    pub create_table: bool,
    /// AWS region; `None` takes it from the environment (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Endpoint override (moto's `http://127.0.0.1:5000`); `None` uses AWS.
    pub endpoint_url: Option<String>,
    /// Static access key id; `None` uses the default credential chain (environment, profile,
    /// SSO, web identity, instance metadata).
    pub access_key_id: Option<String>,
    /// Static secret access key (with `access_key_id`); never logged.
    pub secret_access_key: Option<String>,
    /// How long an operation keeps retrying throttling and lost connections. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// Timeout of one API call. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
}

impl Default for DynamoDbConfig {
    fn default() -> Self {
        DynamoDbConfig {
            table: "flowgate".into(),
            key_prefix: String::new(),
            create_table: true,
            region: None,
            endpoint_url: None,
            access_key_id: None,
            secret_access_key: None,
            give_up_after: Duration::from_secs(30),
            call_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for DynamoDbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbConfig")
            .field("table", &self.table)
            .field("key_prefix", &self.key_prefix)
            .field("create_table", &self.create_table)
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("give_up_after", &self.give_up_after)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

const PK: &str = "pk";
const SK: &str = "sk";
const CP_POS: &str = "cp_pos";
const CP_FENCE: &str = "cp_fence";
const EXPIRES_AT: &str = "expires_at";
const EXPIRES_MS: &str = "expires_ms";

/// DynamoDB store: checkpoints with fencing, dedup marks with TTL, leases. See the module docs.
pub struct DynamoDbStore {
    cfg: DynamoDbConfig,
    client: Client,
    throttles: AtomicU64,
    calls: AtomicU64,
    seen_leases: leases::Observations,
}

/// A DynamoDB item.
type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn get_n<T: std::str::FromStr>(item: &Item, name: &str) -> Option<T> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)?.as_s().ok().map(String::as_str)
}

impl DynamoDbStore {
    /// Connects, checks the table (creating it when allowed), retrying until `give_up_after`.
    ///
    /// ```no_run
    /// use flowgate_checkpoint::{DynamoDbConfig, DynamoDbStore};
    ///
    /// # async fn demo() -> Result<(), flowgate_core::Error> {
    /// // The standard credential chain, table `flowgate` in eu-west-1 (created if missing).
    /// let store = DynamoDbStore::connect(DynamoDbConfig {
    ///     region: Some("eu-west-1".into()),
    ///     ..Default::default()
    /// })
    /// .await?;
    /// # let _ = store;
    /// # Ok(()) }
    /// ```
    pub async fn connect(cfg: DynamoDbConfig) -> Result<Arc<Self>, Error> {
        if cfg.table.is_empty() {
            return Err(Error::config("dynamodb store: the table name is empty")
                .with_context("key", "store.table"));
        }
        let store = DynamoDbStore {
            client: client::build(&cfg).await,
            cfg,
            throttles: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            seen_leases: leases::Observations::default(),
        };
        store.ensure_table().await?;
        Ok(Arc::new(store))
    }

    /// How many calls were throttled (and retried) since the store was opened.
    pub fn throttles(&self) -> u64 {
        self.throttles.load(Ordering::Relaxed)
    }

    /// How many DynamoDB API calls the store made since it was opened, retries included (what
    /// AWS bills and what a table's capacity must carry).
    pub fn api_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub(super) fn describe_table(&self) -> String {
        let endpoint = self.cfg.endpoint_url.as_deref().unwrap_or("AWS");
        if self.cfg.key_prefix.is_empty() {
            format!("dynamodb table {} ({endpoint})", self.cfg.table)
        } else {
            format!(
                "dynamodb table {} ({endpoint}, key prefix {})",
                self.cfg.table, self.cfg.key_prefix
            )
        }
    }

    pub(super) fn partitions_key(&self, pipeline: &str) -> String {
        format!("{}p#{pipeline}", self.cfg.key_prefix)
    }

    pub(super) fn mark_key(&self, pipeline: &str, key: &IdempotencyKey) -> String {
        format!(
            "{}d#{pipeline}#{}",
            self.cfg.key_prefix,
            hex(key.as_bytes())
        )
    }

    pub(super) fn item_key(&self, pipeline: &str, partition: &str) -> Item {
        HashMap::from([
            (PK.to_string(), s(self.partitions_key(pipeline))),
            (SK.to_string(), s(partition)),
        ])
    }

    /// Every item of a pipeline's partitions (checkpoints and leases), read consistently.
    pub(super) async fn partition_items(&self, pipeline: &str) -> Result<Vec<Item>, Error> {
        let pk = self.partitions_key(pipeline);
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .call("reading partitions", || {
                    self.client
                        .query()
                        .table_name(&self.cfg.table)
                        .consistent_read(true)
                        .key_condition_expression("pk = :pk")
                        .expression_attribute_values(":pk", s(pk.clone()))
                        .set_exclusive_start_key(start.clone())
                        .send()
                })
                .await?
                .map_err(|e| self.failed("reading partitions", e))?;
            items.extend(page.items().iter().cloned());
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(items),
            }
        }
    }

    /// One partition's item, read consistently.
    pub(super) async fn partition_item(
        &self,
        pipeline: &str,
        partition: &str,
    ) -> Result<Option<Item>, Error> {
        let key = self.item_key(pipeline, partition);
        let out = self
            .call("reading a partition", || {
                self.client
                    .get_item()
                    .table_name(&self.cfg.table)
                    .consistent_read(true)
                    .set_key(Some(key.clone()))
                    .send()
            })
            .await?
            .map_err(|e| self.failed("reading a partition", e))?;
        Ok(out.item().cloned())
    }

    pub(super) fn corrupt(&self, pipeline: &str, partition: &str, what: &str) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!("dynamodb store: a stored {what} cannot be read"),
        )
        .with_context("store", self.describe_table())
        .with_context("pk", self.partitions_key(pipeline))
        .with_context("sk", partition)
        .with_hint("the item was not written by flowgate (or by another version); remove it, or reset the partition with `flowgate checkpoints reset`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::Position;

    #[test]
    fn positions_keep_their_order_as_hex_text() {
        let big =
            Position::parse_decimal("49590338271490256608559692538361571095921575989136588898")
                .unwrap();
        let positions = [
            Position::from(0u64),
            Position::from(255u64),
            Position::from(256u64),
            Position::new(u128::MAX),
            big,
        ];
        let encoded: Vec<String> = positions
            .iter()
            .map(|p| hex(&p.to_ordered_bytes()))
            .collect();
        for w in encoded.windows(2) {
            assert!(w[0] < w[1], "{} < {}", w[0], w[1]);
        }
        for (p, e) in positions.iter().zip(&encoded) {
            assert_eq!(
                Position::from_ordered_bytes(&unhex(e).unwrap()).as_ref(),
                Some(p)
            );
        }
    }

    #[test]
    fn the_secret_never_appears_in_debug() {
        let cfg = DynamoDbConfig {
            secret_access_key: Some("s3cret".into()),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }
}
