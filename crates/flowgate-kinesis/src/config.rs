//! Settings of the Kinesis source and sink.

use std::time::Duration;

use flowgate_core::Error;
use serde::{Deserialize, Serialize};

/// How to reach Kinesis: endpoint, region, credentials. Shared by the source and the sink.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KinesisConnection {
    /// Endpoint override (`http://127.0.0.1:4568` for kinesis-mock, LocalStack's
    /// `http://localhost:4566`); `None` uses the AWS endpoint of the region.
    pub endpoint_url: Option<String>,
    /// AWS region; `None` takes it from the environment (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Static access key id; `None` uses the default credential chain (environment,
    /// profile, SSO, web identity, instance metadata).
    pub access_key_id: Option<String>,
    /// Static secret access key (with `access_key_id`); never logged.
    pub secret_access_key: Option<String>,
    /// Timeout of one API call, retries excluded. Default 10 s.
    #[serde(with = "humantime_serde::option")]
    pub call_timeout: Option<Duration>,
}

impl std::fmt::Debug for KinesisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KinesisConnection")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// Where a shard without a checkpoint starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// The oldest record kept (`TRIM_HORIZON`). The default: nothing already in the stream
    /// is skipped.
    #[default]
    TrimHorizon,
    /// Only records written after the reader started (`LATEST`).
    Latest,
    /// Records written at or after `at_timestamp` (`AT_TIMESTAMP`).
    AtTimestamp,
}

/// Settings of the [`KinesisSource`](crate::KinesisSource).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KinesisSourceConfig {
    /// The stream to read.
    pub stream: String,
    /// Endpoint, region and credentials.
    pub connection: KinesisConnection,
    /// Where a shard without a checkpoint starts. Default `trim_horizon`.
    pub start: StartAt,
    /// With `start = "at_timestamp"`: milliseconds since the Unix epoch.
    pub at_timestamp_ms: Option<i64>,
    /// Records asked for per `GetRecords` call (at most 10,000; fewer when the runtime's
    /// credit for the shard is lower). Default 10,000.
    pub max_records_per_call: usize,
    /// Least time between two `GetRecords` calls on one shard. Kinesis allows 5 calls/s per
    /// shard, shared by every reader of the shard. Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub min_call_interval: Duration,
    /// Bytes per second one reader takes from a shard (Kinesis allows 2 MB/s per shard,
    /// shared). After a call returning `n` bytes the next waits `n / read_bytes_per_second`.
    /// Default 2,000,000.
    pub read_bytes_per_second: u64,
    /// Wait after a call that returned nothing. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub idle_backoff: Duration,
    /// How often the shard list is refreshed (`ListShards`). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub shard_refresh: Duration,
    /// How long a lease lasts without renewal; a crashed worker's shards are taken over after
    /// it. Leases are renewed every third of it. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// This worker's name in the lease table. Default: host name, process id and a random
    /// suffix (every start is a new owner, so a restarted worker fences its former self).
    pub worker_id: Option<String>,
    /// Leases taken from busier workers per lease round, at most (gradual balancing).
    /// Default 1.
    pub max_steals_per_round: usize,
    /// How long a reader keeps retrying a failing shard before the error stops the pipeline.
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for KinesisSourceConfig {
    fn default() -> Self {
        KinesisSourceConfig {
            stream: String::new(),
            connection: KinesisConnection::default(),
            start: StartAt::TrimHorizon,
            at_timestamp_ms: None,
            max_records_per_call: 10_000,
            min_call_interval: Duration::from_millis(200),
            read_bytes_per_second: 2_000_000,
            idle_backoff: Duration::from_millis(500),
            shard_refresh: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(10),
            worker_id: None,
            max_steals_per_round: 1,
            give_up_after: Duration::from_secs(60),
        }
    }
}

impl KinesisSourceConfig {
    /// Checks the settings, naming the key at fault.
    pub fn validate(&self) -> Result<(), Error> {
        if self.stream.is_empty() {
            return Err(Error::config("kinesis source: `stream` is required")
                .with_context("key", "source.stream"));
        }
        if !(1..=10_000).contains(&self.max_records_per_call) {
            return Err(
                Error::config("kinesis source: max_records_per_call must be 1..=10000")
                    .with_context("key", "source.max_records_per_call"),
            );
        }
        if self.start == StartAt::AtTimestamp && self.at_timestamp_ms.is_none() {
            return Err(Error::config(
                "kinesis source: start = \"at_timestamp\" needs at_timestamp_ms",
            )
            .with_context("key", "source.at_timestamp_ms"));
        }
        if self.read_bytes_per_second == 0 {
            return Err(
                Error::config("kinesis source: read_bytes_per_second must be positive")
                    .with_context("key", "source.read_bytes_per_second"),
            );
        }
        if self.lease_ttl < Duration::from_millis(300) {
            return Err(
                Error::config("kinesis source: lease_ttl must be at least 300 ms")
                    .with_context("key", "source.lease_ttl"),
            );
        }
        validate_connection(&self.connection, "source")
    }
}

/// Settings of the [`KinesisSink`](crate::KinesisSink).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KinesisSinkConfig {
    /// The stream to write.
    pub stream: String,
    /// Endpoint, region and credentials.
    pub connection: KinesisConnection,
    /// Partition key of records without a key. Default: the record's source partition.
    pub partition_key: Option<String>,
    /// A header whose value, if present, is sent as the explicit hash key (a decimal
    /// 128-bit number choosing the shard directly).
    pub explicit_hash_key_header: Option<String>,
    /// Keep the order of each partition key even when entries fail: a `PutRecords` call
    /// carries at most one record per key, and records after a failed one wait for its retry.
    /// Costs calls when a batch holds many records of few keys. Default `false`.
    pub ordered_keys: bool,
}

impl KinesisSinkConfig {
    /// Checks the settings, naming the key at fault.
    pub fn validate(&self) -> Result<(), Error> {
        if self.stream.is_empty() {
            return Err(Error::config("kinesis sink: `stream` is required")
                .with_context("key", "sink.stream"));
        }
        if let Some(k) = &self.partition_key {
            if k.is_empty() || k.chars().count() > 256 {
                return Err(Error::config(
                    "kinesis sink: partition_key must be 1 to 256 characters",
                )
                .with_context("key", "sink.partition_key"));
            }
        }
        validate_connection(&self.connection, "sink")
    }
}

fn validate_connection(c: &KinesisConnection, side: &'static str) -> Result<(), Error> {
    if c.access_key_id.is_some() != c.secret_access_key.is_some() {
        return Err(
            Error::config("kinesis: access_key_id and secret_access_key go together")
                .with_context("key", format!("{side}.connection.secret_access_key")),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_appear_in_debug() {
        let c = KinesisConnection {
            access_key_id: Some("AKIA".into()),
            secret_access_key: Some("s3cret".into()),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let e = KinesisSourceConfig::default().validate().unwrap_err();
        assert!(e.to_string().contains("source.stream"), "{e}");
        let e = KinesisSourceConfig {
            stream: "s".into(),
            start: StartAt::AtTimestamp,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("at_timestamp_ms"), "{e}");
    }
}
