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

mod kcl;
mod leases;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes,
    PutRequest, ScalarAttributeType, TableStatus, TimeToLiveSpecification, TransactWriteItem,
    Update, WriteRequest,
};
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, Error, ErrorKind, IdempotencyKey, PartitionId,
    Position,
};
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
/// Items per `TransactWriteItems`, `BatchGetItem` and `BatchWriteItem` (DynamoDB's limits).
const TRANSACTION_ITEMS: usize = 100;
const BATCH_GET_ITEMS: usize = 100;
const BATCH_WRITE_ITEMS: usize = 25;

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

/// How a failed call is handled.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Throttled: retry with backoff, count it.
    Throttled,
    /// Connection lost, timeout, a 5xx: retry with backoff.
    Transient,
    /// Wrong credentials or a missing permission: no retry.
    Denied,
    /// Anything else (a failed condition, a validation error): the caller decides.
    Other,
}

fn classify<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Failure {
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure::Transient
        }
        SdkError::ServiceError(_) => classify_code(e.code()),
        _ => Failure::Other,
    }
}

fn classify_code(code: Option<&str>) -> Failure {
    match code.unwrap_or_default() {
        "ProvisionedThroughputExceededException"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "Throttling" => Failure::Throttled,
        "InternalServerError" | "ServiceUnavailable" | "InternalFailure" => Failure::Transient,
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "MissingAuthenticationTokenException"
        | "ExpiredTokenException"
        | "IncompleteSignature" => Failure::Denied,
        _ => Failure::Other,
    }
}

/// The AWS client. The SDK's own retries are off: the store retries with its own backoff and
/// counts throttling, which the SDK would hide.
async fn client(cfg: &DynamoDbConfig) -> Client {
    let mut loader = aws_config::from_env()
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(cfg.call_timeout)
                .connect_timeout(Duration::from_secs(3))
                .build(),
        );
    if let Some(region) = &cfg.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &cfg.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
        loader = loader.credentials_provider(Credentials::new(
            id.clone(),
            secret.clone(),
            None,
            None,
            "flowgate-config",
        ));
    }
    Client::new(&loader.load().await)
}

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

/// A fence as stored: -1 for none, so that "no fence" orders below every fence.
fn fence_value(fence: Option<u64>) -> i128 {
    fence.map_or(-1, i128::from)
}

/// The checkpoint an item holds, `None` if it holds none, `Err` if it cannot be read.
fn decode_checkpoint(item: &Item) -> Result<Option<Checkpoint>, ()> {
    let Some(pos) = item.get(CP_POS) else {
        return Ok(None);
    };
    let partition = get_s(item, SK).ok_or(())?;
    let position = pos
        .as_s()
        .ok()
        .and_then(|p| unhex(p))
        .and_then(|b| Position::from_ordered_bytes(&b))
        .ok_or(())?;
    let fence: i128 = get_n(item, CP_FENCE).ok_or(())?;
    Ok(Some(
        Checkpoint::new(PartitionId::new(partition), position)
            .with_fence(u64::try_from(fence).ok()),
    ))
}

impl DynamoDbStore {
    /// Connects, checks the table (creating it when allowed), retrying until `give_up_after`.
    pub async fn connect(cfg: DynamoDbConfig) -> Result<Arc<Self>, Error> {
        if cfg.table.is_empty() {
            return Err(Error::config("dynamodb store: the table name is empty")
                .with_context("key", "store.table"));
        }
        let store = DynamoDbStore {
            client: client(&cfg).await,
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

    fn describe_table(&self) -> String {
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

    fn partitions_key(&self, pipeline: &str) -> String {
        format!("{}p#{pipeline}", self.cfg.key_prefix)
    }

    fn mark_key(&self, pipeline: &str, key: &IdempotencyKey) -> String {
        format!(
            "{}d#{pipeline}#{}",
            self.cfg.key_prefix,
            hex(key.as_bytes())
        )
    }

    fn item_key(&self, pipeline: &str, partition: &str) -> Item {
        HashMap::from([
            (PK.to_string(), s(self.partitions_key(pipeline))),
            (SK.to_string(), s(partition)),
        ])
    }

    /// Runs `op`, retrying throttling and lost connections with backoff until `give_up_after`.
    /// `Ok(Err(e))`: the service answered with an error the caller handles (a failed
    /// condition); `Err`: gave up, or refused credentials.
    async fn call<T, E, R, F, Fut>(
        &self,
        what: &'static str,
        mut op: F,
    ) -> Result<Result<T, SdkError<E, R>>, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let started = Instant::now();
        let mut backoff = crate::store_backoff(self.cfg.give_up_after).start();
        loop {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let e = match op().await {
                Ok(v) => {
                    crate::record_latency("dynamodb", what, started);
                    return Ok(Ok(v));
                }
                Err(e) => e,
            };
            let failure = classify(&e);
            let kind = match failure {
                Failure::Other => return Ok(Err(e)),
                Failure::Denied => return Err(self.denied(what, e)),
                Failure::Throttled => {
                    self.count_throttle();
                    ErrorKind::Throttled
                }
                Failure::Transient => ErrorKind::Transient,
            };
            if let Some(wait) = backoff.next_delay() {
                tracing::warn!(error = %aws_sdk_dynamodb::error::DisplayErrorContext(&e), retry_in = ?wait, "dynamodb store: {what} failed; retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(Error::new(kind, format!("dynamodb store: {what} failed"))
                .with_context("store", self.describe_table())
                .with_context("retried_for", format!("{:?}", backoff.elapsed()))
                .with_source(e)
                .with_hint(if kind == ErrorKind::Throttled {
                    "the table's capacity is too low for this load: switch it to on-demand capacity or raise its write/read capacity"
                } else {
                    "check that the endpoint is reachable and the region is right"
                }));
        }
    }

    fn count_throttle(&self) {
        self.throttles.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::STORE_THROTTLES, "store" => "dynamodb").increment(1);
    }

    fn denied(&self, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::config(format!(
            "dynamodb store: {what} was refused: the credentials are wrong or lack a permission"
        ))
        .with_context("store", self.describe_table())
        .with_source(e)
        .with_hint(format!(
            "grant dynamodb:GetItem, PutItem, UpdateItem, DeleteItem, Query, BatchGetItem, BatchWriteItem, DescribeTable (and CreateTable, UpdateTimeToLive with store.create_table) on table {}",
            self.cfg.table
        ))
    }

    /// A service error the caller does not handle itself.
    fn failed(&self, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::new(ErrorKind::Fatal, format!("dynamodb store: {what} failed"))
            .with_context("store", self.describe_table())
            .with_source(e)
    }

    async fn ensure_table(&self) -> Result<(), Error> {
        let table = &self.cfg.table;
        let described = self
            .call("describing the table", || {
                self.client.describe_table().table_name(table).send()
            })
            .await?;
        match described {
            Ok(out) => {
                let t = out.table();
                let keys: Vec<(String, KeyType)> = t
                    .map(|t| t.key_schema())
                    .unwrap_or_default()
                    .iter()
                    .map(|k| (k.attribute_name().to_string(), k.key_type().clone()))
                    .collect();
                let expected = vec![
                    (PK.to_string(), KeyType::Hash),
                    (SK.to_string(), KeyType::Range),
                ];
                if keys != expected {
                    return Err(Error::config(
                        "dynamodb store: the table exists with another key schema",
                    )
                    .with_context("key", "store.table")
                    .with_context("table", table)
                    .with_context("key_schema", format!("{keys:?}"))
                    .with_hint("flowgate needs a string partition key `pk` and a string sort key `sk`; name another table in store.table"));
                }
                if t.and_then(|t| t.table_status()) != Some(&TableStatus::Active) {
                    self.wait_active().await?;
                }
                Ok(())
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                if !self.cfg.create_table {
                    return Err(Error::config("dynamodb store: the table does not exist")
                        .with_context("key", "store.table")
                        .with_context("table", table)
                        .with_hint("create it with a string partition key `pk` and a string sort key `sk` (docs/stores.md), or set store.create_table = true and grant dynamodb:CreateTable"));
                }
                self.create_table().await
            }
            Err(e) => Err(self.failed("describing the table", e)),
        }
    }

    async fn create_table(&self) -> Result<(), Error> {
        let table = &self.cfg.table;
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
        };
        let (pk_attr, sk_attr, pk_key, sk_key) = match (
            attr(PK),
            attr(SK),
            key(PK, KeyType::Hash),
            key(SK, KeyType::Range),
        ) {
            (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
            _ => {
                return Err(Error::new(
                    ErrorKind::Fatal,
                    "dynamodb store: building the table schema failed",
                ));
            }
        };
        let created = self
            .call("creating the table", || {
                self.client
                    .create_table()
                    .table_name(table)
                    .billing_mode(BillingMode::PayPerRequest)
                    .attribute_definitions(pk_attr.clone())
                    .attribute_definitions(sk_attr.clone())
                    .key_schema(pk_key.clone())
                    .key_schema(sk_key.clone())
                    .send()
            })
            .await?;
        match created {
            Ok(_) => tracing::info!(table = %table, "dynamodb store: created the table"),
            // Another worker created it at the same moment.
            Err(e) if e.code() == Some("ResourceInUseException") => {}
            Err(e) => return Err(self.failed("creating the table", e)),
        }
        self.wait_active().await?;
        let ttl = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(EXPIRES_AT)
            .build()
            .map_err(|e| self.failed("enabling TTL", e))?;
        let enabled = self
            .call("enabling TTL", || {
                self.client
                    .update_time_to_live()
                    .table_name(table)
                    .time_to_live_specification(ttl.clone())
                    .send()
            })
            .await?;
        if let Err(e) = enabled {
            // Marks still expire for flowgate (`seen` checks `expires_ms`); only the storage
            // of expired marks is not reclaimed.
            tracing::warn!(error = %aws_sdk_dynamodb::error::DisplayErrorContext(&e), table = %table, "dynamodb store: could not enable TTL on expires_at; expired dedup marks are ignored but not deleted");
        }
        Ok(())
    }

    async fn wait_active(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.cfg.give_up_after.max(Duration::from_secs(60));
        loop {
            let out = self
                .call("describing the table", || {
                    self.client
                        .describe_table()
                        .table_name(&self.cfg.table)
                        .send()
                })
                .await?
                .map_err(|e| self.failed("describing the table", e))?;
            if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(
                    Error::transient("dynamodb store: the table did not become active")
                        .with_context("table", &self.cfg.table),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every item of a pipeline's partitions (checkpoints and leases), read consistently.
    async fn partition_items(&self, pipeline: &str) -> Result<Vec<Item>, Error> {
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
    async fn partition_item(&self, pipeline: &str, partition: &str) -> Result<Option<Item>, Error> {
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

    fn corrupt(&self, pipeline: &str, partition: &str, what: &str) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!("dynamodb store: a stored {what} cannot be read"),
        )
        .with_context("store", self.describe_table())
        .with_context("pk", self.partitions_key(pipeline))
        .with_context("sk", partition)
        .with_hint("the item was not written by flowgate (or by another version); remove it, or reset the partition with `flowgate checkpoints reset`")
    }

    /// The checkpoint write of `cp`: compare-and-set on the stored checkpoint and the lease.
    fn checkpoint_update(&self, pipeline: &str, cp: &Checkpoint) -> Result<Update, Error> {
        Update::builder()
            .table_name(&self.cfg.table)
            .set_key(Some(self.item_key(pipeline, cp.partition.as_str())))
            .update_expression("SET cp_pos = :pos, cp_fence = :fence")
            .condition_expression(
                "(attribute_not_exists(lease_epoch) OR lease_epoch <= :fence) AND \
                 (attribute_not_exists(cp_pos) OR (cp_fence <= :fence AND cp_pos <= :pos))",
            )
            .expression_attribute_values(":pos", s(hex(&cp.position.to_ordered_bytes())))
            .expression_attribute_values(":fence", n(fence_value(cp.fence)))
            .build()
            .map_err(|e| self.failed("building a checkpoint write", e))
    }

    /// Why the write of `cp` was refused, from what is stored now.
    async fn refusal(&self, pipeline: &str, cp: &Checkpoint) -> Error {
        let item = match self.partition_item(pipeline, cp.partition.as_str()).await {
            Ok(item) => item.unwrap_or_default(),
            Err(e) => return e,
        };
        let epoch = get_n::<u64>(&item, leases::EPOCH);
        if let Err(e) = rules::check_lease_fence(epoch, cp) {
            return e;
        }
        let stored = match decode_checkpoint(&item) {
            Ok(stored) => stored,
            Err(()) => return self.corrupt(pipeline, cp.partition.as_str(), "checkpoint"),
        };
        rules::check(stored.as_ref(), cp).err().unwrap_or_else(|| {
            Error::new(ErrorKind::Fenced, "checkpoint write refused")
                .with_context("partition", &cp.partition)
        })
    }

    async fn commit_one(&self, pipeline: &str, cp: &Checkpoint) -> Result<(), Error> {
        let update = self.checkpoint_update(pipeline, cp)?;
        let out = self
            .call("committing a checkpoint", || {
                self.client
                    .update_item()
                    .table_name(update.table_name())
                    .set_key(Some(update.key().clone()))
                    .update_expression(update.update_expression())
                    .set_condition_expression(update.condition_expression().map(str::to_string))
                    .set_expression_attribute_values(update.expression_attribute_values().cloned())
                    .send()
            })
            .await?;
        match out {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                Err(self.refusal(pipeline, cp).await)
            }
            Err(e) => Err(self.failed("committing a checkpoint", e)),
        }
    }

    async fn commit_many(&self, pipeline: &str, cps: &[&Checkpoint]) -> Result<(), Error> {
        let items = cps
            .iter()
            .map(|cp| {
                let update = self.checkpoint_update(pipeline, cp)?;
                Ok(TransactWriteItem::builder().update(update).build())
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut backoff = crate::store_backoff(self.cfg.give_up_after).start();
        loop {
            let out = self
                .call("committing checkpoints", || {
                    self.client
                        .transact_write_items()
                        .set_transact_items(Some(items.clone()))
                        .send()
                })
                .await?;
            let e = match out {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let reasons: Vec<Option<String>> = e
                .as_service_error()
                .and_then(|se| match se {
                    TransactWriteItemsError::TransactionCanceledException(tc) => Some(tc),
                    _ => None,
                })
                .map(|tc| {
                    tc.cancellation_reasons()
                        .iter()
                        .map(|r| r.code().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(i) = reasons
                .iter()
                .position(|r| r.as_deref() == Some("ConditionalCheckFailed"))
            {
                return Err(self.refusal(pipeline, cps[i]).await);
            }
            // A transaction that met another on the same items, or throttling inside it.
            let retry = reasons.iter().flatten().any(|r| {
                r == "TransactionConflict" || classify_code(Some(r)) == Failure::Throttled
            });
            if retry {
                if let Some(wait) = backoff.next_delay() {
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            return Err(self.failed("committing checkpoints", e));
        }
    }
}

#[async_trait]
impl CheckpointStore for DynamoDbStore {
    fn describe(&self) -> String {
        self.describe_table()
    }

    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        let mut out = Vec::new();
        for item in self.partition_items(pipeline).await? {
            let partition = get_s(&item, SK).unwrap_or_default().to_string();
            match decode_checkpoint(&item) {
                Ok(Some(cp)) => out.push(cp),
                Ok(None) => {}
                Err(()) => return Err(self.corrupt(pipeline, &partition, "checkpoint")),
            }
        }
        out.sort_by(|a, b| a.partition.as_str().cmp(b.partition.as_str()));
        Ok(out)
    }

    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        // One write per partition (the furthest); a transaction may not touch an item twice.
        let mut latest: Vec<&Checkpoint> = Vec::with_capacity(checkpoints.len());
        for cp in checkpoints {
            match latest.iter_mut().find(|c| c.partition == cp.partition) {
                Some(c) if (c.position.clone(), c.fence) < (cp.position.clone(), cp.fence) => {
                    *c = cp
                }
                Some(_) => {}
                None => latest.push(cp),
            }
        }
        for chunk in latest.chunks(TRANSACTION_ITEMS) {
            match chunk {
                [] => {}
                [one] => self.commit_one(pipeline, one).await?,
                many => self.commit_many(pipeline, many).await?,
            }
        }
        Ok(())
    }

    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        let targets: Vec<String> = match partitions {
            Some(ps) => ps.iter().map(|p| p.as_str().to_string()).collect(),
            None => self
                .partition_items(pipeline)
                .await?
                .iter()
                .filter(|i| i.contains_key(CP_POS))
                .filter_map(|i| get_s(i, SK).map(str::to_string))
                .collect(),
        };
        for partition in targets {
            let key = self.item_key(pipeline, &partition);
            let out = self
                .call("resetting a checkpoint", || {
                    self.client
                        .update_item()
                        .table_name(&self.cfg.table)
                        .set_key(Some(key.clone()))
                        .update_expression("REMOVE cp_pos, cp_fence")
                        .condition_expression("attribute_exists(pk)")
                        .send()
                })
                .await?;
            match out {
                Ok(_) => {}
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {}
                Err(e) => return Err(self.failed("resetting a checkpoint", e)),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl DedupStore for DynamoDbStore {
    fn describe(&self) -> String {
        self.describe_table()
    }

    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error> {
        let names: Vec<String> = keys.iter().map(|k| self.mark_key(pipeline, k)).collect();
        let unique: Vec<&String> = {
            let mut seen = HashSet::new();
            names.iter().filter(|n| seen.insert(n.as_str())).collect()
        };
        let now = rules::now_ms();
        let mut live: HashSet<String> = HashSet::new();
        let mut backoff = crate::store_backoff(self.cfg.give_up_after).start();
        for chunk in unique.chunks(BATCH_GET_ITEMS) {
            let keys: Vec<Item> = chunk
                .iter()
                .map(|name| {
                    HashMap::from([(PK.to_string(), s(name.as_str())), (SK.to_string(), s("m"))])
                })
                .collect();
            let mut request = KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .consistent_read(true)
                .projection_expression("pk, expires_ms")
                .build()
                .map_err(|e| self.failed("checking dedup marks", e))?;
            loop {
                let out = self
                    .call("checking dedup marks", || {
                        self.client
                            .batch_get_item()
                            .request_items(&self.cfg.table, request.clone())
                            .send()
                    })
                    .await?
                    .map_err(|e| self.failed("checking dedup marks", e))?;
                for item in out
                    .responses()
                    .and_then(|r| r.get(&self.cfg.table))
                    .into_iter()
                    .flatten()
                {
                    if get_n::<u64>(item, EXPIRES_MS).is_some_and(|at| at > now) {
                        if let Some(pk) = get_s(item, PK) {
                            live.insert(pk.to_string());
                        }
                    }
                }
                match out.unprocessed_keys().and_then(|u| u.get(&self.cfg.table)) {
                    Some(rest) if !rest.keys().is_empty() => {
                        self.count_throttle();
                        request = rest.clone();
                        let wait = backoff.next_delay().ok_or_else(|| {
                            Error::throttled(
                                "dynamodb store: checking dedup marks stayed throttled",
                            )
                            .with_context("store", self.describe_table())
                        })?;
                        tokio::time::sleep(wait).await;
                    }
                    _ => break,
                }
            }
        }
        Ok(names.iter().map(|n| live.contains(n)).collect())
    }

    async fn mark(
        &self,
        pipeline: &str,
        keys: &[IdempotencyKey],
        ttl: Duration,
    ) -> Result<(), Error> {
        let expires_ms =
            rules::now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut names: Vec<String> = keys.iter().map(|k| self.mark_key(pipeline, k)).collect();
        names.sort_unstable();
        names.dedup();
        let mut backoff = crate::store_backoff(self.cfg.give_up_after).start();
        for chunk in names.chunks(BATCH_WRITE_ITEMS) {
            let mut writes: Vec<WriteRequest> = Vec::with_capacity(chunk.len());
            for name in chunk {
                let put = PutRequest::builder()
                    .item(PK, s(name.as_str()))
                    .item(SK, s("m"))
                    .item(EXPIRES_AT, n(expires_ms.div_ceil(1000)))
                    .item(EXPIRES_MS, n(expires_ms))
                    .build()
                    .map_err(|e| self.failed("writing dedup marks", e))?;
                writes.push(WriteRequest::builder().put_request(put).build());
            }
            loop {
                let out = self
                    .call("writing dedup marks", || {
                        self.client
                            .batch_write_item()
                            .request_items(&self.cfg.table, writes.clone())
                            .send()
                    })
                    .await?
                    .map_err(|e| self.failed("writing dedup marks", e))?;
                match out.unprocessed_items().and_then(|u| u.get(&self.cfg.table)) {
                    Some(rest) if !rest.is_empty() => {
                        self.count_throttle();
                        writes = rest.clone();
                        let wait = backoff.next_delay().ok_or_else(|| {
                            Error::throttled("dynamodb store: writing dedup marks stayed throttled")
                                .with_context("store", self.describe_table())
                        })?;
                        tokio::time::sleep(wait).await;
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn throttling_codes_are_throttled_and_credentials_are_denied() {
        assert_eq!(
            classify_code(Some("ProvisionedThroughputExceededException")),
            Failure::Throttled
        );
        assert_eq!(
            classify_code(Some("ThrottlingException")),
            Failure::Throttled
        );
        assert_eq!(
            classify_code(Some("RequestLimitExceeded")),
            Failure::Throttled
        );
        assert_eq!(
            classify_code(Some("UnrecognizedClientException")),
            Failure::Denied
        );
        assert_eq!(
            classify_code(Some("AccessDeniedException")),
            Failure::Denied
        );
        assert_eq!(
            classify_code(Some("ConditionalCheckFailedException")),
            Failure::Other
        );
        assert_eq!(classify_code(None), Failure::Other);
    }

    #[test]
    fn the_secret_never_appears_in_debug() {
        let cfg = DynamoDbConfig {
            secret_access_key: Some("s3cret".into()),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }

    #[test]
    fn fences_order_none_below_every_fence() {
        assert!(fence_value(None) < fence_value(Some(0)));
        assert!(fence_value(Some(0)) < fence_value(Some(u64::MAX)));
    }
}
