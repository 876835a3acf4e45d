//! The exactly-once table sink: rows, marks and checkpoints in one transaction.

use super::*;

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
