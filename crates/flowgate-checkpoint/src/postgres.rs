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

    async fn migrate(&self) -> Result<(), Error> {
        let schema = self.cfg.schema.clone();
        retry!(self, "creating the schema", |c| {
            let ddl = format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 SET search_path TO {schema};
                 CREATE TABLE IF NOT EXISTS flowgate_schema (version integer NOT NULL);
                 CREATE TABLE IF NOT EXISTS flowgate_checkpoints (
                     pipeline text NOT NULL,
                     partition text NOT NULL,
                     position bytea NOT NULL,
                     position_text text NOT NULL,
                     fence bigint,
                     updated_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (pipeline, partition));
                 CREATE TABLE IF NOT EXISTS flowgate_dedup (
                     pipeline text NOT NULL,
                     key bytea NOT NULL,
                     expires_at timestamptz NOT NULL,
                     -- key first: lookups by key use the index whatever the statistics say
                     PRIMARY KEY (key, pipeline));
                 CREATE INDEX IF NOT EXISTS flowgate_dedup_expiry ON flowgate_dedup (expires_at);
                 CREATE TABLE IF NOT EXISTS flowgate_dedup_ranges (
                     pipeline text NOT NULL,
                     partition text NOT NULL,
                     first bytea NOT NULL,
                     last bytea NOT NULL,
                     expires_at timestamptz NOT NULL,
                     PRIMARY KEY (pipeline, partition, first));
                 CREATE INDEX IF NOT EXISTS flowgate_dedup_ranges_expiry ON flowgate_dedup_ranges (expires_at);
                 CREATE TABLE IF NOT EXISTS flowgate_leases (
                     pipeline text NOT NULL,
                     partition text NOT NULL,
                     owner text,
                     epoch bigint NOT NULL,
                     expires_at timestamptz NOT NULL,
                     finished boolean NOT NULL DEFAULT false,
                     PRIMARY KEY (pipeline, partition));"
            );
            async move {
                c.batch_execute(&ddl).await?;
                let tx = c.transaction().await?;
                tx.batch_execute("LOCK TABLE flowgate_schema IN EXCLUSIVE MODE")
                    .await?;
                let row = tx
                    .query_opt("SELECT max(version) FROM flowgate_schema", &[])
                    .await?;
                let current: Option<i32> = row.and_then(|r| r.get(0));
                match current {
                    None => {
                        tx.execute(
                            "INSERT INTO flowgate_schema (version) VALUES ($1)",
                            &[&SCHEMA_VERSION],
                        )
                        .await?;
                    }
                    Some(v) if v < SCHEMA_VERSION => {
                        // The DDL above added what the newer version needs.
                        tx.execute(
                            "UPDATE flowgate_schema SET version = $1",
                            &[&SCHEMA_VERSION],
                        )
                        .await?;
                    }
                    Some(v) if v > SCHEMA_VERSION => {
                        return Err(Fail::Flow(
                            Error::config(format!(
                                "postgres store: schema version {v} is newer than this flowgate understands ({SCHEMA_VERSION})"
                            ))
                            .with_hint("upgrade flowgate, or point `store.schema` elsewhere"),
                        ));
                    }
                    Some(_) => {}
                }
                tx.commit().await?;
                Ok(())
            }
        })
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

/// The rustls connector: the CA of `ca_file`, or the system's roots; ring as the crypto
/// provider (explicitly, whatever else the process links).
fn tls_connector(t: &PostgresTls) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_file {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| {
                Error::config("postgres store: the CA file cannot be read")
                    .with_context("key", "store.tls.ca_file")
                    .with_context("path", path.display())
                    .with_context("cause", e)
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(bad(&"no certificate in it"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(Error::config(
                    "postgres store: no trusted root certificates on this system",
                )
                .with_context("key", "store.tls.ca_file")
                .with_hint(
                    "set store.tls.ca_file to the CA that signed the server's certificate",
                ));
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::fatal("postgres store: TLS setup failed").with_source(e))?
    .with_root_certificates(roots);
    let config = match flowgate_core::tls::ClientIdentity::load(
        t.cert_file.as_ref(),
        t.key_file.as_ref(),
        "store.tls",
    )? {
        None => config.with_no_client_auth(),
        Some(id) => {
            use rustls::pki_types::PrivateKeyDer;
            let bad = |what: &str, e: &dyn std::fmt::Display| {
                Error::config(format!(
                    "postgres store: the client {what} cannot be parsed"
                ))
                .with_context("key", "store.tls")
                .with_context("cause", e)
            };
            let certs = CertificateDer::pem_slice_iter(&id.cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("certificate", &e))?;
            let key = PrivateKeyDer::from_pem_slice(&id.key_pem).map_err(|e| bad("key", &e))?;
            config
                .with_client_auth_cert(certs, key)
                .map_err(|e| bad("certificate and key", &e))?
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn ms(ttl: Duration) -> f64 {
    ttl.as_secs_f64() * 1000.0
}

fn fence_sql(f: Option<u64>) -> Option<i64> {
    f.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

#[async_trait]
impl CheckpointStore for PostgresStore {
    fn describe(&self) -> String {
        self.describe_url()
    }

    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        let rows = retry!(self, "loading checkpoints", |c| async {
            Ok(c
                .query(
                    "SELECT partition, position, fence FROM flowgate_checkpoints WHERE pipeline = $1 ORDER BY partition",
                    &[&pipeline],
                )
                .await?)
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let partition: String = r.get(0);
            let bytes: Vec<u8> = r.get(1);
            let fence: Option<i64> = r.get(2);
            let position = Position::from_ordered_bytes(&bytes).ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    "postgres store: a stored position cannot be read",
                )
                .with_context("pipeline", pipeline)
                .with_context("partition", &partition)
            })?;
            out.push(
                Checkpoint::new(PartitionId::new(partition), position)
                    .with_fence(fence.and_then(|f| u64::try_from(f).ok())),
            );
        }
        Ok(out)
    }

    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        if checkpoints.is_empty() {
            return Ok(());
        }
        // One row per partition (the last write of a partition wins within a commit).
        let mut latest: std::collections::BTreeMap<&str, &Checkpoint> = Default::default();
        for cp in checkpoints {
            latest.insert(cp.partition.as_str(), cp);
        }
        let parts: Vec<&str> = latest.keys().copied().collect();
        let positions: Vec<Vec<u8>> = latest
            .values()
            .map(|c| c.position.to_ordered_bytes())
            .collect();
        let texts: Vec<String> = latest.values().map(|c| c.position.to_string()).collect();
        let fences: Vec<Option<i64>> = latest.values().map(|c| fence_sql(c.fence)).collect();
        retry!(self, "committing checkpoints", |c| async {
            // One statement, one round trip: every row is written only if its position is not
            // behind and its fence not older than what is stored; the rows it wrote come back.
            // The lease rows are locked (and read at their latest version), so a lease taken
            // concurrently either precedes this write, which is then refused, or waits for it.
            let tx = c.transaction().await?;
            let written = tx
                .query(
                    "WITH leases AS (
                       SELECT partition, epoch FROM flowgate_leases
                       WHERE pipeline = $1 AND partition = ANY($2) FOR SHARE)
                     INSERT INTO flowgate_checkpoints AS s (pipeline, partition, position, position_text, fence)
                     SELECT $1, u.* FROM unnest($2::text[], $3::bytea[], $4::text[], $5::bigint[])
                       AS u(partition, position, position_text, fence)
                     WHERE NOT EXISTS (SELECT 1 FROM leases l
                                       WHERE l.partition = u.partition AND l.epoch > coalesce(u.fence, -1))
                     ON CONFLICT (pipeline, partition) DO UPDATE
                       SET position = EXCLUDED.position, position_text = EXCLUDED.position_text,
                           fence = EXCLUDED.fence, updated_at = now()
                     WHERE s.position <= EXCLUDED.position
                       AND coalesce(s.fence, -1) <= coalesce(EXCLUDED.fence, -1)
                     RETURNING partition",
                    &[&pipeline, &parts, &positions, &texts, &fences],
                )
                .await?;
            if written.len() == parts.len() {
                tx.commit().await?;
                return Ok(());
            }
            // Refused: roll everything back and say why, from what is stored now.
            let done: std::collections::HashSet<String> =
                written.iter().map(|r| r.get::<_, String>(0)).collect();
            let Some(cp) = latest
                .values()
                .find(|c| !done.contains(c.partition.as_str()))
            else {
                return Err(Fail::Flow(Error::new(
                    ErrorKind::Fenced,
                    "checkpoint write refused",
                )));
            };
            let lease = tx
                .query_opt(
                    "SELECT epoch FROM flowgate_leases WHERE pipeline = $1 AND partition = $2",
                    &[&pipeline, &cp.partition.as_str()],
                )
                .await?
                .and_then(|r| u64::try_from(r.get::<_, i64>(0)).ok());
            rules::check_lease_fence(lease, cp)?;
            let row = tx
                .query_one(
                    "SELECT position, fence FROM flowgate_checkpoints WHERE pipeline = $1 AND partition = $2",
                    &[&pipeline, &cp.partition.as_str()],
                )
                .await?;
            drop(tx);
            let bytes: Vec<u8> = row.get(0);
            let fence: Option<i64> = row.get(1);
            let stored = Position::from_ordered_bytes(&bytes).map(|p| {
                Checkpoint::new(cp.partition.clone(), p)
                    .with_fence(fence.and_then(|f| u64::try_from(f).ok()))
            });
            Err(Fail::Flow(
                rules::check(stored.as_ref(), cp).err().unwrap_or_else(|| {
                    Error::new(ErrorKind::Fenced, "checkpoint write refused")
                        .with_context("partition", &cp.partition)
                }),
            ))
        })
    }

    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        let names: Option<Vec<String>> =
            partitions.map(|ps| ps.iter().map(|p| p.as_str().to_string()).collect());
        retry!(self, "resetting checkpoints", |c| async {
            match &names {
                Some(names) => {
                    c.execute(
                        "DELETE FROM flowgate_checkpoints WHERE pipeline = $1 AND partition = ANY($2)",
                        &[&pipeline, names],
                    )
                    .await?
                }
                None => {
                    c.execute(
                        "DELETE FROM flowgate_checkpoints WHERE pipeline = $1",
                        &[&pipeline],
                    )
                    .await?
                }
            };
            Ok(())
        })
    }
}

#[async_trait]
impl DedupStore for PostgresStore {
    fn describe(&self) -> String {
        self.describe_url()
    }

    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: Vec<&[u8]> = keys.iter().map(IdempotencyKey::as_bytes).collect();
        let rows = retry!(self, "checking dedup marks", |c| async {
            Ok(c
                .query(
                    "SELECT key FROM flowgate_dedup WHERE pipeline = $1 AND key = ANY($2) AND expires_at > now()",
                    &[&pipeline, &wanted],
                )
                .await?)
        })?;
        let live: std::collections::HashSet<Vec<u8>> =
            rows.into_iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
        Ok(wanted.iter().map(|k| live.contains(*k)).collect())
    }

    async fn mark(
        &self,
        pipeline: &str,
        keys: &[IdempotencyKey],
        ttl: Duration,
    ) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let values: Vec<&[u8]> = keys.iter().map(IdempotencyKey::as_bytes).collect();
        let ttl_ms = ms(ttl);
        retry!(self, "writing dedup marks", |c| async {
            c.execute(
                "INSERT INTO flowgate_dedup (pipeline, key, expires_at)
                 SELECT $1, k, now() + $3 * interval '1 millisecond' FROM unnest($2::bytea[]) AS k
                 ON CONFLICT (key, pipeline) DO UPDATE
                   SET expires_at = greatest(flowgate_dedup.expires_at, EXCLUDED.expires_at)",
                &[&pipeline, &values, &ttl_ms],
            )
            .await?;
            self.sweep(c).await?;
            Ok(())
        })
    }

    fn supports_position_ranges(&self) -> bool {
        true
    }

    async fn seen_positions(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        positions: &[Position],
    ) -> Result<Vec<bool>, Error> {
        let (Some(lo), Some(hi)) = (positions.iter().min(), positions.iter().max()) else {
            return Ok(Vec::new());
        };
        let (lo, hi) = (lo.to_ordered_bytes(), hi.to_ordered_bytes());
        let rows = retry!(self, "checking positional marks", |c| async {
            Ok(c.query(
                "SELECT first, last FROM flowgate_dedup_ranges
                     WHERE pipeline = $1 AND partition = $2 AND first <= $3 AND last >= $4
                       AND expires_at > now()",
                &[&pipeline, &partition.as_str(), &hi, &lo],
            )
            .await?)
        })?;
        let ranges: Vec<(Vec<u8>, Vec<u8>)> =
            rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(positions
            .iter()
            .map(|p| {
                let b = p.to_ordered_bytes();
                ranges.iter().any(|(f, l)| *f <= b && b <= *l)
            })
            .collect())
    }

    async fn last_marked_position(
        &self,
        pipeline: &str,
        partition: &PartitionId,
    ) -> Result<Option<Position>, Error> {
        // `bytea` has no max(); ordered bytes sort like positions.
        let row = retry!(self, "reading the last positional mark", |c| async {
            Ok(c.query_opt(
                "SELECT last FROM flowgate_dedup_ranges
                     WHERE pipeline = $1 AND partition = $2 AND expires_at > now()
                     ORDER BY last DESC LIMIT 1",
                &[&pipeline, &partition.as_str()],
            )
            .await?)
        })?;
        let last: Option<Vec<u8>> = row.map(|r| r.get(0));
        last.map(|b| {
            Position::from_ordered_bytes(&b).ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    "postgres store: a positional dedup mark cannot be read",
                )
                .with_context("pipeline", pipeline)
                .with_context("partition", partition)
            })
        })
        .transpose()
    }

    async fn mark_ranges(
        &self,
        pipeline: &str,
        ranges: &[PositionRange],
        ttl: Duration,
    ) -> Result<(), Error> {
        if ranges.is_empty() {
            return Ok(());
        }
        let ttl_ms = ms(ttl);
        retry!(self, "writing positional marks", |c| async {
            let tx = c.transaction().await?;
            for r in ranges {
                tx.execute(
                    "INSERT INTO flowgate_dedup_ranges (pipeline, partition, first, last, expires_at)
                     VALUES ($1, $2, $3, $4, now() + $5 * interval '1 millisecond')
                     ON CONFLICT (pipeline, partition, first) DO UPDATE
                       SET last = greatest(flowgate_dedup_ranges.last, EXCLUDED.last),
                           expires_at = greatest(flowgate_dedup_ranges.expires_at, EXCLUDED.expires_at)",
                    &[
                        &pipeline,
                        &r.partition.as_str(),
                        &r.first.to_ordered_bytes(),
                        &r.last.to_ordered_bytes(),
                        &ttl_ms,
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            self.sweep(c).await?;
            Ok(())
        })
    }
}

/// How a [`PostgresTableSink`] writes rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableMode {
    /// One row per record.
    #[default]
    Insert,
    /// One row per record key: a record replaces the row of its key (the latest state of an
    /// entity). A record without a key is poison.
    Upsert,
}

/// A table of the [`PostgresStore`]'s database that records are written to, each batch with
/// its dedup marks in **one** transaction: exactly-once from any replayable source.
///
/// The transaction first inserts the batch's idempotency keys into the dedup table, skipping
/// keys already there, then writes only the rows whose key it just marked. So a replayed
/// record (after a crash, or a retry of a commit whose outcome was lost with the connection)
/// never writes a second row. Columns: `id` (write order), `pipeline`, `partition`,
/// `position`, `key`, `payload`, `idempotency_key`, `written_at`.
#[derive(Clone)]
pub struct PostgresTableSink {
    store: Arc<PostgresStore>,
    pipeline: String,
    table: String,
    mode: TableMode,
}

impl PostgresStore {
    /// A table sink writing the rows of `pipeline` to `table` (created if missing) in this
    /// store's schema.
    pub async fn table_sink(
        self: &Arc<Self>,
        pipeline: &str,
        table: &str,
        mode: TableMode,
    ) -> Result<PostgresTableSink, Error> {
        let valid = table
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && table.len() <= 63
            && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::config(
                "postgres table sink: the table name must be letters, digits and `_` (at most 63)",
            )
            .with_context("key", "sink.table")
            .with_context("table", table));
        }
        let unique = match mode {
            TableMode::Insert => "",
            TableMode::Upsert => ", UNIQUE (pipeline, key)",
        };
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 id bigserial PRIMARY KEY,
                 pipeline text NOT NULL,
                 partition text NOT NULL,
                 position text NOT NULL,
                 key bytea,
                 payload bytea NOT NULL,
                 idempotency_key bytea,
                 written_at timestamptz NOT NULL DEFAULT now(){unique})"
        );
        retry!(self, "creating the sink table", |c| async {
            c.batch_execute(&ddl).await?;
            Ok(())
        })?;
        Ok(PostgresTableSink {
            store: self.clone(),
            pipeline: pipeline.to_string(),
            table: table.to_string(),
            mode,
        })
    }
}

impl PostgresTableSink {
    /// Writes `batch` in one transaction; with `marks`, only the rows whose idempotency key was
    /// not marked yet, marking them in the same transaction.
    async fn write_rows(
        &self,
        batch: &[Record],
        marks: Option<Duration>,
    ) -> Result<(), WriteError> {
        let mut rows: Vec<&Record> = batch.iter().collect();
        if self.mode == TableMode::Upsert {
            if let Some(i) = batch.iter().position(|r| r.key.is_none()) {
                return Err(WriteError::Partial(vec![(
                    i,
                    Error::poison("postgres table sink (upsert): a record without a key")
                        .with_context("partition", &batch[i].partition)
                        .with_context("position", &batch[i].position),
                )]));
            }
            // One row per key and statement: the last record of a key wins.
            let mut last: HashMap<&[u8], usize> = HashMap::new();
            for (i, r) in batch.iter().enumerate() {
                if let Some(k) = &r.key {
                    last.insert(k.as_ref(), i);
                }
            }
            rows = batch
                .iter()
                .enumerate()
                .filter(|(i, r)| {
                    r.key
                        .as_ref()
                        .is_some_and(|k| last.get(k.as_ref()) == Some(i))
                })
                .map(|(_, r)| r)
                .collect();
        }
        let parts: Vec<&str> = rows.iter().map(|r| r.partition.as_str()).collect();
        let positions: Vec<String> = rows.iter().map(|r| r.position.to_string()).collect();
        let keys: Vec<Option<&[u8]>> = rows.iter().map(|r| r.key.as_deref()).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_ref()).collect();
        let ikeys: Vec<Option<&[u8]>> = rows
            .iter()
            .map(|r| r.idempotency_key.as_ref().map(IdempotencyKey::as_bytes))
            .collect();
        // The keys to mark (transactional writes only).
        let to_mark: Vec<Option<&[u8]>> = ikeys.iter().map(|k| marks.and(*k)).collect();
        let ttl_ms = ms(marks.unwrap_or_default());
        let conflict = match self.mode {
            TableMode::Insert => String::new(),
            TableMode::Upsert => {
                "ON CONFLICT (pipeline, key) DO UPDATE SET partition = EXCLUDED.partition,
                 position = EXCLUDED.position, payload = EXCLUDED.payload,
                 idempotency_key = EXCLUDED.idempotency_key, written_at = now()"
                    .to_string()
            }
        };
        let sql = format!(
            "WITH rows AS (
               SELECT * FROM unnest($2::text[], $3::text[], $4::bytea[], $5::bytea[], $6::bytea[],
                                    $8::bytea[])
                 WITH ORDINALITY AS r(partition, position, key, payload, ikey, mark, ord)),
             new AS (
               INSERT INTO flowgate_dedup (pipeline, key, expires_at)
               SELECT DISTINCT $1, mark, now() + $7 * interval '1 millisecond'
                 FROM rows WHERE mark IS NOT NULL
               ON CONFLICT (key, pipeline) DO NOTHING
               RETURNING key)
             INSERT INTO {table} (pipeline, partition, position, key, payload, idempotency_key)
             SELECT $1, partition, position, key, payload, ikey FROM rows
             WHERE mark IS NULL OR mark IN (SELECT key FROM new)
             ORDER BY ord
             {conflict}",
            table = self.table
        );
        let (store, pipeline) = (&self.store, self.pipeline.as_str());
        retry!(store, "writing rows", |c| async {
            let tx = c.transaction().await?;
            tx.execute(
                sql.as_str(),
                &[
                    &pipeline, &parts, &positions, &keys, &payloads, &ikeys, &ttl_ms, &to_mark,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .map_err(WriteError::Batch)
    }

    /// Every row of the pipeline, in write order (for tests and inspection).
    pub async fn rows(&self) -> Result<Vec<Record>, Error> {
        let sql = format!(
            "SELECT partition, position, key, payload, idempotency_key FROM {} WHERE pipeline = $1 ORDER BY id",
            self.table
        );
        let (store, pipeline) = (&self.store, self.pipeline.as_str());
        let rows = retry!(store, "reading rows", |c| async {
            Ok(c.query(sql.as_str(), &[&pipeline]).await?)
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let position: String = r.get(1);
            let position = Position::parse_decimal(&position).map_err(|e| {
                Error::new(
                    ErrorKind::Corrupt,
                    "postgres table sink: a stored position cannot be read",
                )
                .with_context("table", &self.table)
                .with_source(e)
            })?;
            let payload: Vec<u8> = r.get(3);
            let mut rec = Record::new(PartitionId::new(r.get::<_, String>(0)), position, payload);
            rec.key = r.get::<_, Option<Vec<u8>>>(2).map(Bytes::from);
            rec.idempotency_key = r.get::<_, Option<Vec<u8>>>(4).map(IdempotencyKey::new);
            out.push(rec);
        }
        Ok(out)
    }
}

#[async_trait]
impl Sink for PostgresTableSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic()
            .with_transactional(true)
            .with_forwards_idempotency_key(true)
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write_rows(batch, None).await
    }

    async fn write_transactional(
        &self,
        batch: &[Record],
        tx: &TxContext<'_>,
    ) -> Result<(), WriteError> {
        if batch.is_empty() {
            return Ok(());
        }
        if tx.pipeline != self.pipeline {
            return Err(WriteError::Batch(
                Error::config("postgres table sink: built for another pipeline")
                    .with_context("sink_pipeline", &self.pipeline)
                    .with_context("pipeline", tx.pipeline),
            ));
        }
        self.write_rows(batch, Some(tx.dedup_ttl)).await
    }
}

/// The columns of a lease, as `lease_view` reads them.
const LEASE_COLUMNS: &str = "partition, owner, epoch,
    CASE WHEN owner IS NULL THEN 0
         ELSE greatest(0, ceil(extract(epoch FROM expires_at - now()) * 1000))::bigint END,
    finished";

fn lease_view(r: &tokio_postgres::Row) -> Lease {
    Lease {
        partition: PartitionId::new(r.get::<_, String>(0)),
        owner: r.get(1),
        epoch: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
        remaining: Duration::from_millis(u64::try_from(r.get::<_, i64>(3)).unwrap_or(0)),
        finished: r.get(4),
    }
}

impl PostgresStore {
    /// Runs a conditional update of a lease the caller holds; no row means it was lost.
    async fn update_lease(
        &self,
        what: &'static str,
        pipeline: &str,
        lease: &Lease,
        set: &str,
        ttl: Option<Duration>,
    ) -> Result<Lease, Error> {
        let sql = format!(
            "UPDATE flowgate_leases SET {set}
             WHERE pipeline = $1 AND partition = $2 AND owner = $3 AND epoch = $4 AND NOT finished
             RETURNING {LEASE_COLUMNS}"
        );
        let epoch = fence_sql(Some(lease.epoch));
        let ttl_ms = ttl.map(ms);
        let partition = lease.partition.as_str();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&pipeline, &partition, &lease.owner, &epoch];
        if let Some(ttl_ms) = &ttl_ms {
            params.push(ttl_ms);
        }
        let row = retry!(self, what, |c| async {
            Ok(c.query_opt(sql.as_str(), &params).await?)
        })?;
        row.map(|r| lease_view(&r)).ok_or_else(|| lease.lost())
    }
}

#[async_trait]
impl LeaseStore for PostgresStore {
    fn describe(&self) -> String {
        self.describe_url()
    }

    async fn leases(&self, pipeline: &str) -> Result<Vec<Lease>, Error> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM flowgate_leases WHERE pipeline = $1 ORDER BY partition"
        );
        let rows = retry!(self, "reading leases", |c| async {
            Ok(c.query(sql.as_str(), &[&pipeline]).await?)
        })?;
        Ok(rows.iter().map(lease_view).collect())
    }

    async fn acquire(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        owner: &str,
        ttl: Duration,
        steal: Option<u64>,
    ) -> Result<Option<Lease>, Error> {
        // One statement: the row is locked and the condition re-checked on its latest
        // version, so of many racers exactly one takes it.
        let sql = format!(
            "INSERT INTO flowgate_leases AS l (pipeline, partition, owner, epoch, expires_at)
             VALUES ($1, $2, $3, 1, now() + $4 * interval '1 millisecond')
             ON CONFLICT (pipeline, partition) DO UPDATE
               SET owner = EXCLUDED.owner, epoch = l.epoch + 1, expires_at = EXCLUDED.expires_at
             WHERE NOT l.finished
               AND (l.owner IS NULL OR l.expires_at <= now() OR l.epoch = $5)
             RETURNING {LEASE_COLUMNS}"
        );
        let ttl_ms = ms(ttl);
        let steal = fence_sql(steal);
        let row = retry!(self, "taking a lease", |c| async {
            Ok(c.query_opt(
                sql.as_str(),
                &[&pipeline, &partition.as_str(), &owner, &ttl_ms, &steal],
            )
            .await?)
        })?;
        Ok(row.map(|r| lease_view(&r)))
    }

    async fn renew(&self, pipeline: &str, lease: &Lease, ttl: Duration) -> Result<Lease, Error> {
        self.update_lease(
            "renewing a lease",
            pipeline,
            lease,
            "expires_at = now() + $5 * interval '1 millisecond'",
            Some(ttl),
        )
        .await
    }

    async fn release(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.update_lease(
            "releasing a lease",
            pipeline,
            lease,
            "owner = NULL, expires_at = now()",
            None,
        )
        .await
        .map(|_| ())
    }

    async fn finish(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.update_lease(
            "finishing a lease",
            pipeline,
            lease,
            "owner = NULL, finished = true, expires_at = now()",
            None,
        )
        .await
        .map(|_| ())
    }
}

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
