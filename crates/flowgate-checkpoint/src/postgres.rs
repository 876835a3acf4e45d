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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, Error, ErrorKind, IdempotencyKey, Lease, LeaseStore,
    PartitionId, Position, PositionRange,
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
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://flowgate@127.0.0.1:5432/flowgate".into(),
            schema: "flowgate".into(),
            pool_size: 4,
            give_up_after: Duration::from_secs(30),
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
        None => true,
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01"
        }
    }
}

/// Runs `$body` (an async block using the connected `$c: &mut Client`) with retries: a lost
/// connection is dropped and re-opened, with backoff, until `give_up_after`.
macro_rules! retry {
    ($self:ident, $what:expr, |$c:ident| $body:expr) => {{
        let started = Instant::now();
        let deadline = started + $self.cfg.give_up_after;
        let mut wait = Duration::from_millis(50);
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
                Err(Fail::Pg(e)) if retryable(&e) && Instant::now() < deadline => {
                    tracing::warn!(error = %e, retry_in = ?wait, "postgres store: {} failed; retrying", $what);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => break Err($self.give_up($what, e)),
            }
        }
    }};
}

/// PostgreSQL store: checkpoints with fencing, dedup marks with TTL, positional marks. See
/// the module docs.
pub struct PostgresStore {
    cfg: PostgresConfig,
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
        let store = PostgresStore {
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
        let (client, conn) = tokio_postgres::connect(&self.cfg.url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
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
                    .with_source(e)
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
