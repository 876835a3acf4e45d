//! Checkpoints: conditional writes, compare-and-set on position, fence and the lease epoch.

use async_trait::async_trait;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{TransactWriteItem, Update};
use flowgate_core::{Checkpoint, CheckpointStore, Error, ErrorKind, PartitionId, Position};

use super::client::{Failure, classify_code};
use super::{
    CP_FENCE, CP_POS, DynamoDbStore, Item, SK, get_n, get_s, hex, leases, n, rules, s, unhex,
};

/// Checkpoints per `TransactWriteItems` (DynamoDB's limit).
const TRANSACTION_ITEMS: usize = 100;

/// A fence as stored: -1 for none, so that "no fence" orders below every fence.
fn fence_value(fence: Option<u64>) -> i128 {
    fence.map_or(-1, i128::from)
}

/// The checkpoint an item holds, `None` if it holds none, `Err` if it cannot be read.
pub(super) fn decode_checkpoint(item: &Item) -> Result<Option<Checkpoint>, ()> {
    let Some(pos) = item.get(CP_POS) else {
        return Ok(None);
    };
    let partition = get_s(item, SK).ok_or(())?;
    let position = pos
        .as_s()
        .ok()
        .and_then(|p| unhex(p))
        .and_then(|b| Position::from_ordered_bytes(&b))
        .ok_or(())?;
    let fence: i128 = get_n(item, CP_FENCE).ok_or(())?;
    Ok(Some(
        Checkpoint::new(PartitionId::new(partition), position)
            .with_fence(u64::try_from(fence).ok()),
    ))
}

impl DynamoDbStore {
    /// The checkpoint write of `cp`: compare-and-set on the stored checkpoint and the lease.
    fn checkpoint_update(&self, pipeline: &str, cp: &Checkpoint) -> Result<Update, Error> {
        Update::builder()
            .table_name(&self.cfg.table)
            .set_key(Some(self.item_key(pipeline, cp.partition.as_str())))
            .update_expression("SET cp_pos = :pos, cp_fence = :fence")
            .condition_expression(
                "(attribute_not_exists(lease_epoch) OR lease_epoch <= :fence) AND \
                 (attribute_not_exists(cp_pos) OR (cp_fence <= :fence AND cp_pos <= :pos))",
            )
            .expression_attribute_values(":pos", s(hex(&cp.position.to_ordered_bytes())))
            .expression_attribute_values(":fence", n(fence_value(cp.fence)))
            .build()
            .map_err(|e| self.failed("building a checkpoint write", e))
    }

    /// Why the write of `cp` was refused, from what is stored now.
    async fn refusal(&self, pipeline: &str, cp: &Checkpoint) -> Error {
        let item = match self.partition_item(pipeline, cp.partition.as_str()).await {
            Ok(item) => item.unwrap_or_default(),
            Err(e) => return e,
        };
        let epoch = get_n::<u64>(&item, leases::EPOCH);
        if let Err(e) = rules::check_lease_fence(epoch, cp) {
            return e;
        }
        let stored = match decode_checkpoint(&item) {
            Ok(stored) => stored,
            Err(()) => return self.corrupt(pipeline, cp.partition.as_str(), "checkpoint"),
        };
        rules::check(stored.as_ref(), cp).err().unwrap_or_else(|| {
            Error::new(ErrorKind::Fenced, "checkpoint write refused")
                .with_context("partition", &cp.partition)
        })
    }

    async fn commit_one(&self, pipeline: &str, cp: &Checkpoint) -> Result<(), Error> {
        let update = self.checkpoint_update(pipeline, cp)?;
        let out = self
            .call("committing a checkpoint", || {
                self.client
                    .update_item()
                    .table_name(update.table_name())
                    .set_key(Some(update.key().clone()))
                    .update_expression(update.update_expression())
                    .set_condition_expression(update.condition_expression().map(str::to_string))
                    .set_expression_attribute_values(update.expression_attribute_values().cloned())
                    .send()
            })
            .await?;
        match out {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                Err(self.refusal(pipeline, cp).await)
            }
            Err(e) => Err(self.failed("committing a checkpoint", e)),
        }
    }

    async fn commit_many(&self, pipeline: &str, cps: &[&Checkpoint]) -> Result<(), Error> {
        let items = cps
            .iter()
            .map(|cp| {
                let update = self.checkpoint_update(pipeline, cp)?;
                Ok(TransactWriteItem::builder().update(update).build())
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut backoff = crate::store_backoff(self.cfg.give_up_after).start();
        loop {
            let out = self
                .call("committing checkpoints", || {
                    self.client
                        .transact_write_items()
                        .set_transact_items(Some(items.clone()))
                        .send()
                })
                .await?;
            let e = match out {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let reasons: Vec<Option<String>> = e
                .as_service_error()
                .and_then(|se| match se {
                    TransactWriteItemsError::TransactionCanceledException(tc) => Some(tc),
                    _ => None,
                })
                .map(|tc| {
                    tc.cancellation_reasons()
                        .iter()
                        .map(|r| r.code().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(i) = reasons
                .iter()
                .position(|r| r.as_deref() == Some("ConditionalCheckFailed"))
            {
                return Err(self.refusal(pipeline, cps[i]).await);
            }
            // A transaction that met another on the same items, or throttling inside it.
            let retry = reasons.iter().flatten().any(|r| {
                r == "TransactionConflict" || classify_code(Some(r)) == Failure::Throttled
            });
            if retry {
                if let Some(wait) = backoff.next_delay() {
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            return Err(self.failed("committing checkpoints", e));
        }
    }
}

#[async_trait]
impl CheckpointStore for DynamoDbStore {
    fn describe(&self) -> String {
        self.describe_table()
    }

    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        let mut out = Vec::new();
        for item in self.partition_items(pipeline).await? {
            let partition = get_s(&item, SK).unwrap_or_default().to_string();
            match decode_checkpoint(&item) {
                Ok(Some(cp)) => out.push(cp),
                Ok(None) => {}
                Err(()) => return Err(self.corrupt(pipeline, &partition, "checkpoint")),
            }
        }
        out.sort_by(|a, b| a.partition.as_str().cmp(b.partition.as_str()));
        Ok(out)
    }

    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        // One write per partition (the furthest); a transaction may not touch an item twice.
        let mut latest: Vec<&Checkpoint> = Vec::with_capacity(checkpoints.len());
        for cp in checkpoints {
            match latest.iter_mut().find(|c| c.partition == cp.partition) {
                Some(c) if (c.position.clone(), c.fence) < (cp.position.clone(), cp.fence) => {
                    *c = cp
                }
                Some(_) => {}
                None => latest.push(cp),
            }
        }
        for chunk in latest.chunks(TRANSACTION_ITEMS) {
            match chunk {
                [] => {}
                [one] => self.commit_one(pipeline, one).await?,
                many => self.commit_many(pipeline, many).await?,
            }
        }
        Ok(())
    }

    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        let targets: Vec<String> = match partitions {
            Some(ps) => ps.iter().map(|p| p.as_str().to_string()).collect(),
            None => self
                .partition_items(pipeline)
                .await?
                .iter()
                .filter(|i| i.contains_key(CP_POS))
                .filter_map(|i| get_s(i, SK).map(str::to_string))
                .collect(),
        };
        for partition in targets {
            let key = self.item_key(pipeline, &partition);
            let out = self
                .call("resetting a checkpoint", || {
                    self.client
                        .update_item()
                        .table_name(&self.cfg.table)
                        .set_key(Some(key.clone()))
                        .update_expression("REMOVE cp_pos, cp_fence")
                        .condition_expression("attribute_exists(pk)")
                        .send()
                })
                .await?;
            match out {
                Ok(_) => {}
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {}
                Err(e) => return Err(self.failed("resetting a checkpoint", e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_order_none_below_every_fence() {
        assert!(fence_value(None) < fence_value(Some(0)));
        assert!(fence_value(Some(0)) < fence_value(Some(u64::MAX)));
    }
}
