//! Leases: one row per partition, single conditional statements timed by the server's clock.

use super::*;

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
