//! Redis checkpoint and dedup store, shared by every worker of a pipeline.
//!
//! - Checkpoints: one hash per pipeline (`<prefix>:cp:<pipeline>`), a field per partition
//!   holding `fence|position`; a write is a Lua script that checks every checkpoint of the
//!   commit against the stored one (position not behind, fence not older) and writes them all
//!   or none — Redis runs a script atomically, so a zombie racing the new owner loses.
//! - Leases: one hash per pipeline (`<prefix>:ls:<pipeline>`), a field per partition holding
//!   `epoch|expires-ms|finished|owner`; take, renew, release and finish are Lua scripts
//!   timed by the server's clock (`TIME`). The checkpoint script refuses a checkpoint whose
//!   fence is below the partition's lease epoch.
//! - Dedup marks: one key per mark (`<prefix>:dd:<pipeline>:<key>`) set with an expiry
//!   (`SET … PX`), so Redis itself forgets expired marks. No positional marks: with dedup
//!   by source position the runtime marks one key per record here.
//! - Connection loss: the connection manager reconnects; every operation retries with backoff
//!   until `give_up_after`, then fails with an error naming the server. So do answers that say
//!   the server cannot serve yet (`LOADING` after a restart, `MASTERDOWN`, `TRYAGAIN`,
//!   `CLUSTERDOWN`).
//! - Durability is the server's: run it with `appendonly yes` (and `appendfsync always` if a
//!   second of writes must survive a power loss).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, Error, ErrorKind, IdempotencyKey, Lease, LeaseStore,
    PartitionId, Position,
};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::rules;

/// Settings of the [`RedisStore`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` or `rediss://` (TLS). The password never appears
    /// in logs.
    pub url: String,
    /// Prefix of every key flowgate writes. Default `flowgate`.
    pub prefix: String,
    /// How long an operation keeps retrying a lost connection before failing. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// TLS settings for a `rediss://` url; `None` with `rediss://` trusts the system's roots.
    pub tls: Option<RedisTls>,
}

/// TLS settings of the [`RedisStore`] (with a `rediss://` url): the server's certificate is
/// verified against `ca_file`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisTls {
    /// PEM file of the CA that signed the server's certificate. Default: the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM file of the client certificate, for servers that ask for one
    /// (`tls-auth-clients yes`).
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM file of its private key.
    pub key_file: Option<std::path::PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "flowgate".into(),
            give_up_after: Duration::from_secs(30),
            tls: None,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &crate::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("give_up_after", &self.give_up_after)
            .field("tls", &self.tls)
            .finish()
    }
}

mod leases;
mod scripts;

use scripts::{ACQUIRE, COMMIT, NOW, UPDATE};

/// Redis store: checkpoints with fencing, dedup marks with TTL, leases. See the module docs.
pub struct RedisStore {
    cfg: RedisConfig,
    conn: ConnectionManager,
    commit: redis::Script,
    acquire: redis::Script,
    update: redis::Script,
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
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

/// `fence|position-hex`; fence -1 for none. Hex of the order-preserving bytes keeps the
/// order when compared by length, then bytes (what the script does).
fn encode(cp: &Checkpoint) -> (i64, String, String) {
    let fence = cp
        .fence
        .map_or(-1, |f| i64::try_from(f).unwrap_or(i64::MAX));
    let pos = hex(&cp.position.to_ordered_bytes());
    let value = format!("{fence}|{pos}");
    (fence, pos, value)
}

fn decode(partition: String, value: &str) -> Option<Checkpoint> {
    let (fence, pos) = value.split_once('|')?;
    let fence: i64 = fence.parse().ok()?;
    let position = Position::from_ordered_bytes(&unhex(pos)?)?;
    Some(
        Checkpoint::new(PartitionId::new(partition), position)
            .with_fence(u64::try_from(fence).ok()),
    )
}

/// The client: plain, or TLS (`rediss://`) with the configured CA. rustls uses ring, installed
/// as the process default if none is (several crypto providers may be linked in).
fn client(cfg: &RedisConfig) -> Result<redis::Client, Error> {
    let bad_url = |e: redis::RedisError| {
        Error::config("redis store: the url cannot be parsed")
            .with_context("key", "store.url")
            .with_context("url", crate::redact_url(&cfg.url))
            .with_source(e)
    };
    let tls = cfg.url.starts_with("rediss://");
    if tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    match (&cfg.tls, tls) {
        (Some(_), false) => Err(Error::config("redis store: tls needs a rediss:// url")
            .with_context("key", "store.url")),
        (Some(t), true) if t.ca_file.is_some() || t.cert_file.is_some() => {
            let root_cert = match &t.ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    Error::config("redis store: the CA file cannot be read")
                        .with_context("key", "store.tls.ca_file")
                        .with_context("path", path.display())
                        .with_source(e)
                })?),
                None => None,
            };
            let client_tls = flowgate_core::tls::ClientIdentity::load(
                t.cert_file.as_ref(),
                t.key_file.as_ref(),
                "store.tls",
            )?
            .map(|id| redis::ClientTlsConfig {
                client_cert: id.cert_pem,
                client_key: id.key_pem,
            });
            redis::Client::build_with_tls(
                cfg.url.as_str(),
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
            .map_err(bad_url)
        }
        _ => redis::Client::open(cfg.url.as_str()).map_err(bad_url),
    }
}

impl RedisStore {
    /// Connects (retrying until `give_up_after`).
    pub async fn connect(cfg: RedisConfig) -> Result<Arc<Self>, Error> {
        let client = client(&cfg)?;
        let mut backoff = crate::store_backoff(cfg.give_up_after).start();
        // Bounded waits everywhere: the manager's own retries are ours to pace.
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(10));
        let conn = loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(3),
                ConnectionManager::new_with_config(client.clone(), manager.clone()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::IoError,
                    "connection attempt timed out",
                )))
            });
            match attempt {
                Ok(c) => break c,
                // Certificates do not fix themselves: no retries.
                Err(e) if flowgate_core::tls::refused_client_certificate(&e.to_string()) => {
                    return Err(Error::config(
                        "redis store: the server asks for a client certificate and refused the one given (or none)",
                    )
                    .with_context("url", crate::redact_url(&cfg.url))
                    .with_source(e)
                    .with_hint("set store.tls.cert_file and store.tls.key_file to a certificate the server's CA signed"));
                }
                Err(e) if e.to_string().contains("certificate") => {
                    return Err(Error::config("redis store: TLS verification failed")
                        .with_context("url", crate::redact_url(&cfg.url))
                        .with_source(e)
                        .with_hint("the server's certificate must be signed by store.tls.ca_file (or a system root) and name the url's host"));
                }
                Err(e) => {
                    if let Some(wait) = backoff.next_delay() {
                        tracing::warn!(error = %e, retry_in = ?wait, "redis store: cannot connect; retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    return Err(Error::transient("redis store: server unreachable")
                        .with_context("url", crate::redact_url(&cfg.url))
                        .with_source(e)
                        .with_hint("check that Redis runs and the url is right"));
                }
            }
        };
        Ok(Arc::new(RedisStore {
            cfg,
            conn,
            commit: redis::Script::new(COMMIT),
            acquire: redis::Script::new(&format!("{NOW}{ACQUIRE}")),
            update: redis::Script::new(&format!("{NOW}{UPDATE}")),
        }))
    }

    fn key(&self, kind: &str, pipeline: &str) -> String {
        format!("{}:{kind}:{pipeline}", self.cfg.prefix)
    }

    /// Runs `op` on a clone of the managed connection, retrying lost connections and a server
    /// not ready to serve yet (loading its dataset, say) until `give_up_after`.
    async fn retry<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T, Error>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let mut backoff = crate::store_backoff(self.cfg.give_up_after).start();
        loop {
            match op(self.conn.clone()).await {
                Ok(v) => {
                    crate::record_latency("redis", what, started);
                    return Ok(v);
                }
                Err(e) => {
                    let lost = e.is_io_error() || e.is_connection_dropped() || e.is_timeout()
                        // The server answers but cannot serve yet: loading its dataset after
                        // a restart (LOADING), a replica without its master (MASTERDOWN), a
                        // cluster moving slots (TRYAGAIN, CLUSTERDOWN).
                        || matches!(e.retry_method(), redis::RetryMethod::WaitAndRetry);
                    if lost {
                        if let Some(wait) = backoff.next_delay() {
                            tracing::warn!(error = %e, retry_in = ?wait, "redis store: {what} failed; retrying");
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                    }
                    let kind = if lost {
                        ErrorKind::Transient
                    } else {
                        ErrorKind::Fatal
                    };
                    return Err(Error::new(kind, format!("redis store: {what} failed"))
                        .with_context("store", self.describe_url())
                        .with_source(e));
                }
            }
        }
    }

    fn describe_url(&self) -> String {
        format!(
            "redis {} (prefix {})",
            crate::redact_url(&self.cfg.url),
            self.cfg.prefix
        )
    }
}

#[async_trait]
impl CheckpointStore for RedisStore {
    fn describe(&self) -> String {
        self.describe_url()
    }

    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        let key = self.key("cp", pipeline);
        let map: Vec<(String, String)> = self
            .retry("loading checkpoints", |mut c| {
                let key = key.clone();
                async move { redis::cmd("HGETALL").arg(&key).query_async(&mut c).await }
            })
            .await?;
        let mut out = Vec::with_capacity(map.len());
        for (partition, value) in map {
            let cp = decode(partition.clone(), &value).ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    "redis store: a stored checkpoint cannot be read",
                )
                .with_context("key", &key)
                .with_context("partition", &partition)
            })?;
            out.push(cp);
        }
        out.sort_by(|a, b| a.partition.as_str().cmp(b.partition.as_str()));
        Ok(out)
    }

    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        if checkpoints.is_empty() {
            return Ok(());
        }
        let key = self.key("cp", pipeline);
        let leases = self.key("ls", pipeline);
        let refused: usize = self
            .retry("committing checkpoints", |mut c| {
                let mut inv = self.commit.key(&key);
                inv.key(&leases);
                inv.arg(checkpoints.len());
                for cp in checkpoints {
                    let (fence, pos, value) = encode(cp);
                    inv.arg(cp.partition.as_str())
                        .arg(fence)
                        .arg(pos)
                        .arg(value);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        if refused == 0 {
            return Ok(());
        }
        let cp = &checkpoints[refused - 1];
        let lease = self
            .leases(pipeline)
            .await?
            .into_iter()
            .find(|l| l.partition == cp.partition);
        rules::check_lease_fence(lease.map(|l| l.epoch), cp)?;
        let stored = self
            .load(pipeline)
            .await?
            .into_iter()
            .find(|s| s.partition == cp.partition);
        Err(rules::check(stored.as_ref(), cp).err().unwrap_or_else(|| {
            Error::new(ErrorKind::Fenced, "checkpoint write refused")
                .with_context("partition", &cp.partition)
        }))
    }

    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        let key = self.key("cp", pipeline);
        let fields: Option<Vec<String>> =
            partitions.map(|ps| ps.iter().map(|p| p.as_str().to_string()).collect());
        self.retry("resetting checkpoints", |mut c| {
            let key = key.clone();
            let fields = fields.clone();
            async move {
                match fields {
                    Some(f) if f.is_empty() => Ok(()),
                    Some(f) => {
                        redis::cmd("HDEL")
                            .arg(&key)
                            .arg(f)
                            .query_async(&mut c)
                            .await
                    }
                    None => redis::cmd("DEL").arg(&key).query_async(&mut c).await,
                }
            }
        })
        .await
    }
}

#[async_trait]
impl DedupStore for RedisStore {
    fn describe(&self) -> String {
        self.describe_url()
    }

    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = self.key("dd", pipeline);
        let names: Vec<String> = keys
            .iter()
            .map(|k| format!("{prefix}:{}", hex(k.as_bytes())))
            .collect();
        let found: Vec<Option<u8>> = self
            .retry("checking dedup marks", |mut c| {
                let names = names.clone();
                async move { redis::cmd("MGET").arg(names).query_async(&mut c).await }
            })
            .await?;
        Ok(found.into_iter().map(|v| v.is_some()).collect())
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
        let prefix = self.key("dd", pipeline);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let names: Vec<String> = keys
            .iter()
            .map(|k| format!("{prefix}:{}", hex(k.as_bytes())))
            .collect();
        self.retry("writing dedup marks", |mut c| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for n in &names {
                pipe.cmd("SET").arg(n).arg(1).arg("PX").arg(ttl_ms).ignore();
            }
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_keeps_order() {
        let big =
            Position::parse_decimal("49590338271490256608559692538361571095921575989136588898")
                .unwrap();
        for pos in [Position::from(0u64), Position::from(300u64), big] {
            let cp = Checkpoint::new(PartitionId::new("p"), pos).with_fence(Some(7));
            let (_, _, value) = encode(&cp);
            assert_eq!(decode("p".into(), &value), Some(cp));
        }
        let a = hex(&Position::from(255u64).to_ordered_bytes());
        let b = hex(&Position::from(256u64).to_ordered_bytes());
        assert!((a.len(), &a) < (b.len(), &b));
    }

    #[test]
    fn passwords_never_appear_in_debug() {
        let cfg = RedisConfig {
            url: "redis://:s3cret@cache.internal:6379/0".into(),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }
}
