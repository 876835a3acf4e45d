//! The DynamoDB client: building it, one call with retries and how failures are classified,
//! and the table (checked, or created when allowed).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification,
};
use flowgate_core::{Error, ErrorKind};

use super::{DynamoDbConfig, DynamoDbStore, EXPIRES_AT, PK, SK};

/// How a failed call is handled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Failure {
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

pub(super) fn classify_code(code: Option<&str>) -> Failure {
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
pub(super) async fn build(cfg: &DynamoDbConfig) -> Client {
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

impl DynamoDbStore {
    /// Runs `op`, retrying throttling and lost connections with backoff until `give_up_after`.
    /// `Ok(Err(e))`: the service answered with an error the caller handles (a failed
    /// condition); `Err`: gave up, or refused credentials.
    pub(super) async fn call<T, E, R, F, Fut>(
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

    pub(super) fn count_throttle(&self) {
        self.throttles.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::STORE_THROTTLES, "store" => "dynamodb").increment(1);
    }

    pub(super) fn denied(
        &self,
        what: &str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
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
    pub(super) fn failed(
        &self,
        what: &str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::new(ErrorKind::Fatal, format!("dynamodb store: {what} failed"))
            .with_context("store", self.describe_table())
            .with_source(e)
    }

    pub(super) async fn ensure_table(&self) -> Result<(), Error> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
