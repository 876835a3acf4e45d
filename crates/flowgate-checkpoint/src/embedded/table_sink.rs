//! The transactional table sink: rows, marks and checkpoints in one redb transaction.

use super::*;

/// Appends records as rows to a table of the [`EmbeddedStore`]; with
/// [`write_transactional`](Sink::write_transactional) the rows and their dedup marks are
/// committed in one redb transaction, so a replay after a crash skips exactly
/// the records whose rows exist: exactly-once into this table.
///
/// Rows are numbered in write order; each holds the record as JSON.
#[derive(Clone)]
pub struct TableSink {
    pub(super) store: EmbeddedStore,
    pub(super) table: String,
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
