//! Checkpoints: checked against the stored ones and written in one redb transaction.

use super::*;

impl EmbeddedStore {
    pub(super) fn commit_checkpoints_in(
        &self,
        txn: &WriteTransaction,
        pipeline: &str,
        cps: &[Checkpoint],
    ) -> Result<(), Error> {
        let mut table = txn
            .open_table(CHECKPOINTS)
            .map_err(|e| storage(&self.path, "open checkpoints", e))?;
        let leases = txn
            .open_table(LEASES)
            .map_err(|e| storage(&self.path, "open leases", e))?;
        for c in cps {
            let key = cp_key(pipeline, c.partition.as_str());
            let lease = self.lease_in(&leases, &key)?;
            check_lease_fence(lease.map(|l| l.epoch), c)?;
            let stored = match table
                .get(key.as_str())
                .map_err(|e| storage(&self.path, "read checkpoint", e))?
            {
                Some(v) => Some(self.decode_checkpoint(&c.partition, v.value())?),
                None => None,
            };
            if check(stored.as_ref(), c)? == Transition::Write {
                let value = serde_json::to_vec(&StoredCheckpoint {
                    position: c.position.clone(),
                    fence: c.fence,
                })
                .map_err(|e| storage(&self.path, "encode checkpoint", e))?;
                table
                    .insert(key.as_str(), value.as_slice())
                    .map_err(|e| storage(&self.path, "write checkpoint", e))?;
            }
        }
        Ok(())
    }

    pub(super) fn decode_checkpoint(
        &self,
        partition: &PartitionId,
        bytes: &[u8],
    ) -> Result<Checkpoint, Error> {
        let s: StoredCheckpoint = serde_json::from_slice(bytes).map_err(|e| {
            corrupt(
                &self.path,
                "holds an unreadable checkpoint",
                format!("partition {partition}: {e}"),
            )
        })?;
        Ok(Checkpoint {
            partition: partition.clone(),
            position: s.position,
            fence: s.fence,
        })
    }
}

#[async_trait]
impl CheckpointStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn load(&self, pipeline: &str) -> Result<Vec<Checkpoint>, Error> {
        self.scan(
            CHECKPOINTS,
            "checkpoints",
            pipeline,
            |s, partition, value| s.decode_checkpoint(&partition, value),
        )
        .await
    }

    async fn commit(&self, pipeline: &str, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        let pipeline = pipeline.to_string();
        let cps = checkpoints.to_vec();
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            s.commit_checkpoints_in(&txn, &pipeline, &cps)?;
            txn.commit().map_err(|e| storage(&s.path, "commit", e))
        })
        .await
    }

    async fn reset(&self, pipeline: &str, partitions: Option<&[PartitionId]>) -> Result<(), Error> {
        let pipeline = pipeline.to_string();
        let partitions = partitions.map(<[PartitionId]>::to_vec);
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            {
                let mut table = txn
                    .open_table(CHECKPOINTS)
                    .map_err(|e| storage(&s.path, "open checkpoints", e))?;
                let keys: Vec<String> = match partitions {
                    Some(ps) => ps.iter().map(|p| cp_key(&pipeline, p.as_str())).collect(),
                    None => {
                        let lo = format!("{pipeline}\u{0}");
                        let hi = format!("{pipeline}\u{1}");
                        let mut ks = Vec::new();
                        for item in table
                            .range::<&str>(lo.as_str()..hi.as_str())
                            .map_err(|e| storage(&s.path, "scan", e))?
                        {
                            ks.push(
                                item.map_err(|e| storage(&s.path, "scan", e))?
                                    .0
                                    .value()
                                    .to_string(),
                            );
                        }
                        ks
                    }
                };
                for k in keys {
                    table
                        .remove(k.as_str())
                        .map_err(|e| storage(&s.path, "reset", e))?;
                }
            }
            txn.commit().map_err(|e| storage(&s.path, "commit", e))
        })
        .await
    }
}
