//! Lag of a Kinesis shard, read from outside a running pipeline: one `GetRecords` of one
//! record after the checkpoint (or at the configured start) gives the age of the first record
//! behind it (its approximate arrival time), or 0 when none is left. Inside a pipeline, the
//! source reports each shard's `MillisBehindLatest` with every `GetRecords` instead.

use std::time::SystemTime;

use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use flowgate_core::{Error, PartitionId, Position};

use crate::client::kpl;
use crate::config::{KinesisSourceConfig, StartAt};
use crate::error::map;

/// Seconds between now and the arrival of the first record of `shard` after `after`.
pub(crate) async fn behind(
    client: &aws_sdk_kinesis::Client,
    cfg: &KinesisSourceConfig,
    shard: &PartitionId,
    after: Option<&Position>,
) -> Result<f64, Error> {
    let mut req = client
        .get_shard_iterator()
        .stream_name(&cfg.stream)
        .shard_id(shard.as_str());
    req = match (after, cfg.start) {
        (Some(p), _) => {
            let (seq, _) = kpl::sequence_of(p).ok_or_else(|| {
                Error::config("kinesis: a stored position is not a Kinesis position")
                    .with_context("shard", shard)
                    .with_context("position", p)
            })?;
            req.shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq)
        }
        (None, StartAt::TrimHorizon) => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        (None, StartAt::Latest) => req.shard_iterator_type(ShardIteratorType::Latest),
        (None, StartAt::AtTimestamp) => req
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from_millis(cfg.at_timestamp_ms.unwrap_or(0))),
    };
    let iterator = req
        .send()
        .await
        .map_err(|e| {
            map(
                e,
                "getting a shard iterator (GetShardIterator)",
                &cfg.stream,
            )
        })?
        .shard_iterator
        .ok_or_else(|| Error::transient("kinesis: GetShardIterator returned no iterator"))?;
    let out = client
        .get_records()
        .shard_iterator(iterator)
        .limit(1)
        .send()
        .await
        .map_err(|e| {
            map(
                e,
                "reading the first record behind (GetRecords)",
                &cfg.stream,
            )
        })?;
    let Some(first) = out.records().first() else {
        return Ok(0.0);
    };
    let arrived = first
        .approximate_arrival_timestamp()
        .map_or(0.0, |t| t.secs() as f64 + f64::from(t.subsec_nanos()) / 1e9);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Ok((now - arrived).max(0.0))
}
