//! The pipeline configuration file: TOML or YAML, overridden by `FLOWGATE_…` variables.
//!
//! ```toml
//! name = "orders"
//!
//! [source]
//! type = "generator"        # kafka / kinesis / rabbitmq: with their Cargo features
//! partitions = 4
//! rate = 10000
//!
//! [sink]
//! type = "jsonl"            # null / jsonl / table
//! path = "out.jsonl"
//!
//! [store]
//! type = "embedded"         # embedded / memory / none
//! path = "./flowgate-data"
//!
//! [dedup]
//! key = "source_position"   # source_position / key / header:NAME
//!
//! [runtime]
//! max_in_flight_per_partition = 10000
//! ```
//!
//! Environment variables override the file: `FLOWGATE_SOURCE__RATE=5000`,
//! `FLOWGATE_RUNTIME__BATCH__MAX_RECORDS=100` (`__` separates levels).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml, Yaml};
use flowgate_core::Error;
use flowgate_runtime::adapters::{FaultConfig, GeneratorConfig};
use flowgate_runtime::{KeyExtractor, RuntimeSettings};
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PipelineConfig {
    /// Pipeline name: namespaces checkpoints and dedup marks.
    pub(crate) name: String,
    /// Where records come from.
    pub(crate) source: SourceConfig,
    /// Where records go.
    pub(crate) sink: SinkConfig,
    /// Where poison records go (optional).
    #[serde(default)]
    pub(crate) dead_letter: Option<SinkConfig>,
    /// Checkpoint store. Default: embedded in `./flowgate-data`.
    #[serde(default)]
    pub(crate) store: StoreConfig,
    /// Deduplication (needs a store). Off unless given.
    #[serde(default)]
    pub(crate) dedup: Option<DedupConfig>,
    /// Runtime limits.
    #[serde(default)]
    pub(crate) runtime: RuntimeSettings,
}

/// Sources by type.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum SourceConfig {
    /// The in-process generator.
    Generator(GeneratorConfig),
    /// Apache Kafka.
    #[cfg(feature = "kafka")]
    Kafka(flowgate_kafka::KafkaSourceConfig),
    /// Apache Kafka (feature `kafka`, not compiled in).
    #[cfg(not(feature = "kafka"))]
    Kafka(NotCompiled),
    /// AWS Kinesis Data Streams.
    #[cfg(feature = "kinesis")]
    Kinesis(flowgate_kinesis::KinesisSourceConfig),
    /// AWS Kinesis Data Streams (feature `kinesis`, not compiled in).
    #[cfg(not(feature = "kinesis"))]
    Kinesis(NotCompiled),
    /// RabbitMQ.
    #[cfg(feature = "rabbitmq")]
    Rabbitmq(flowgate_rabbitmq::RabbitSourceConfig),
    /// RabbitMQ (feature `rabbitmq`, not compiled in).
    #[cfg(not(feature = "rabbitmq"))]
    Rabbitmq(NotCompiled),
}

/// Settings of an adapter this binary was built without; accepted by the parser so that the
/// error can name the missing Cargo feature.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(
    all(feature = "kafka", feature = "rabbitmq", feature = "kinesis"),
    allow(dead_code)
)]
pub(crate) struct NotCompiled {}

/// Sinks by type.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum SinkConfig {
    /// Discards records (benchmarks, demos).
    Null {
        /// Optional fault injection (latency, capacity, throttling…).
        #[serde(default)]
        faults: Option<FaultConfig>,
    },
    /// JSON lines appended to a file.
    Jsonl {
        /// The file.
        path: PathBuf,
        /// fdatasync every batch.
        #[serde(default)]
        fsync: bool,
        /// Optional fault injection.
        #[serde(default)]
        faults: Option<FaultConfig>,
    },
    /// Rows in a table of the pipeline's store (embedded or PostgreSQL), committed with the
    /// dedup marks in one transaction (exactly-once). Needs `dedup`.
    Table {
        /// Table name.
        table: String,
        /// `insert` (one row per record, the default) or `upsert` (one row per record key;
        /// PostgreSQL store only).
        #[serde(default)]
        mode: flowgate_checkpoint::TableMode,
        /// Optional fault injection.
        #[serde(default)]
        faults: Option<FaultConfig>,
    },
    /// Apache Kafka.
    #[cfg(feature = "kafka")]
    Kafka(flowgate_kafka::KafkaSinkConfig),
    /// Apache Kafka (feature `kafka`, not compiled in).
    #[cfg(not(feature = "kafka"))]
    Kafka(NotCompiled),
    /// AWS Kinesis Data Streams.
    #[cfg(feature = "kinesis")]
    Kinesis(flowgate_kinesis::KinesisSinkConfig),
    /// AWS Kinesis Data Streams (feature `kinesis`, not compiled in).
    #[cfg(not(feature = "kinesis"))]
    Kinesis(NotCompiled),
    /// RabbitMQ.
    #[cfg(feature = "rabbitmq")]
    Rabbitmq(flowgate_rabbitmq::RabbitSinkConfig),
    /// RabbitMQ (feature `rabbitmq`, not compiled in).
    #[cfg(not(feature = "rabbitmq"))]
    Rabbitmq(NotCompiled),
}

/// Checkpoint store by type.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum StoreConfig {
    /// The embedded redb store in a directory.
    Embedded {
        /// Data directory. Default `./flowgate-data`.
        #[serde(default = "default_data")]
        path: PathBuf,
    },
    /// PostgreSQL, shared by several workers (docs/stores.md).
    Postgres(flowgate_checkpoint::PostgresConfig),
    /// Redis, shared by several workers (docs/stores.md).
    Redis(flowgate_checkpoint::RedisConfig),
    /// In memory (lost at exit).
    Memory,
    /// No checkpoint store: positions are committed to the broker only.
    None,
}

fn default_data() -> PathBuf {
    PathBuf::from("./flowgate-data")
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Embedded {
            path: default_data(),
        }
    }
}

/// Deduplication settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DedupConfig {
    /// `source_position`, `key`, or `header:NAME`. Default `source_position`.
    #[serde(default = "default_dedup_key")]
    pub(crate) key: String,
}

fn default_dedup_key() -> String {
    "source_position".into()
}

impl DedupConfig {
    /// The extractor named by `key`.
    pub(crate) fn extractor(&self) -> Result<KeyExtractor, Error> {
        match self.key.as_str() {
            "source_position" => Ok(KeyExtractor::SourcePosition),
            "key" => Ok(KeyExtractor::Key),
            other => match other.strip_prefix("header:") {
                Some(h) if !h.is_empty() => Ok(KeyExtractor::Header(h.to_string())),
                _ => Err(Error::config(format!(
                    "invalid `dedup.key` {other:?}: expected source_position, key or header:NAME"
                ))
                .with_context("key", "dedup.key")),
            },
        }
    }
}

/// The error for an adapter this binary was built without.
#[cfg_attr(
    all(feature = "kafka", feature = "rabbitmq", feature = "kinesis"),
    allow(dead_code)
)]
pub(crate) fn missing_feature(kind: &str) -> Error {
    let hint = if kind == "kafka" {
        "build the flowgate CLI with `--features kafka` (on by default)".to_string()
    } else {
        format!("the {kind} adapter is not part of this release yet (see README, status table)")
    };
    Error::config(format!(
        "this flowgate binary was built without the `{kind}` adapter"
    ))
    .with_context("key", "type")
    .with_hint(hint)
}

/// Loads a configuration file (TOML or YAML by extension) and the `FLOWGATE_` environment.
pub(crate) fn load(path: &Path) -> Result<PipelineConfig, Error> {
    if !path.exists() {
        return Err(Error::config("the configuration file does not exist")
            .with_context("path", path.display()));
    }
    let figment = match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => Figment::from(Yaml::file(path)),
        _ => Figment::from(Toml::file(path)),
    };
    from_figment(figment.merge(env()), path)
}

/// `FLOWGATE_<SECTION>__…` variables of the pipeline's sections. Other `FLOWGATE_` variables
/// (`FLOWGATE_LOG`, `FLOWGATE_TEST_*`) belong to other parts of flowgate and are not read here.
fn env() -> Env {
    const SECTIONS: [&str; 7] = [
        "name",
        "source",
        "sink",
        "dead_letter",
        "store",
        "dedup",
        "runtime",
    ];
    Env::prefixed("FLOWGATE_")
        .filter(|key| {
            let k = key.as_str().to_ascii_lowercase();
            SECTIONS
                .iter()
                .any(|s| k == *s || k.starts_with(&format!("{s}__")))
        })
        .split("__")
}

/// Extracts and validates a configuration.
pub(crate) fn from_figment(figment: Figment, origin: &Path) -> Result<PipelineConfig, Error> {
    let cfg: PipelineConfig = figment.extract().map_err(|e| {
        let keys: Vec<String> = e
            .clone()
            .into_iter()
            .map(|e| e.path.join("."))
            .filter(|k| !k.is_empty())
            .collect();
        let mut err = Error::config(format!("invalid configuration: {e}"))
            .with_context("file", origin.display());
        if !keys.is_empty() {
            err = err.with_context("key", keys.join(", "));
        }
        err
    })?;
    cfg.runtime.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    #[allow(clippy::result_large_err)]
    fn file_and_environment_merge_and_errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "p.toml",
                r#"
                name = "t"
                [source]
                type = "generator"
                partitions = 2
                [sink]
                type = "null"
                [runtime]
                max_in_flight_per_partition = 50
                "#,
            )?;
            jail.set_env("FLOWGATE_SOURCE__PARTITIONS", "7");
            jail.set_env("FLOWGATE_RUNTIME__BATCH__MAX_RECORDS", "9");
            jail.set_env("FLOWGATE_LOG", "debug");
            let cfg = load(Path::new("p.toml")).map_err(|e| e.to_string())?;
            match cfg.source {
                SourceConfig::Generator(g) => assert_eq!(g.partitions, 7),
                other => panic!("{other:?}"),
            }
            assert_eq!(cfg.runtime.batch.max_records, 9);
            assert_eq!(cfg.runtime.max_in_flight_per_partition, 50);

            jail.create_file("bad.toml", "name = \"t\"\n[source]\ntype = \"generator\"\npartitoins = 2\n[sink]\ntype = \"null\"\n")?;
            let err = load(Path::new("bad.toml")).unwrap_err().to_string();
            assert!(err.contains("partitoins"), "{err}");

            jail.create_file("bad2.toml", "name = \"t\"\n[source]\ntype = \"generator\"\n[sink]\ntype = \"null\"\n[runtime]\nmax_in_flight_per_partition = 0\n")?;
            let err = load(Path::new("bad2.toml")).unwrap_err().to_string();
            assert!(err.contains("max_in_flight_per_partition"), "{err}");

            jail.create_file(
                "y.yaml",
                "name: y\nsource:\n  type: generator\nsink:\n  type: jsonl\n  path: out.jsonl\n",
            )?;
            assert!(matches!(
                load(Path::new("y.yaml")).map_err(|e| e.to_string())?.sink,
                SinkConfig::Jsonl { .. }
            ));
            Ok(())
        });
    }
}
