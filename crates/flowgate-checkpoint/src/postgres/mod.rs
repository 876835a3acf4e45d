//! PostgreSQL checkpoint and dedup store, shared by every worker of a pipeline.
//!
//! - Tables live in one schema (`schema`, default `flowgate`), created or migrated on
//!   connect; the schema version is recorded in `flowgate_schema`.
//! - A checkpoint write is one conditional upsert per partition, all in one transaction: the
//!   row is updated only if the new position is not behind the stored one and the new fence
//!   is not older. PostgreSQL locks the row for the upsert and re-checks the condition on the
//!   latest version, so a zombie writing concurrently with the new owner loses every time.
//! - Leases: one row per partition (owner, epoch, expiry by the server's clock, finished);
//!   take, renew, release and finish are single conditional statements, so of many racers
//!   exactly one wins. A checkpoint write locks the partitions' lease rows (`FOR SHARE`) and
//!   is refused if its fence is below the lease epoch.
//! - Dedup marks: one row per key with an expiry; positional marks: one row per range.
//!   Expired rows are swept in small batches as marks are written.
//! - Connection loss: every operation retries with backoff (reconnecting) until
//!   `give_up_after`, then fails with an error naming the server.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, Error, ErrorKind, IdempotencyKey, Lease, LeaseStore,
    PartitionId, Position, PositionRange, Record, Sink, SinkCapabilities, TxContext, WriteError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::{Client, NoTls};

use crate::rules;

/// The schema version this code writes.
/// Version 2 added `flowgate_leases`.
const SCHEMA_VERSION: i32 = 2;

/// Settings of the [`PostgresStore`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database` (the password never appears in logs).
    pub url: String,
    /// Schema holding flowgate's tables (letters, digits, `_`). Default `flowgate`.
    pub schema: String,
    /// Connections kept open. Default 4.
    pub pool_size: usize,
    /// How long an operation keeps retrying a lost connection before failing. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// TLS to the server; `None` (the default) connects in plain text.
    pub tls: Option<PostgresTls>,
}

/// TLS settings of the [`PostgresStore`]: the connection is encrypted and the server's
/// certificate verified (its name or IP must match the url's host), or it fails.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresTls {
    /// PEM file of the CA that signed the server's certificate. Default: the system's trusted
    /// roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM file of the client certificate (libpq's `sslcert`), for servers that ask for one
    /// (`hostssl … cert` in `pg_hba.conf`: its CN is the user name).
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM file of its private key (libpq's `sslkey`).
    pub key_file: Option<std::path::PathBuf>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://flowgate@127.0.0.1:5432/flowgate".into(),
            schema: "flowgate".into(),
            pool_size: 4,
            give_up_after: Duration::from_secs(30),
            tls: None,
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &crate::redact_url(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("give_up_after", &self.give_up_after)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Why an operation failed: the server (maybe retryable) or a rule (never retried).
enum Fail {
    Pg(tokio_postgres::Error),
    Flow(Error),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Flow(e)
    }
}

/// Connection-level failures and serialization conflicts are worth another try.
fn retryable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // A certificate the configured CA did not sign does not fix itself.
        None => !is_tls_failure(e),
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01"
        }
    }
}

fn is_tls_failure(e: &tokio_postgres::Error) -> bool {
    e.to_string().contains("TLS")
}

/// The error and its causes, one after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// Runs `$body` (an async block using the connected `$c: &mut Client`) with retries: a lost
/// connection is dropped and re-opened, with backoff, until `give_up_after`.
macro_rules! retry {
    ($self:ident, $what:expr, |$c:ident| $body:expr) => {{
        let started = Instant::now();
        let mut backoff = crate::store_backoff($self.cfg.give_up_after).start();
        loop {
            let res: Result<_, Fail> = async {
                let mut slot = $self.slot().await?;
                let Some($c) = slot.as_mut() else {
                    return Err(Fail::Flow(Error::transient("postgres store: no connection")));
                };
                let out = $body.await;
                if let Err(Fail::Pg(e)) = &out {
                    if retryable(e) && e.code().is_none() {
                        *slot = None;
                    }
                }
                out
            }
            .await;
            match res {
                Ok(v) => {
                    crate::record_latency("postgres", $what, started);
                    break Ok(v);
                }
                Err(Fail::Pg(e)) if retryable(&e) => match backoff.next_delay() {
                    Some(wait) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "postgres store: {} failed; retrying", $what);
                        tokio::time::sleep(wait).await;
                    }
                    None => break Err($self.give_up($what, Fail::Pg(e))),
                },
                Err(e) => break Err($self.give_up($what, e)),
            }
        }
    }};
}

/// PostgreSQL store: checkpoints with fencing, dedup marks with TTL, positional marks. See
/// the module docs.
pub struct PostgresStore {
    cfg: PostgresConfig,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pool: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
    marks: AtomicU64,
}

impl PostgresStore {
    /// Connects, creates or migrates the schema, and keeps `pool_size` connections.
    pub async fn connect(cfg: PostgresConfig) -> Result<Arc<Self>, Error> {
        if cfg.schema.is_empty()
            || !cfg
                .schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(
                Error::config("postgres store: schema must be letters, digits and `_`")
                    .with_context("key", "store.schema"),
            );
        }
        if cfg.pool_size == 0 {
            return Err(
                Error::config("postgres store: pool_size must be at least 1")
                    .with_context("key", "store.pool_size"),
            );
        }
        let tls = cfg.tls.as_ref().map(tls_connector).transpose()?;
        let store = PostgresStore {
            tls,
            pool: (0..cfg.pool_size).map(|_| Mutex::new(None)).collect(),
            cfg,
            next: AtomicUsize::new(0),
            marks: AtomicU64::new(0),
        };
        store.migrate().await?;
        tracing::info!(store = %store.describe_url(), "postgres store ready");
        Ok(Arc::new(store))
    }

    fn describe_url(&self) -> String {
        format!(
            "postgres {} (schema {})",
            crate::redact_url(&self.cfg.url),
            self.cfg.schema
        )
    }

    async fn open_client(&self) -> Result<Client, Fail> {
        let client = match &self.tls {
            None => {
                let (client, conn) = tokio_postgres::connect(&self.cfg.url, NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "postgres connection ended");
                    }
                });
                client
            }
            Some(tls) => {
                let mut config: tokio_postgres::Config = self.cfg.url.parse()?;
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, conn) = config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "postgres connection ended");
                    }
                });
                client
            }
        };
        client
            .batch_execute(&format!("SET search_path TO {}", self.cfg.schema))
            .await?;
        Ok(client)
    }

    /// A pool slot, connected.
    async fn slot(&self) -> Result<MutexGuard<'_, Option<Client>>, Fail> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        let mut slot = self.pool[i].lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.open_client().await?);
        }
        Ok(slot)
    }

    /// The error after retries ran out, or for a non-retryable failure.
    fn give_up(&self, what: &'static str, e: Fail) -> Error {
        match e {
            Fail::Flow(e) => e,
            Fail::Pg(e) => {
                if is_tls_failure(&e) {
                    return Error::config(format!("postgres store: {what} failed: TLS"))
                        .with_context("store", self.describe_url())
                        .with_context("cause", chain(&e))
                        .with_hint("the server's certificate must be signed by store.tls.ca_file (or a system root) and name the url's host");
                }
                let cause = chain(&e);
                if flowgate_core::tls::refused_client_certificate(&cause) {
                    return Error::config(format!(
                        "postgres store: {what} failed: the server asks for a client certificate and refused the one given (or none)"
                    ))
                    .with_context("store", self.describe_url())
                    .with_context("cause", cause)
                    .with_hint("set store.tls.cert_file and store.tls.key_file to a certificate the server's CA signed, whose CN is the user name");
                }
                let kind = if e
                    .code()
                    .is_some_and(|c| c.code().starts_with("28") || c.code().starts_with("3D"))
                {
                    ErrorKind::Config
                } else if retryable(&e) {
                    ErrorKind::Transient
                } else {
                    ErrorKind::Fatal
                };
                Error::new(kind, format!("postgres store: {what} failed"))
                    .with_context("store", self.describe_url())
                    .with_context("cause", chain(&e))
                    .with_hint("check that PostgreSQL runs, the url (user, password, database) and the permissions")
            }
        }
    }

    /// Deletes a small batch of expired marks, now and then.
    async fn sweep(&self, c: &Client) -> Result<(), tokio_postgres::Error> {
        if self.marks.fetch_add(1, Ordering::Relaxed) % 64 != 0 {
            return Ok(());
        }
        c.batch_execute(
            "DELETE FROM flowgate_dedup WHERE ctid IN
                (SELECT ctid FROM flowgate_dedup WHERE expires_at < now() LIMIT 5000);
             DELETE FROM flowgate_dedup_ranges WHERE ctid IN
                (SELECT ctid FROM flowgate_dedup_ranges WHERE expires_at < now() LIMIT 5000);",
        )
        .await
    }
}

fn ms(ttl: Duration) -> f64 {
    ttl.as_secs_f64() * 1000.0
}

fn fence_sql(f: Option<u64>) -> Option<i64> {
    f.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

mod checkpoints;
mod dedup;
mod leases;
mod schema;
mod table_sink;
mod tls;

pub use table_sink::{PostgresTableSink, TableMode};
use tls::tls_connector;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_appear_in_debug() {
        let cfg = PostgresConfig {
            url: "postgres://app:s3cret@db.internal:5432/prod".into(),
            ..Default::default()
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("app:<redacted>@db.internal"), "{text}");
    }
}
