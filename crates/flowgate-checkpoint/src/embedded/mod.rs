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

    /// A sink appending records as rows to table `name` of this store, transactionally with
    /// the dedup marks and checkpoints (exactly-once).
    pub fn table_sink(&self, name: &str) -> TableSink {
        TableSink {
            store: self.clone(),
            table: format!("rows:{name}"),
        }
    }
}

mod checkpoints;
mod dedup;
mod leases;
mod table_sink;

pub use table_sink::TableSink;

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
