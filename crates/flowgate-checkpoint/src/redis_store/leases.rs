//! Leases: one hash per pipeline, changed by Lua scripts timed by the server's clock.

use super::*;

/// A stored lease: `epoch|expires-ms|finished|owner` (empty owner: not held), viewed at the
/// server time `now_ms`.
fn decode_lease(partition: String, value: &str, now_ms: u64) -> Option<Lease> {
    let mut parts = value.splitn(4, '|');
    let epoch: u64 = parts.next()?.parse().ok()?;
    let expires: u64 = parts.next()?.parse().ok()?;
    let finished = parts.next()? == "1";
    let owner = parts.next()?;
    let owner = (!owner.is_empty()).then(|| owner.to_string());
    let remaining = if owner.is_some() {
        Duration::from_millis(expires.saturating_sub(now_ms))
    } else {
        Duration::ZERO
    };
    Some(Lease {
        partition: PartitionId::new(partition),
        owner,
        epoch,
        remaining,
        finished,
    })
}

impl RedisStore {
    /// Runs the lease update script; `None` from the script means the lease was lost.
    async fn update_lease(
        &self,
        what: &'static str,
        pipeline: &str,
        lease: &Lease,
        mode: &'static str,
        ttl: Duration,
    ) -> Result<(), Error> {
        let key = self.key("ls", pipeline);
        let owner = lease.owner.clone().unwrap_or_default();
        let done: Option<i64> = self
            .retry(what, |mut c| {
                let mut inv = self.update.key(&key);
                inv.arg(lease.partition.as_str())
                    .arg(&owner)
                    .arg(lease.epoch)
                    .arg(mode)
                    .arg(ttl_ms(ttl));
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        match done {
            Some(_) => Ok(()),
            None => Err(lease.lost()),
        }
    }
}

#[async_trait]
impl LeaseStore for RedisStore {
    fn describe(&self) -> String {
        self.describe_url()
    }

    async fn leases(&self, pipeline: &str) -> Result<Vec<Lease>, Error> {
        let key = self.key("ls", pipeline);
        let ((secs, micros), map): ((u64, u64), Vec<(String, String)>) = self
            .retry("reading leases", |mut c| {
                let mut pipe = redis::pipe();
                pipe.atomic().cmd("TIME").cmd("HGETALL").arg(&key);
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        let now = secs * 1000 + micros / 1000;
        let mut out = Vec::with_capacity(map.len());
        for (partition, value) in map {
            let lease = decode_lease(partition.clone(), &value, now).ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    "redis store: a stored lease cannot be read",
                )
                .with_context("key", &key)
                .with_context("partition", &partition)
            })?;
            out.push(lease);
        }
        out.sort_by(|a, b| a.partition.as_str().cmp(b.partition.as_str()));
        Ok(out)
    }

    async fn acquire(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        owner: &str,
        ttl: Duration,
        steal: Option<u64>,
    ) -> Result<Option<Lease>, Error> {
        if owner.is_empty() {
            return Err(Error::config("a lease owner must not be empty"));
        }
        let key = self.key("ls", pipeline);
        let steal = steal.map_or(-1, |e| i64::try_from(e).unwrap_or(i64::MAX));
        let epoch: Option<u64> = self
            .retry("taking a lease", |mut c| {
                let mut inv = self.acquire.key(&key);
                inv.arg(partition.as_str())
                    .arg(owner)
                    .arg(ttl_ms(ttl))
                    .arg(steal);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(epoch.map(|epoch| Lease {
            partition: partition.clone(),
            owner: Some(owner.to_string()),
            epoch,
            remaining: ttl,
            finished: false,
        }))
    }

    async fn renew(&self, pipeline: &str, lease: &Lease, ttl: Duration) -> Result<Lease, Error> {
        self.update_lease("renewing a lease", pipeline, lease, "renew", ttl)
            .await?;
        Ok(Lease {
            remaining: ttl,
            ..lease.clone()
        })
    }

    async fn release(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.update_lease(
            "releasing a lease",
            pipeline,
            lease,
            "release",
            Duration::ZERO,
        )
        .await
    }

    async fn finish(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.update_lease(
            "finishing a lease",
            pipeline,
            lease,
            "finish",
            Duration::ZERO,
        )
        .await
    }
}
