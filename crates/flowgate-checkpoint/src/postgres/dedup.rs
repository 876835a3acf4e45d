//! Dedup marks: one row per key, or one per range of positions.

use super::*;

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
