//! Source and sink settings, with defaults; any librdkafka property can be passed through.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Partition assignment strategy of the consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentStrategy {
    /// Incremental cooperative rebalancing (`cooperative-sticky`): only moved partitions
    /// stop. The default.
    Cooperative,
    /// Eager rebalancing (`range`): every partition is revoked and reassigned.
    Eager,
}

/// How the client talks to the brokers (`security.protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    Plaintext,
    /// TLS (the broker's certificate verified against `tls.ca` or the system's roots).
    Ssl,
    /// SASL over a plain connection.
    SaslPlaintext,
    /// SASL over TLS: what managed clusters (Confluent Cloud, MSK, Aiven) ask for.
    SaslSsl,
}

/// TLS settings (`ssl.*`): the broker's CA and, for mutual TLS, the client's certificate.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaTls {
    /// PEM file of the CA that signed the brokers' certificates (`ssl.ca.location`); `None`
    /// trusts the system's roots (managed clusters with public certificates).
    pub ca: Option<PathBuf>,
    /// PEM file of the client's certificate, for mutual TLS (`ssl.certificate.location`).
    pub cert: Option<PathBuf>,
    /// PEM file of the client's private key (`ssl.key.location`).
    pub key: Option<PathBuf>,
    /// Password of an encrypted `key` (`ssl.key.password`); never logged.
    pub key_password: Option<String>,
    /// Check that the broker's certificate names the host connected to. Default `true`.
    pub verify_hostname: bool,
}

/// SASL mechanisms librdkafka is built with here (GSSAPI/Kerberos is not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// `PLAIN` (Confluent Cloud API keys; always over TLS in production).
    #[serde(rename = "PLAIN")]
    Plain,
    /// `SCRAM-SHA-256`.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// `SCRAM-SHA-512` (Amazon MSK, Aiven, Redpanda).
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    /// `OAUTHBEARER`; the token source (`sasl.oauthbearer.method = "oidc"` and its keys)
    /// goes under `properties`.
    #[serde(rename = "OAUTHBEARER")]
    Oauthbearer,
}

impl SaslMechanism {
    /// The name librdkafka and the broker use.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::Oauthbearer => "OAUTHBEARER",
        }
    }
}

/// SASL settings (`sasl.*`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// User name (`sasl.username`; an API key for Confluent Cloud). Not needed for OAUTHBEARER.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (`sasl.password`); never logged. Prefer `password_env`.
    #[serde(default)]
    pub password: Option<String>,
    /// Name of an environment variable holding the password (read at start).
    #[serde(default)]
    pub password_env: Option<String>,
}

impl Default for KafkaTls {
    fn default() -> Self {
        KafkaTls {
            ca: None,
            cert: None,
            key: None,
            key_password: None,
            verify_hostname: true,
        }
    }
}

impl fmt::Debug for KafkaTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTls")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field(
                "key_password",
                &self.key_password.as_ref().map(|_| "<redacted>"),
            )
            .field("verify_hostname", &self.verify_hostname)
            .finish()
    }
}

impl fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_env", &self.password_env)
            .finish()
    }
}

/// Compression of produced batches (`compression.type`). Consumers read every codec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// No compression (the default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// librdkafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// The consumer group protocol (`group.protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupProtocol {
    /// The classic protocol (JoinGroup/SyncGroup), with `assignment` choosing the strategy.
    /// The default: every Kafka broker speaks it.
    #[default]
    Classic,
    /// Kafka 4's consumer protocol (KIP-848): the broker assigns partitions incrementally and
    /// the session timeout is the broker's `group.consumer.session.timeout.ms`
    /// (`session_timeout` and `assignment` do not apply). Needs Apache Kafka 4.0 or later.
    Consumer,
}

/// Settings of the [`KafkaSource`](crate::KafkaSource).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers`. Default `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Topics to subscribe to (required).
    pub topics: Vec<String>,
    /// Consumer group; default: the pipeline's name.
    pub group_id: Option<String>,
    /// Static membership (`group.instance.id`): a restart within the session timeout keeps
    /// the assignment without a rebalance.
    pub group_instance_id: Option<String>,
    /// Default `cooperative`.
    pub assignment: AssignmentStrategy,
    /// `classic` (default) or `consumer` (KIP-848, Kafka 4+).
    pub group_protocol: GroupProtocol,
    /// Where a partition without checkpoint or committed offset starts: `earliest` (default)
    /// or `latest`.
    pub auto_offset_reset: String,
    /// `session.timeout.ms`. Default 10 s (librdkafka's: 45 s). Heartbeats come from
    /// librdkafka's own thread, so a busy pipeline never misses them; a member that crashed
    /// without static membership holds its partitions (and the whole classic rebalance) this
    /// long, so the default is short (docs/brokers/kafka.md, "Restarts and rebalances").
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// `max.poll.interval.ms`, also the classic protocol's rebalance timeout: how long the
    /// group waits for a member to rejoin. Default 60 s (librdkafka's: 300 s). flowgate keeps
    /// polling while partitions are paused; only a revocation's drain (bounded by
    /// `rebalance_timeout`, which must be shorter) holds the poll loop.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// `queued.max.messages.kbytes`: librdkafka's own prefetch per partition in payload
    /// bytes, so a consumer behind a slow sink does not hold the backlog in memory. Default
    /// 4096 (4 MiB).
    pub queued_max_messages_kbytes: u64,
    /// `queued.min.messages`: librdkafka's prefetch per partition in records; it stops
    /// fetching a partition at this many or at `queued_max_messages_kbytes`, whichever comes
    /// first. For small records this is the bound that matters: librdkafka keeps a few
    /// hundred bytes of its own per prefetched record. Default 5,000 (librdkafka's: 100,000;
    /// 5,000 measured as fast as 10,000 and 11 MiB lighter behind a slow sink).
    pub prefetch_records: u64,
    /// `fetch.max.bytes`. Default 8 MiB.
    pub fetch_max_bytes: u64,
    /// How long a rebalance callback waits for the runtime to drain revoked partitions, and
    /// for start positions of assigned ones. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub rebalance_timeout: Duration,
    /// Records handed to the runtime per event, at most. Default 1000.
    pub max_batch: usize,
    /// How long a partition may have no credit before it is paused. A pause frees
    /// librdkafka's prefetch of the partition but throws it away, and the resume waits for the
    /// broker's next fetch round; shorter dips are cheaper to ride out. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub pause_after: Duration,
    /// `security.protocol`; by default `sasl_ssl` with a `sasl` table, `ssl` with only a `tls`
    /// table, else `plaintext`.
    pub security_protocol: Option<SecurityProtocol>,
    /// TLS settings.
    pub tls: Option<KafkaTls>,
    /// SASL settings.
    pub sasl: Option<KafkaSasl>,
    /// Any other librdkafka property, passed through as is. Values of keys that look secret
    /// never appear in logs or `Debug`.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        KafkaSourceConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topics: Vec::new(),
            group_id: None,
            group_instance_id: None,
            assignment: AssignmentStrategy::Cooperative,
            group_protocol: GroupProtocol::Classic,
            auto_offset_reset: "earliest".into(),
            session_timeout: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(60),
            queued_max_messages_kbytes: 4096,
            prefetch_records: 5_000,
            fetch_max_bytes: 8 * 1024 * 1024,
            rebalance_timeout: Duration::from_secs(30),
            max_batch: 1000,
            pause_after: Duration::from_secs(1),
            security_protocol: None,
            tls: None,
            sasl: None,
            properties: BTreeMap::new(),
        }
    }
}

/// Settings of the [`KafkaSink`](crate::KafkaSink).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `bootstrap.servers`. Default `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Topic written to (required unless every record names one in `topic_header`).
    pub topic: Option<String>,
    /// A header naming the topic per record (routing), checked before `topic`.
    pub topic_header: Option<String>,
    /// `message.timeout.ms`: how long librdkafka retries a delivery before reporting it
    /// failed. Default 30 s; with `transactional_id`, at most `transaction_timeout`.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Largest record; a larger one is poison. Default 1,000,000 bytes (the broker's default
    /// `message.max.bytes`).
    pub max_record_bytes: usize,
    /// `linger.ms`. Default 5 ms.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// `transactional.id`: every batch is written in one Kafka transaction (read it with
    /// `isolation.level=read_committed`). Unique per running sink and stable across its
    /// restarts: a restarted sink fences its predecessor and aborts its open transaction.
    /// With a source's [`OffsetsLink`](crate::OffsetsLink), the consumed offsets commit in
    /// the same transaction (Kafka→Kafka exactly-once). Default: none (not transactional).
    pub transactional_id: Option<String>,
    /// `transaction.timeout.ms`: how long the broker waits before aborting a transaction
    /// its producer abandoned. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// `compression.type` of produced batches: `none` (default), `gzip`, `snappy`, `lz4`,
    /// `zstd`.
    pub compression: Compression,
    /// `security.protocol`, as for the source.
    pub security_protocol: Option<SecurityProtocol>,
    /// TLS settings.
    pub tls: Option<KafkaTls>,
    /// SASL settings.
    pub sasl: Option<KafkaSasl>,
    /// Any other librdkafka property, passed through (secrets hidden in `Debug`).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        KafkaSinkConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic: None,
            topic_header: None,
            delivery_timeout: Duration::from_secs(30),
            max_record_bytes: 1_000_000,
            linger: Duration::from_millis(5),
            transactional_id: None,
            transaction_timeout: Duration::from_secs(60),
            compression: Compression::None,
            security_protocol: None,
            tls: None,
            sasl: None,
            properties: BTreeMap::new(),
        }
    }
}

/// Whether a librdkafka property holds a secret (its value is never printed).
pub(crate) fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password", "secret", "jaas", "token", "key.pem", "keystore", "private",
    ]
    .iter()
    .any(|s| k.contains(s))
}

pub(crate) struct Redacted<'a>(pub(crate) &'a BTreeMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in self.0 {
            if is_secret(k) {
                m.entry(k, &"<redacted>");
            } else {
                m.entry(k, v);
            }
        }
        m.finish()
    }
}

impl fmt::Debug for KafkaSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSourceConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .field("group_instance_id", &self.group_instance_id)
            .field("assignment", &self.assignment)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("session_timeout", &self.session_timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field(
                "queued_max_messages_kbytes",
                &self.queued_max_messages_kbytes,
            )
            .field("prefetch_records", &self.prefetch_records)
            .field("fetch_max_bytes", &self.fetch_max_bytes)
            .field("rebalance_timeout", &self.rebalance_timeout)
            .field("max_batch", &self.max_batch)
            .field("pause_after", &self.pause_after)
            .field("group_protocol", &self.group_protocol)
            .field("security_protocol", &self.security_protocol)
            .field("tls", &self.tls)
            .field("sasl", &self.sasl)
            .field("properties", &Redacted(&self.properties))
            .finish()
    }
}

impl fmt::Debug for KafkaSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSinkConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic", &self.topic)
            .field("topic_header", &self.topic_header)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("linger", &self.linger)
            .field("transactional_id", &self.transactional_id)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("compression", &self.compression)
            .field("security_protocol", &self.security_protocol)
            .field("tls", &self.tls)
            .field("sasl", &self.sasl)
            .field("properties", &Redacted(&self.properties))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_appear_in_debug() {
        let mut cfg = KafkaSourceConfig::default();
        cfg.properties
            .insert("sasl.password".into(), "hunter2".into());
        cfg.properties
            .insert("sasl.username".into(), "alice".into());
        let text = format!("{cfg:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("alice"));
    }
}
