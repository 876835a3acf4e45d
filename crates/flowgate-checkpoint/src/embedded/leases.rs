//! Leases, checked and changed in one redb transaction each.

use super::*;

impl EmbeddedStore {
    pub(super) fn lease_in(
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
    pub(super) async fn update_lease(
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

    pub(super) fn put_lease(
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
