//! The embedded store: one redb file, no server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::{
    Checkpoint, CheckpointStore, DedupStore, Error, ErrorKind, IdempotencyKey, Lease, LeaseStore,
    PartitionId, Position, PositionRange, Record, Sink, SinkCapabilities, TxContext, WriteError,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::rules::{self, LeaseRecord, Transition, check, check_lease_fence, now_ms};

const META: TableDefinition<'static, &str, &str> = TableDefinition::new("flowgate_meta");
const CHECKPOINTS: TableDefinition<'static, &str, &[u8]> =
    TableDefinition::new("flowgate_checkpoints");
/// `pipeline \0 key` → expiry (8 bytes, big-endian ms since the epoch).
const MARKS: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("flowgate_dedup");
/// `pipeline \0 partition \0 first` → expiry (8 bytes) ++ last; positions in ordered bytes.
const RANGES: TableDefinition<'static, &[u8], &[u8]> =
    TableDefinition::new("flowgate_dedup_ranges");
/// `pipeline \0 partition` → the lease (JSON [`LeaseRecord`]).
const LEASES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("flowgate_leases");
const FORMAT_KEY: &str = "format";
const FORMAT: &str = "flowgate-embedded-store/1";
/// redb's page cache. Its default (1 GiB) lets the process grow with the store's history;
/// checkpoints and recent marks are a small working set.
const CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Where the incremental sweep of expired marks stopped (key in `META`).
const SWEEP_CURSOR: &str = "dedup_sweep_cursor";
const RANGE_SWEEP_CURSOR: &str = "dedup_range_sweep_cursor";
/// Marks examined by the sweep per mark written (amortised O(1) cleanup, no expiry index).
const SWEEP_FACTOR: usize = 2;

/// The embedded checkpoint and dedup store: one redb file (`flowgate.redb` in the data
/// directory).
///
/// - **Crash safety**: redb is copy-on-write with checksummed commit slots; a crash leaves
///   the last committed state.
/// - **Durability**: every `commit`, `mark` and table-sink transaction is `fsync`ed
///   ([`redb::Durability::Immediate`]) before it returns.
/// - **Identity**: the file carries a format marker; a foreign or corrupt file is refused at
///   open with an error naming the path. One process at a time holds the file (redb's lock).
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct StoredCheckpoint {
    position: Position,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fence: Option<u64>,
}

fn corrupt(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("the embedded store {what}"))
        .with_context("path", path.display())
        .with_context("cause", e)
        .with_hint("move the file away (flowgate refuses to guess) or point the store at another directory")
}

fn storage(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Transient,
        format!("embedded store: {what} failed"),
    )
    .with_context("path", path.display())
    .with_context("cause", e)
}

fn cp_key(pipeline: &str, partition: &str) -> String {
    format!("{pipeline}\u{0}{partition}")
}

fn hex_encode(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 15) as usize] as char);
    }
    s
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

fn expiry_of(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn range_prefix(pipeline: &str, partition: &PartitionId) -> Vec<u8> {
    let mut k = Vec::with_capacity(pipeline.len() + partition.as_str().len() + 20);
    k.extend_from_slice(pipeline.as_bytes());
    k.push(0);
    k.extend_from_slice(partition.as_str().as_bytes());
    k.push(0);
    k
}

fn mark_key(pipeline: &str, key: &IdempotencyKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(pipeline.len() + 1 + key.as_bytes().len());
    k.extend_from_slice(pipeline.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store `flowgate.redb` in `dir`.
    pub async fn open_dir(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::config("cannot create the data directory")
                .with_context("path", dir.display())
                .with_source(e)
        })?;
        Self::open(dir.join("flowgate.redb")).await
    }

    /// Opens (creating if needed) the store file at `path`.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let p2 = path.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(p2))
            .await
            .map_err(|e| storage(&path, "open", e))?
    }

    fn open_blocking(path: PathBuf) -> Result<Self, Error> {
        let existed = path.exists()
            && std::fs::metadata(&path)
                .map(|m| m.len() > 0)
                .unwrap_or(false);
        let db = match Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(Error::config("the embedded store is already open in another process")
                    .with_context("path", path.display())
                    .with_hint("run one flowgate process per data directory, or use a shared store (PostgreSQL, Redis)"));
            }
            Err(e) => {
                return Err(corrupt(
                    &path,
                    "file cannot be opened as a flowgate store",
                    e,
                ));
            }
        };
        let store = EmbeddedStore {
            db: Arc::new(db),
            path,
        };
        store.check_identity(existed)?;
        Ok(store)
    }

    fn check_identity(&self, existed: bool) -> Result<(), Error> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| corrupt(&self.path, "meta table is unreadable", e))?;
            let format = meta
                .get(FORMAT_KEY)
                .map_err(|e| corrupt(&self.path, "meta table is unreadable", e))?
                .map(|v| v.value().to_string());
            match format {
                Some(f) if f == FORMAT => {}
                Some(other) => {
                    return Err(corrupt(&self.path, "file has an unknown format", other));
                }
                None if existed => {
                    // An existing redb file without our marker: someone else's database.
                    let tables = txn.list_tables().map(|t| t.count()).unwrap_or(0);
                    if tables > 1 {
                        return Err(corrupt(
                            &self.path,
                            "file is a redb database that flowgate did not create",
                            "no format marker",
                        ));
                    }
                    meta.insert(FORMAT_KEY, FORMAT)
                        .map_err(|e| storage(&self.path, "init", e))?;
                }
                None => {
                    meta.insert(FORMAT_KEY, FORMAT)
                        .map_err(|e| storage(&self.path, "init", e))?;
                }
            }
            txn.open_table(CHECKPOINTS)
                .map_err(|e| corrupt(&self.path, "checkpoint table is unreadable", e))?;
            txn.open_table(MARKS)
                .map_err(|e| corrupt(&self.path, "dedup table is unreadable", e))?;
            txn.open_table(RANGES)
                .map_err(|e| corrupt(&self.path, "dedup range table is unreadable", e))?;
            txn.open_table(LEASES)
                .map_err(|e| corrupt(&self.path, "lease table is unreadable", e))?;
        }
        txn.commit()
            .map_err(|e| storage(&self.path, "init commit", e))
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A table of the current snapshot, for reading.
    fn read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: TableDefinition<'_, K, V>,
        what: &'static str,
    ) -> Result<redb::ReadOnlyTable<K, V>, Error> {
        self.db
            .begin_read()
            .map_err(|e| storage(&self.path, "begin read", e))?
            .open_table(def)
            .map_err(|e| storage(&self.path, what, e))
    }

    fn begin_write(&self) -> Result<WriteTransaction, Error> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| storage(&self.path, "begin write", e))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| storage(&self.path, "set durability", e))?;
        Ok(txn)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| storage(&self.path, "blocking task", e))?
    }

    fn commit_checkpoints_in(
        &self,
        txn: &WriteTransaction,
        pipeline: &str,
        cps: &[Checkpoint],
    ) -> Result<(), Error> {
        let mut table = txn
            .open_table(CHECKPOINTS)
            .map_err(|e| storage(&self.path, "open checkpoints", e))?;
        let leases = txn
            .open_table(LEASES)
            .map_err(|e| storage(&self.path, "open leases", e))?;
        for c in cps {
            let key = cp_key(pipeline, c.partition.as_str());
            let lease = self.lease_in(&leases, &key)?;
            check_lease_fence(lease.map(|l| l.epoch), c)?;
            let stored = match table
                .get(key.as_str())
                .map_err(|e| storage(&self.path, "read checkpoint", e))?
            {
                Some(v) => Some(self.decode_checkpoint(&c.partition, v.value())?),
                None => None,
            };
            if check(stored.as_ref(), c)? == Transition::Write {
                let value = serde_json::to_vec(&StoredCheckpoint {
                    position: c.position.clone(),
                    fence: c.fence,
                })
                .map_err(|e| storage(&self.path, "encode checkpoint", e))?;
                table
                    .insert(key.as_str(), value.as_slice())
                    .map_err(|e| storage(&self.path, "write checkpoint", e))?;
            }
        }
        Ok(())
    }

    /// Every entry of `pipeline` in a table keyed `pipeline \0 partition`, decoded.
    async fn scan<T: Send + 'static>(
        &self,
        def: TableDefinition<'static, &'static str, &'static [u8]>,
        what: &'static str,
        pipeline: &str,
        decode: impl Fn(&EmbeddedStore, PartitionId, &[u8]) -> Result<T, Error> + Send + 'static,
    ) -> Result<Vec<T>, Error> {
        let pipeline = pipeline.to_string();
        self.blocking(move |s| {
            let table = s.read_table(def, what)?;
            let lo = format!("{pipeline}\u{0}");
            let hi = format!("{pipeline}\u{1}");
            let mut out = Vec::new();
            for item in table
                .range::<&str>(lo.as_str()..hi.as_str())
                .map_err(|e| storage(&s.path, "scan", e))?
            {
                let (k, v) = item.map_err(|e| storage(&s.path, "scan", e))?;
                out.push(decode(
                    s,
                    PartitionId::new(&k.value()[lo.len()..]),
                    v.value(),
                )?);
            }
            Ok(out)
        })
        .await
    }

    fn lease_in(
        &self,
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &str,
    ) -> Result<Option<LeaseRecord>, Error> {
        let Some(v) = table
            .get(key)
            .map_err(|e| storage(&self.path, "read lease", e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(v.value()).map(Some).map_err(|e| {
            corrupt(
                &self.path,
                "holds an unreadable lease",
                format!("{key}: {e}"),
            )
        })
    }

    /// Applies `change` to the lease of `lease.partition` if the caller still holds it.
    async fn update_lease(
        &self,
        pipeline: &str,
        lease: &Lease,
        change: impl FnOnce(&LeaseRecord, u64) -> LeaseRecord + Send + 'static,
    ) -> Result<Lease, Error> {
        let key = cp_key(pipeline, lease.partition.as_str());
        let lease = lease.clone();
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            let view = {
                let mut table = txn
                    .open_table(LEASES)
                    .map_err(|e| storage(&s.path, "open leases", e))?;
                let stored = s.lease_in(&table, &key)?;
                let now = now_ms();
                let next = change(rules::check_holder(stored.as_ref(), &lease)?, now);
                s.put_lease(&mut table, &key, &next)?;
                rules::view(lease.partition.clone(), &next, now)
            };
            txn.commit().map_err(|e| storage(&s.path, "commit", e))?;
            Ok(view)
        })
        .await
    }

    fn put_lease(
        &self,
        table: &mut redb::Table<'_, &'static str, &'static [u8]>,
        key: &str,
        lease: &LeaseRecord,
    ) -> Result<(), Error> {
        let value =
            serde_json::to_vec(lease).map_err(|e| storage(&self.path, "encode lease", e))?;
        table
            .insert(key, value.as_slice())
            .map_err(|e| storage(&self.path, "write lease", e))?;
        Ok(())
    }

    fn decode_checkpoint(
        &self,
        partition: &PartitionId,
        bytes: &[u8],
    ) -> Result<Checkpoint, Error> {
        let s: StoredCheckpoint = serde_json::from_slice(bytes).map_err(|e| {
            corrupt(
                &self.path,
                "holds an unreadable checkpoint",
                format!("partition {partition}: {e}"),
            )
        })?;
        Ok(Checkpoint {
            partition: partition.clone(),
            position: s.position,
            fence: s.fence,
        })
    }

    fn mark_in(
        &self,
        txn: &WriteTransaction,
        pipeline: &str,
        keys: &[IdempotencyKey],
        ttl: Duration,
    ) -> Result<(), Error> {
        let now = now_ms();
        let expires = now.saturating_add(ttl.as_millis() as u64).to_be_bytes();
        let mut marks = txn
            .open_table(MARKS)
            .map_err(|e| storage(&self.path, "open dedup", e))?;
        let mut key = Vec::with_capacity(64);
        for k in keys {
            key.clear();
            key.extend_from_slice(pipeline.as_bytes());
            key.push(0);
            key.extend_from_slice(k.as_bytes());
            marks
                .insert(key.as_slice(), expires.as_slice())
                .map_err(|e| storage(&self.path, "write mark", e))?;
        }
        self.sweep(
            txn,
            &mut marks,
            SWEEP_CURSOR,
            keys.len() * SWEEP_FACTOR,
            now,
        )
    }

    fn mark_ranges_in(
        &self,
        txn: &WriteTransaction,
        pipeline: &str,
        ranges: &[PositionRange],
        ttl: Duration,
    ) -> Result<(), Error> {
        let now = now_ms();
        let expires = now.saturating_add(ttl.as_millis() as u64);
        let mut table = txn
            .open_table(RANGES)
            .map_err(|e| storage(&self.path, "open dedup ranges", e))?;
        for r in ranges {
            // Ranges of a partition never overlap: a new range is merged with the one it
            // overlaps (and swallows the ones it covers), so a lookup only ever needs the
            // last range starting at or before a position.
            let prefix = range_prefix(pipeline, &r.partition);
            let key_of = |p: &Position| {
                let mut k = prefix.clone();
                k.extend_from_slice(&p.to_ordered_bytes());
                k
            };
            let (mut first, mut last, mut exp) = (r.first.clone(), r.last.clone(), expires);
            let mut remove: Vec<Vec<u8>> = Vec::new();
            let start = key_of(&first);
            let pred: Option<(Vec<u8>, Vec<u8>)> = match table
                .range::<&[u8]>(prefix.as_slice()..=start.as_slice())
                .map_err(|e| storage(&self.path, "scan dedup ranges", e))?
                .next_back()
            {
                Some(item) => {
                    let (k, v) = item.map_err(|e| storage(&self.path, "scan dedup ranges", e))?;
                    Some((k.value().to_vec(), v.value().to_vec()))
                }
                None => None,
            };
            if let Some((pk, pv)) = pred {
                let (pexp, plast) = self.decode_range_value(&pv)?;
                if plast >= first {
                    first = Position::from_ordered_bytes(&pk[prefix.len()..]).ok_or_else(|| {
                        corrupt(&self.path, "holds an unreadable dedup range", "bad key")
                    })?;
                    if plast > last {
                        last = plast;
                    }
                    exp = exp.max(pexp);
                    remove.push(pk);
                }
            }
            let end = key_of(&last);
            let mut swallowed: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for item in table
                .range::<&[u8]>(start.as_slice()..=end.as_slice())
                .map_err(|e| storage(&self.path, "scan dedup ranges", e))?
            {
                let (k, v) = item.map_err(|e| storage(&self.path, "scan dedup ranges", e))?;
                swallowed.push((k.value().to_vec(), v.value().to_vec()));
            }
            for (k, v) in swallowed {
                let (sexp, slast) = self.decode_range_value(&v)?;
                if slast > last {
                    last = slast;
                }
                exp = exp.max(sexp);
                remove.push(k);
            }
            for k in remove {
                table
                    .remove(k.as_slice())
                    .map_err(|e| storage(&self.path, "merge dedup ranges", e))?;
            }
            let mut value = exp.to_be_bytes().to_vec();
            value.extend_from_slice(&last.to_ordered_bytes());
            table
                .insert(key_of(&first).as_slice(), value.as_slice())
                .map_err(|e| storage(&self.path, "write dedup range", e))?;
        }
        self.sweep(
            txn,
            &mut table,
            RANGE_SWEEP_CURSOR,
            ranges.len() * SWEEP_FACTOR,
            now,
        )
    }

    fn decode_range_value(&self, v: &[u8]) -> Result<(u64, Position), Error> {
        let bad = || {
            corrupt(
                &self.path,
                "holds an unreadable dedup range",
                "bad encoding",
            )
        };
        let (exp, last) = v.split_at_checked(8).ok_or_else(bad)?;
        let exp = u64::from_be_bytes(exp.try_into().map_err(|_| bad())?);
        Ok((exp, Position::from_ordered_bytes(last).ok_or_else(bad)?))
    }

    /// Incremental sweep: walks `budget` entries from where the last sweep stopped and removes
    /// the expired ones (values start with their 8-byte expiry). Cleanup is amortised over the
    /// writes and needs no expiry index.
    fn sweep(
        &self,
        txn: &WriteTransaction,
        table: &mut redb::Table<'_, &[u8], &[u8]>,
        cursor_key: &str,
        budget: usize,
        now: u64,
    ) -> Result<(), Error> {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| storage(&self.path, "open meta", e))?;
        let cursor: Vec<u8> = meta
            .get(cursor_key)
            .map_err(|e| storage(&self.path, "read sweep cursor", e))?
            .and_then(|v| hex_decode(v.value()))
            .unwrap_or_default();
        let mut expired: Vec<Vec<u8>> = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        let mut walked = 0;
        for item in table
            .range::<&[u8]>(cursor.as_slice()..)
            .map_err(|e| storage(&self.path, "sweep", e))?
            .take(budget)
        {
            let (k, v) = item.map_err(|e| storage(&self.path, "sweep", e))?;
            if expiry_of(v.value()) <= now {
                expired.push(k.value().to_vec());
            }
            last = Some(k.value().to_vec());
            walked += 1;
        }
        for k in &expired {
            table
                .remove(k.as_slice())
                .map_err(|e| storage(&self.path, "sweep", e))?;
        }
        // Past the end: start over from the beginning next time.
        let next = match last {
            Some(mut l) if walked == budget => {
                l.push(0);
                hex_encode(&l)
            }
            _ => String::new(),
        };
        meta.insert(cursor_key, next.as_str())
            .map_err(|e| storage(&self.path, "write sweep cursor", e))?;
        Ok(())
    }

    /// A sink appending records as rows to table `name` of this store, transactionally with
    /// the dedup marks and checkpoints (exactly-once).
    pub fn table_sink(&self, name: &str) -> TableSink {
        TableSink {
            store: self.clone(),
            table: format!("rows:{name}"),
        }
    }
}

#[async_trait]
impl CheckpointStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        self.scan(
            CHECKPOINTS,
            "checkpoints",
            pipeline,
            |s, partition, value| s.decode_checkpoint(&partition, value),
        )
        .await
    }

    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        let pipeline = pipeline.to_string();
        let cps = checkpoints.to_vec();
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            s.commit_checkpoints_in(&txn, &pipeline, &cps)?;
            txn.commit().map_err(|e| storage(&s.path, "commit", e))
        })
        .await
    }

    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        let pipeline = pipeline.to_string();
        let partitions = partitions.map(<[PartitionId]>::to_vec);
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            {
                let mut table = txn
                    .open_table(CHECKPOINTS)
                    .map_err(|e| storage(&s.path, "open checkpoints", e))?;
                let keys: Vec<String> = match partitions {
                    Some(ps) => ps.iter().map(|p| cp_key(&pipeline, p.as_str())).collect(),
                    None => {
                        let lo = format!("{pipeline}\u{0}");
                        let hi = format!("{pipeline}\u{1}");
                        let mut ks = Vec::new();
                        for item in table
                            .range::<&str>(lo.as_str()..hi.as_str())
                            .map_err(|e| storage(&s.path, "scan", e))?
                        {
                            ks.push(
                                item.map_err(|e| storage(&s.path, "scan", e))?
                                    .0
                                    .value()
                                    .to_string(),
                            );
                        }
                        ks
                    }
                };
                for k in keys {
                    table
                        .remove(k.as_str())
                        .map_err(|e| storage(&s.path, "reset", e))?;
                }
            }
            txn.commit().map_err(|e| storage(&s.path, "commit", e))
        })
        .await
    }
}

#[async_trait]
impl DedupStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = pipeline.to_string();
        let keys = keys.to_vec();
        self.blocking(move |s| {
            let now = now_ms();
            let marks = s.read_table(MARKS, "open dedup")?;
            keys.iter()
                .map(|k| {
                    let mk = mark_key(&pipeline, k);
                    Ok(marks
                        .get(mk.as_slice())
                        .map_err(|e| storage(&s.path, "read mark", e))?
                        .is_some_and(|v| expiry_of(v.value()) > now))
                })
                .collect()
        })
        .await
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
        let pipeline = pipeline.to_string();
        let keys = keys.to_vec();
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            s.mark_in(&txn, &pipeline, &keys, ttl)?;
            txn.commit().map_err(|e| storage(&s.path, "commit", e))
        })
        .await
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
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = range_prefix(pipeline, partition);
        let positions = positions.to_vec();
        self.blocking(move |s| {
            let now = now_ms();
            let table = s.read_table(RANGES, "open dedup ranges")?;
            // One scan per call, not one search per position: visit positions in order and
            // the ranges starting at or before each, keeping the furthest live `last`.
            let mut order: Vec<usize> = (0..positions.len()).collect();
            if !positions.windows(2).all(|w| w[0] <= w[1]) {
                order.sort_by(|a, b| positions[*a].cmp(&positions[*b]));
            }
            let key_of = |p: &Position| {
                let mut k = prefix.clone();
                k.extend_from_slice(&p.to_ordered_bytes());
                k
            };
            let lo = key_of(&positions[order[0]]);
            let hi = key_of(&positions[order[order.len() - 1]]);
            let mut ranges: Vec<(Position, Position)> = Vec::new();
            // Ranges never overlap (see `mark_ranges_in`): the last one starting before the
            // first probe, then those starting among the probes.
            let before = table
                .range::<&[u8]>(prefix.as_slice()..lo.as_slice())
                .map_err(|e| storage(&s.path, "scan dedup ranges", e))?
                .next_back();
            let inside = table
                .range::<&[u8]>(lo.as_slice()..=hi.as_slice())
                .map_err(|e| storage(&s.path, "scan dedup ranges", e))?;
            for item in before.into_iter().chain(inside) {
                let (k, v) = item.map_err(|e| storage(&s.path, "scan dedup ranges", e))?;
                let (exp, last) = s.decode_range_value(v.value())?;
                if exp <= now {
                    continue;
                }
                let first =
                    Position::from_ordered_bytes(&k.value()[prefix.len()..]).ok_or_else(|| {
                        corrupt(&s.path, "holds an unreadable dedup range", "bad key")
                    })?;
                ranges.push((first, last));
            }
            ranges.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = vec![false; positions.len()];
            let mut furthest: Option<&Position> = None;
            let mut next = 0;
            for ix in order {
                let p = &positions[ix];
                while next < ranges.len() && ranges[next].0 <= *p {
                    if furthest.is_none_or(|f| ranges[next].1 > *f) {
                        furthest = Some(&ranges[next].1);
                    }
                    next += 1;
                }
                out[ix] = furthest.is_some_and(|f| f >= p);
            }
            Ok(out)
        })
        .await
    }

    async fn last_marked_position(
        &self,
        pipeline: &str,
        partition: &PartitionId,
    ) -> Result<Option<Position>, Error> {
        let prefix = range_prefix(pipeline, partition);
        self.blocking(move |s| {
            let now = now_ms();
            let table = s.read_table(RANGES, "open dedup ranges")?;
            // The prefix ends in a 0 byte: the same prefix ending in 1 bounds its keys.
            let mut end = prefix.clone();
            if let Some(b) = end.last_mut() {
                *b = 1;
            }
            // Ranges never overlap (see `mark_ranges_in`): walking back from the last one
            // started, the first live range holds the highest live position.
            let scan = table
                .range::<&[u8]>(prefix.as_slice()..end.as_slice())
                .map_err(|e| storage(&s.path, "scan dedup ranges", e))?;
            for item in scan.rev() {
                let (_, v) = item.map_err(|e| storage(&s.path, "scan dedup ranges", e))?;
                let (exp, last) = s.decode_range_value(v.value())?;
                if exp > now {
                    return Ok(Some(last));
                }
            }
            Ok(None)
        })
        .await
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
        let pipeline = pipeline.to_string();
        let ranges = ranges.to_vec();
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            s.mark_ranges_in(&txn, &pipeline, &ranges, ttl)?;
            txn.commit().map_err(|e| storage(&s.path, "commit", e))
        })
        .await
    }
}

/// Appends records as rows to a table of the [`EmbeddedStore`]; with
/// [`write_transactional`](Sink::write_transactional) the rows and their dedup marks are
/// committed in one redb transaction, so a replay after a crash skips exactly
/// the records whose rows exist: exactly-once into this table.
///
/// Rows are numbered in write order; each holds the record as JSON.
#[derive(Clone)]
pub struct TableSink {
    store: EmbeddedStore,
    table: String,
}

#[derive(Serialize, Deserialize)]
struct Row {
    partition: String,
    position: Position,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<Bytes>,
    payload: Bytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<Bytes>,
}

impl TableSink {
    fn append_in(&self, txn: &WriteTransaction, batch: &[Record]) -> Result<(), Error> {
        let s = &self.store;
        let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&self.table);
        let mut table = txn
            .open_table(def)
            .map_err(|e| storage(&s.path, "open rows", e))?;
        let first = table
            .last()
            .map_err(|e| storage(&s.path, "read rows", e))?
            .map_or(0, |(k, _)| k.value() + 1);
        for (next, r) in (first..).zip(batch) {
            let row = Row {
                partition: r.partition.to_string(),
                position: r.position.clone(),
                key: r.key.clone(),
                payload: r.payload.clone(),
                idempotency_key: r.idempotency_key.as_ref().map(IdempotencyKey::to_bytes),
            };
            let v = serde_json::to_vec(&row)
                .map_err(|e| Error::poison("record cannot be stored").with_source(e))?;
            table
                .insert(next, v.as_slice())
                .map_err(|e| storage(&s.path, "write row", e))?;
        }
        Ok(())
    }

    /// Every row, in write order.
    pub async fn rows(&self) -> Result<Vec<Record>, Error> {
        let me = self.clone();
        self.store
            .blocking(move |s| {
                let txn =
                    s.db.begin_read()
                        .map_err(|e| storage(&s.path, "begin read", e))?;
                let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&me.table);
                let table = match txn.open_table(def) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(storage(&s.path, "open rows", e)),
                };
                let mut out = Vec::new();
                for item in table.iter().map_err(|e| storage(&s.path, "scan rows", e))? {
                    let (_, v) = item.map_err(|e| storage(&s.path, "scan rows", e))?;
                    let row: Row = serde_json::from_slice(v.value())
                        .map_err(|e| corrupt(&s.path, "holds an unreadable row", e))?;
                    let mut r =
                        Record::new(PartitionId::new(&row.partition), row.position, row.payload);
                    r.key = row.key;
                    r.idempotency_key = row.idempotency_key.map(IdempotencyKey::new);
                    out.push(r);
                }
                Ok(out)
            })
            .await
    }
}

#[async_trait]
impl Sink for TableSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic()
            .with_transactional(true)
            .with_forwards_idempotency_key(true)
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        if batch.is_empty() {
            return Ok(());
        }
        let me = self.clone();
        let batch = batch.to_vec();
        Ok(self
            .store
            .blocking(move |s| {
                let txn = s.begin_write()?;
                me.append_in(&txn, &batch)?;
                txn.commit().map_err(|e| storage(&s.path, "commit", e))
            })
            .await?)
    }

    async fn write_transactional(
        &self,
        batch: &[Record],
        tx: &TxContext<'_>,
    ) -> Result<(), WriteError> {
        let me = self.clone();
        let batch = batch.to_vec();
        let pipeline = tx.pipeline.to_string();
        let marks = tx.dedup_marks.to_vec();
        let ttl = tx.dedup_ttl;
        Ok(self
            .store
            .blocking(move |s| {
                let txn = s.begin_write()?;
                me.append_in(&txn, &batch)?;
                s.mark_in(&txn, &pipeline, &marks, ttl)?;
                txn.commit().map_err(|e| storage(&s.path, "commit", e))
            })
            .await?)
    }
}

#[async_trait]
impl LeaseStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn leases(&self, pipeline: &str) -> Result<Vec<Lease>, Error> {
        let now = now_ms();
        self.scan(
            LEASES,
            "open leases",
            pipeline,
            move |s, partition, value| {
                let record: LeaseRecord = serde_json::from_slice(value).map_err(|e| {
                    corrupt(
                        &s.path,
                        "holds an unreadable lease",
                        format!("{partition}: {e}"),
                    )
                })?;
                Ok(rules::view(partition, &record, now))
            },
        )
        .await
    }

    async fn acquire(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        owner: &str,
        ttl: Duration,
        steal: Option<u64>,
    ) -> Result<Option<Lease>, Error> {
        let key = cp_key(pipeline, partition.as_str());
        let (partition, owner) = (partition.clone(), owner.to_string());
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            let view = {
                let mut table = txn
                    .open_table(LEASES)
                    .map_err(|e| storage(&s.path, "open leases", e))?;
                let stored = s.lease_in(&table, &key)?;
                let now = now_ms();
                let Some(taken) = rules::acquire(stored.as_ref(), &owner, now, ttl, steal) else {
                    return Ok(None);
                };
                s.put_lease(&mut table, &key, &taken)?;
                rules::view(partition, &taken, now)
            };
            txn.commit().map_err(|e| storage(&s.path, "commit", e))?;
            Ok(Some(view))
        })
        .await
    }

    async fn renew(&self, pipeline: &str, lease: &Lease, ttl: Duration) -> Result<Lease, Error> {
        self.update_lease(pipeline, lease, move |l, now| rules::renewed(l, now, ttl))
            .await
    }

    async fn release(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.update_lease(pipeline, lease, |l, _| rules::given_up(l, false))
            .await
            .map(|_| ())
    }

    async fn finish(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.update_lease(pipeline, lease, |l, _| rules::given_up(l, true))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::testkit;

    struct H(tempfile::TempDir);

    #[async_trait]
    impl testkit::store::StoreHarness for H {
        type Store = EmbeddedStore;
        async fn open(&self) -> Arc<EmbeddedStore> {
            // Re-opening needs the previous handle dropped: redb holds an exclusive lock.
            let mut tries = 0;
            loop {
                match EmbeddedStore::open_dir(self.0.path()).await {
                    Ok(s) => return Arc::new(s),
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn embedded_store_passes_the_conformance_suite() {
        testkit::store::run_all(&H(tempfile::tempdir().unwrap())).await;
    }

    struct SinkH(EmbeddedStore);

    #[async_trait]
    impl testkit::sink::SinkHarness for SinkH {
        type Sink = TableSink;
        async fn open_sink(&self) -> Result<TableSink, Error> {
            Ok(self.0.table_sink("conformance"))
        }
        async fn read_back(&self) -> Result<Vec<Record>, Error> {
            self.0.table_sink("conformance").rows().await
        }
    }

    #[tokio::test]
    async fn table_sink_passes_the_sink_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_dir(dir.path()).await.unwrap();
        testkit::sink::run_all(&SinkH(store)).await;
    }

    #[tokio::test]
    async fn garbage_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flowgate.redb");
        std::fs::write(
            &path,
            b"this is not a database, it is a shopping list\n".repeat(100),
        )
        .unwrap();
        let err = EmbeddedStore::open(&path)
            .await
            .err()
            .expect("a garbage file must be refused");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = EmbeddedStore::open_dir(dir.path()).await.unwrap();
        let err = EmbeddedStore::open_dir(dir.path())
            .await
            .err()
            .expect("second open must fail");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    }

    #[tokio::test]
    async fn transactional_write_commits_rows_and_marks_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_dir(dir.path()).await.unwrap();
        let sink = store.table_sink("t");
        let recs: Vec<Record> = (0..3u64)
            .map(|i| {
                Record::new(PartitionId::new("p"), Position::from(i), Bytes::from("x"))
                    .with_idempotency_key(IdempotencyKey::new(format!("k{i}")))
            })
            .collect();
        let keys: Vec<IdempotencyKey> = recs
            .iter()
            .filter_map(|r| r.idempotency_key.clone())
            .collect();
        let tx = TxContext {
            pipeline: "pl",
            dedup_marks: &keys,
            dedup_ttl: Duration::from_secs(60),
        };
        sink.write_transactional(&recs, &tx).await.unwrap();
        assert_eq!(sink.rows().await.unwrap().len(), 3);
        assert_eq!(store.seen("pl", &keys).await.unwrap(), vec![true; 3]);
        drop((sink, store));
        let store = EmbeddedStore::open_dir(dir.path()).await.unwrap();
        assert_eq!(
            store.table_sink("t").rows().await.unwrap().len(),
            3,
            "rows are durable"
        );
        assert_eq!(
            store.seen("pl", &keys).await.unwrap(),
            vec![true; 3],
            "marks are durable"
        );
        assert_eq!(
            store
                .seen("pl", &[IdempotencyKey::new("k9")])
                .await
                .unwrap(),
            vec![false]
        );
    }
}
