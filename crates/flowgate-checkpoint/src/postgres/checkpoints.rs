//! Checkpoints: one conditional upsert per partition, in one transaction.

use super::*;

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
