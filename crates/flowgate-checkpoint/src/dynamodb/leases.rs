//! Leases in DynamoDB: conditional updates on epoch and counter, expiry judged by the
//! reader's monotonic clock (the AWS KCL's way), so that no two workers' clocks need agree.
//!
//! Every take raises `lease_epoch`; every change (take, renewal, release, finish) raises
//! `lease_counter`. A worker that has seen the same counter for the lease's ttl counts the
//! lease as expired. Its own takes and renewals count from the moment it sent them, which
//! makes the holder's view of its lease end no later than anyone else's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::ReturnValue;
use flowgate_core::{Error, Lease, LeaseStore, PartitionId};

use super::{DynamoDbStore, Item, SK, get_n, get_s, n, s};

pub(super) const EPOCH: &str = "lease_epoch";
const COUNTER: &str = "lease_counter";
const TTL_MS: &str = "lease_ttl_ms";
const OWNER: &str = "lease_owner";
const FINISHED: &str = "lease_finished";

/// A lease as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stored {
    epoch: u64,
    counter: u64,
    ttl: Duration,
    owner: Option<String>,
    finished: bool,
}

impl Stored {
    /// The lease an item holds; `None` if it holds none; `Err` if it cannot be read.
    fn decode(item: &Item) -> Result<Option<Stored>, ()> {
        if !item.contains_key(EPOCH) {
            return Ok(None);
        }
        Ok(Some(Stored {
            epoch: get_n(item, EPOCH).ok_or(())?,
            counter: get_n(item, COUNTER).ok_or(())?,
            ttl: Duration::from_millis(get_n(item, TTL_MS).ok_or(())?),
            owner: get_s(item, OWNER).map(str::to_string),
            finished: item
                .get(FINISHED)
                .map(|v| v.as_bool().copied().map_err(|_| ()))
                .transpose()?
                .unwrap_or(false),
        }))
    }
}

/// When this process first saw each lease in its current state.
#[derive(Default)]
pub(super) struct Observations(Mutex<HashMap<(String, String), (Stored, Instant)>>);

impl Observations {
    /// Records `stored` as seen at `at` (unless it was already seen in this state) and returns
    /// the time left before it expires for this process.
    fn observe(&self, pipeline: &str, partition: &str, stored: &Stored, at: Instant) -> Duration {
        let mut seen = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (pipeline.to_string(), partition.to_string());
        let since = match seen.get(&key) {
            Some((old, since)) if old == stored => *since,
            _ => {
                seen.insert(key, (stored.clone(), at));
                at
            }
        };
        if stored.owner.is_none() || stored.finished {
            return Duration::ZERO;
        }
        stored.ttl.saturating_sub(since.elapsed())
    }
}

fn lease_of(partition: &PartitionId, stored: &Stored, remaining: Duration) -> Lease {
    Lease {
        partition: partition.clone(),
        owner: stored.owner.clone(),
        epoch: stored.epoch,
        remaining,
        finished: stored.finished,
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl DynamoDbStore {
    fn stored_lease(&self, pipeline: &str, item: &Item) -> Result<Option<Stored>, Error> {
        Stored::decode(item)
            .map_err(|()| self.corrupt(pipeline, get_s(item, SK).unwrap_or_default(), "lease"))
    }

    /// Changes a lease the caller holds (same owner and epoch, not finished); `Fenced` if it
    /// lost it.
    async fn change_held(
        &self,
        what: &'static str,
        pipeline: &str,
        lease: &Lease,
        update: &'static str,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let key = self.item_key(pipeline, lease.partition.as_str());
        let owner = lease.owner.clone().unwrap_or_default();
        let started = Instant::now();
        let out = self
            .call(what, || {
                let mut call = self
                    .client
                    .update_item()
                    .table_name(&self.cfg.table)
                    .set_key(Some(key.clone()))
                    .update_expression(update)
                    .condition_expression(
                        "lease_owner = :owner AND lease_epoch = :epoch AND lease_finished = :no",
                    )
                    .expression_attribute_values(":owner", s(owner.clone()))
                    .expression_attribute_values(":epoch", n(lease.epoch))
                    .expression_attribute_values(
                        ":no",
                        aws_sdk_dynamodb::types::AttributeValue::Bool(false),
                    )
                    .expression_attribute_values(":one", n(1))
                    .return_values(ReturnValue::AllNew);
                if update.contains(":yes") {
                    call = call.expression_attribute_values(
                        ":yes",
                        aws_sdk_dynamodb::types::AttributeValue::Bool(true),
                    );
                }
                if let Some(ttl) = ttl {
                    call = call.expression_attribute_values(":ttl", n(ttl_ms(ttl)));
                }
                call.send()
            })
            .await?;
        match out {
            Ok(out) => {
                if let Some(stored) =
                    self.stored_lease(pipeline, out.attributes().unwrap_or(&Item::new()))?
                {
                    self.seen_leases
                        .observe(pipeline, lease.partition.as_str(), &stored, started);
                }
                Ok(())
            }
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Err(lease.lost()),
            Err(e) => Err(self.failed(what, e)),
        }
    }
}

#[async_trait]
impl LeaseStore for DynamoDbStore {
    fn describe(&self) -> String {
        self.describe_table()
    }

    async fn leases(&self, pipeline: &str) -> Result<Vec<Lease>, Error> {
        let items = self.partition_items(pipeline).await?;
        let read_at = Instant::now();
        let mut out = Vec::new();
        for item in &items {
            let Some(stored) = self.stored_lease(pipeline, item)? else {
                continue;
            };
            let partition = PartitionId::new(get_s(item, SK).unwrap_or_default());
            let remaining =
                self.seen_leases
                    .observe(pipeline, partition.as_str(), &stored, read_at);
            out.push(lease_of(&partition, &stored, remaining));
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
        let item = self
            .partition_item(pipeline, partition.as_str())
            .await?
            .unwrap_or_default();
        let read_at = Instant::now();
        let current = self.stored_lease(pipeline, &item)?;
        let (epoch, counter) = match &current {
            None => (0, 0),
            Some(l) if l.finished => return Ok(None),
            Some(l) => {
                let remaining = self
                    .seen_leases
                    .observe(pipeline, partition.as_str(), l, read_at);
                if l.owner.is_some() && !remaining.is_zero() && steal != Some(l.epoch) {
                    return Ok(None);
                }
                (l.epoch, l.counter + 1)
            }
        };
        let taken = Stored {
            epoch: epoch + 1,
            counter,
            ttl: Duration::from_millis(ttl_ms(ttl)),
            owner: Some(owner.to_string()),
            finished: false,
        };
        let key = self.item_key(pipeline, partition.as_str());
        let started = Instant::now();
        let out = self
            .call("taking a lease", || {
                let call = self
                    .client
                    .update_item()
                    .table_name(&self.cfg.table)
                    .set_key(Some(key.clone()))
                    .update_expression(
                        "SET lease_epoch = :epoch, lease_counter = :counter, lease_ttl_ms = :ttl, \
                         lease_owner = :owner, lease_finished = :no",
                    )
                    .expression_attribute_values(":epoch", n(taken.epoch))
                    .expression_attribute_values(":counter", n(taken.counter))
                    .expression_attribute_values(":ttl", n(ttl_ms(ttl)))
                    .expression_attribute_values(":owner", s(owner))
                    .expression_attribute_values(
                        ":no",
                        aws_sdk_dynamodb::types::AttributeValue::Bool(false),
                    );
                match &current {
                    None => call.condition_expression("attribute_not_exists(lease_epoch)"),
                    Some(l) => call
                        .condition_expression(
                            "lease_epoch = :seen_epoch AND lease_counter = :seen_counter AND lease_finished = :no",
                        )
                        .expression_attribute_values(":seen_epoch", n(l.epoch))
                        .expression_attribute_values(":seen_counter", n(l.counter)),
                }
                .send()
            })
            .await?;
        match out {
            Ok(_) => {
                self.seen_leases
                    .observe(pipeline, partition.as_str(), &taken, started);
                Ok(Some(lease_of(partition, &taken, ttl)))
            }
            // Someone else changed it between the read and the write.
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(self.failed("taking a lease", e)),
        }
    }

    async fn renew(&self, pipeline: &str, lease: &Lease, ttl: Duration) -> Result<Lease, Error> {
        self.change_held(
            "renewing a lease",
            pipeline,
            lease,
            "SET lease_counter = lease_counter + :one, lease_ttl_ms = :ttl",
            Some(ttl),
        )
        .await?;
        Ok(Lease {
            remaining: ttl,
            ..lease.clone()
        })
    }

    async fn release(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.change_held(
            "releasing a lease",
            pipeline,
            lease,
            "SET lease_counter = lease_counter + :one REMOVE lease_owner",
            None,
        )
        .await
    }

    async fn finish(&self, pipeline: &str, lease: &Lease) -> Result<(), Error> {
        self.change_held(
            "finishing a lease",
            pipeline,
            lease,
            "SET lease_counter = lease_counter + :one, lease_finished = :yes REMOVE lease_owner",
            None,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(counter: u64) -> Stored {
        Stored {
            epoch: 1,
            counter,
            ttl: Duration::from_millis(200),
            owner: Some("a".into()),
            finished: false,
        }
    }

    #[test]
    fn a_lease_expires_after_its_ttl_without_a_change_and_not_before() {
        let seen = Observations::default();
        let start = Instant::now();
        assert!(!seen.observe("p", "s", &held(0), start).is_zero());
        std::thread::sleep(Duration::from_millis(250));
        assert!(seen.observe("p", "s", &held(0), Instant::now()).is_zero());
        // A renewal (a new counter) starts the clock again.
        assert!(!seen.observe("p", "s", &held(1), Instant::now()).is_zero());
        // Released and finished leases have no time left.
        let released = Stored {
            owner: None,
            ..held(2)
        };
        assert!(seen.observe("p", "s", &released, Instant::now()).is_zero());
    }

    #[test]
    fn a_lease_first_seen_now_has_its_whole_ttl_left_whatever_its_age() {
        let seen = Observations::default();
        let left = seen.observe("p", "s", &held(7), Instant::now());
        assert!(left > Duration::from_millis(150), "{left:?}");
    }
}
