//! Dedup marks: one item per mark, batch reads and writes, expiry by `expires_ms`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{KeysAndAttributes, PutRequest, WriteRequest};
use flowgate_core::{DedupStore, Error, IdempotencyKey};

use super::{DynamoDbStore, EXPIRES_AT, EXPIRES_MS, Item, PK, SK, get_n, get_s, n, rules, s};

/// Keys per `BatchGetItem` and `BatchWriteItem` (DynamoDB's limits).
const BATCH_GET_ITEMS: usize = 100;
const BATCH_WRITE_ITEMS: usize = 25;

#[async_trait]
impl DedupStore for DynamoDbStore {
    fn describe(&self) -> String {
        self.describe_table()
    }

    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error> {
        let names: Vec<String> = keys.iter().map(|k| self.mark_key(pipeline, k)).collect();
        let unique: Vec<&String> = {
            let mut seen = HashSet::new();
            names.iter().filter(|n| seen.insert(n.as_str())).collect()
        };
        let now = rules::now_ms();
        let mut live: HashSet<String> = HashSet::new();
        let mut backoff = crate::store_backoff(self.cfg.give_up_after).start();
        for chunk in unique.chunks(BATCH_GET_ITEMS) {
            let keys: Vec<Item> = chunk
                .iter()
                .map(|name| {
                    HashMap::from([(PK.to_string(), s(name.as_str())), (SK.to_string(), s("m"))])
                })
                .collect();
            let mut request = KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .consistent_read(true)
                .projection_expression("pk, expires_ms")
                .build()
                .map_err(|e| self.failed("checking dedup marks", e))?;
            loop {
                let out = self
                    .call("checking dedup marks", || {
                        self.client
                            .batch_get_item()
                            .request_items(&self.cfg.table, request.clone())
                            .send()
                    })
                    .await?
                    .map_err(|e| self.failed("checking dedup marks", e))?;
                for item in out
                    .responses()
                    .and_then(|r| r.get(&self.cfg.table))
                    .into_iter()
                    .flatten()
                {
                    if get_n::<u64>(item, EXPIRES_MS).is_some_and(|at| at > now) {
                        if let Some(pk) = get_s(item, PK) {
                            live.insert(pk.to_string());
                        }
                    }
                }
                match out.unprocessed_keys().and_then(|u| u.get(&self.cfg.table)) {
                    Some(rest) if !rest.keys().is_empty() => {
                        self.count_throttle();
                        request = rest.clone();
                        let wait = backoff.next_delay().ok_or_else(|| {
                            Error::throttled(
                                "dynamodb store: checking dedup marks stayed throttled",
                            )
                            .with_context("store", self.describe_table())
                        })?;
                        tokio::time::sleep(wait).await;
                    }
                    _ => break,
                }
            }
        }
        Ok(names.iter().map(|n| live.contains(n)).collect())
    }

    async fn mark(
        &self,
        pipeline: &str,
        keys: &[IdempotencyKey],
        ttl: Duration,
    ) -> Result<(), Error> {
        let expires_ms =
            rules::now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut names: Vec<String> = keys.iter().map(|k| self.mark_key(pipeline, k)).collect();
        names.sort_unstable();
        names.dedup();
        let mut backoff = crate::store_backoff(self.cfg.give_up_after).start();
        for chunk in names.chunks(BATCH_WRITE_ITEMS) {
            let mut writes: Vec<WriteRequest> = Vec::with_capacity(chunk.len());
            for name in chunk {
                let put = PutRequest::builder()
                    .item(PK, s(name.as_str()))
                    .item(SK, s("m"))
                    .item(EXPIRES_AT, n(expires_ms.div_ceil(1000)))
                    .item(EXPIRES_MS, n(expires_ms))
                    .build()
                    .map_err(|e| self.failed("writing dedup marks", e))?;
                writes.push(WriteRequest::builder().put_request(put).build());
            }
            loop {
                let out = self
                    .call("writing dedup marks", || {
                        self.client
                            .batch_write_item()
                            .request_items(&self.cfg.table, writes.clone())
                            .send()
                    })
                    .await?
                    .map_err(|e| self.failed("writing dedup marks", e))?;
                match out.unprocessed_items().and_then(|u| u.get(&self.cfg.table)) {
                    Some(rest) if !rest.is_empty() => {
                        self.count_throttle();
                        writes = rest.clone();
                        let wait = backoff.next_delay().ok_or_else(|| {
                            Error::throttled("dynamodb store: writing dedup marks stayed throttled")
                                .with_context("store", self.describe_table())
                        })?;
                        tokio::time::sleep(wait).await;
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}
