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
//! type = "jsonl"            # null / jsonl / table; kafka / rabbitmq / kinesis / http
//! path = "out.jsonl"
//!
//! [store]
//! type = "embedded"         # embedded / postgres / redis / dynamodb / memory / none
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
use figment::value::Value;
use flowgate_core::Error;
use flowgate_runtime::adapters::{FaultConfig, GeneratorConfig};
use flowgate_runtime::{KeyExtractor, RuntimeSettings};
use serde::{Deserialize, Serialize};

use crate::registry::{BrokerSink, BrokerSource};

/// The whole file.
#[derive(Clone, Debug)]
pub(crate) struct PipelineConfig {
    /// Pipeline name: namespaces checkpoints and dedup marks.
    pub(crate) name: String,
    /// Where records come from.
    pub(crate) source: SourceConfig,
    /// Where records go.
    pub(crate) sink: SinkConfig,
    /// Where poison records go (optional).
    pub(crate) dead_letter: Option<SinkConfig>,
    /// Checkpoint store. Default: embedded in `./flowgate-data`.
    pub(crate) store: StoreConfig,
    /// Deduplication (needs a store). Off unless given.
    pub(crate) dedup: Option<DedupConfig>,
    /// Runtime limits.
    pub(crate) runtime: RuntimeSettings,
    /// The `/metrics`, `/health`, `/ready` and `/status` endpoint.
    pub(crate) observability: flowgate_runtime::EndpointSettings,
}

/// Sources by type: the in-process generator, or a broker adapter of the registry.
#[derive(Clone, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per pipeline file, read once at start"
)]
pub(crate) enum SourceConfig {
    /// The in-process generator.
    Generator(GeneratorConfig),
    /// Kafka, Kinesis, RabbitMQ (see `registry.rs`).
    Broker(BrokerSource),
}

/// Sinks by type: the in-process ones, or an adapter of the registry.
#[derive(Clone, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per pipeline file, read once at start"
)]
pub(crate) enum SinkConfig {
    /// Discards records (benchmarks, demos).
    Null(NullSinkConfig),
    /// JSON lines appended to a file.
    Jsonl(JsonlSinkConfig),
    /// Rows in a table of the pipeline's store (embedded or PostgreSQL), committed with the
    /// dedup marks in one transaction (exactly-once). Needs `dedup`.
    Table(TableSinkConfig),
    /// Kafka, Kinesis, RabbitMQ, HTTP (see `registry.rs`).
    Broker(BrokerSink),
}

/// `type = "null"`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NullSinkConfig {
    /// Optional fault injection (latency, capacity, throttling…).
    #[serde(default)]
    pub(crate) faults: Option<FaultConfig>,
}

/// `type = "jsonl"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JsonlSinkConfig {
    /// The file.
    pub(crate) path: PathBuf,
    /// fdatasync every batch.
    #[serde(default)]
    pub(crate) fsync: bool,
    /// Optional fault injection.
    #[serde(default)]
    pub(crate) faults: Option<FaultConfig>,
}

/// `type = "table"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TableSinkConfig {
    /// Table name.
    pub(crate) table: String,
    /// `insert` (one row per record, the default) or `upsert` (one row per record key;
    /// PostgreSQL store only).
    #[serde(default)]
    pub(crate) mode: flowgate_checkpoint::TableMode,
    /// Optional fault injection.
    #[serde(default)]
    pub(crate) faults: Option<FaultConfig>,
}

/// Checkpoint store by type.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum StoreConfig {
    /// The embedded redb store in a directory.
    Embedded(EmbeddedStoreConfig),
    /// PostgreSQL, shared by several workers (docs/stores.md).
    Postgres(flowgate_checkpoint::PostgresConfig),
    /// Redis, shared by several workers (docs/stores.md).
    Redis(flowgate_checkpoint::RedisConfig),
    /// DynamoDB, shared by several workers (docs/stores.md).
    Dynamodb(flowgate_checkpoint::DynamoDbConfig),
    /// In memory (lost at exit).
    Memory,
    /// No checkpoint store: positions are committed to the broker only.
    None,
}

/// `type = "embedded"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmbeddedStoreConfig {
    /// Data directory. Default `./flowgate-data`.
    #[serde(default = "default_data")]
    pub(crate) path: PathBuf,
}

fn default_data() -> PathBuf {
    PathBuf::from("./flowgate-data")
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Embedded(EmbeddedStoreConfig {
            path: default_data(),
        })
    }
}

/// A section without keys of its own besides `type` (`store.type = "memory"`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

#[allow(
    clippy::result_large_err,
    reason = "figment's own error, once per file at start-up"
)]
/// Reads a `type`-tagged section variant by variant, so that an invalid value deep inside
/// names its whole key path (serde's internally tagged enums buffer the section and lose it).
trait Tagged: Sized {
    /// The `type` values, for the error on an unknown one.
    fn types() -> Vec<&'static str>;
    /// The variant `kind` read from `rest` (the section without its `type` key).
    fn from_parts(kind: &str, rest: &Value) -> Result<Option<Self>, figment::Error>;
}

impl Tagged for SourceConfig {
    fn types() -> Vec<&'static str> {
        [&["generator"][..], BrokerSource::TYPES].concat()
    }
    fn from_parts(kind: &str, rest: &Value) -> Result<Option<Self>, figment::Error> {
        Ok(Some(match kind {
            "generator" => SourceConfig::Generator(rest.deserialize()?),
            _ => match BrokerSource::from_parts(kind, rest)? {
                Some(b) => SourceConfig::Broker(b),
                None => return Ok(None),
            },
        }))
    }
}

impl Tagged for SinkConfig {
    fn types() -> Vec<&'static str> {
        [&["null", "jsonl", "table"][..], BrokerSink::TYPES].concat()
    }
    fn from_parts(kind: &str, rest: &Value) -> Result<Option<Self>, figment::Error> {
        Ok(Some(match kind {
            "null" => SinkConfig::Null(rest.deserialize()?),
            "jsonl" => SinkConfig::Jsonl(rest.deserialize()?),
            "table" => SinkConfig::Table(rest.deserialize()?),
            _ => match BrokerSink::from_parts(kind, rest)? {
                Some(b) => SinkConfig::Broker(b),
                None => return Ok(None),
            },
        }))
    }
}

impl Tagged for StoreConfig {
    fn types() -> Vec<&'static str> {
        vec![
            "embedded", "postgres", "redis", "dynamodb", "memory", "none",
        ]
    }
    fn from_parts(kind: &str, rest: &Value) -> Result<Option<Self>, figment::Error> {
        Ok(Some(match kind {
            "embedded" => StoreConfig::Embedded(rest.deserialize()?),
            "postgres" => StoreConfig::Postgres(rest.deserialize()?),
            "redis" => StoreConfig::Redis(rest.deserialize()?),
            "dynamodb" => StoreConfig::Dynamodb(rest.deserialize()?),
            "memory" => {
                rest.deserialize::<NoKeys>()?;
                StoreConfig::Memory
            }
            "none" => {
                rest.deserialize::<NoKeys>()?;
                StoreConfig::None
            }
            _ => return Ok(None),
        }))
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
    const SECTIONS: [&str; 8] = [
        "name",
        "source",
        "sink",
        "dead_letter",
        "store",
        "dedup",
        "runtime",
        "observability",
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

/// The file's top level, with the `type`-tagged sections kept as raw values.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Frame {
    name: String,
    source: Value,
    sink: Value,
    #[serde(default)]
    dead_letter: Option<Value>,
    #[serde(default)]
    store: Option<Value>,
    #[serde(default)]
    dedup: Option<DedupConfig>,
    #[serde(default)]
    runtime: RuntimeSettings,
    #[serde(default)]
    observability: flowgate_runtime::EndpointSettings,
}

/// Extracts and validates a configuration.
pub(crate) fn from_figment(figment: Figment, origin: &Path) -> Result<PipelineConfig, Error> {
    let invalid = |e: figment::Error| invalid_config(e, origin);
    let frame: Frame = figment.extract().map_err(invalid)?;
    let store = match &frame.store {
        Some(v) => tagged(v, "store").map_err(invalid)?,
        None => StoreConfig::default(),
    };
    let cfg = PipelineConfig {
        name: frame.name,
        source: tagged(&frame.source, "source").map_err(invalid)?,
        sink: tagged(&frame.sink, "sink").map_err(invalid)?,
        dead_letter: match &frame.dead_letter {
            Some(v) => Some(tagged(v, "dead_letter").map_err(invalid)?),
            None => None,
        },
        store,
        dedup: frame.dedup,
        runtime: frame.runtime,
        observability: frame.observability,
    };
    cfg.runtime.validate()?;
    Ok(cfg)
}

/// One `type`-tagged section: its `type`, then the variant's own keys.
#[allow(
    clippy::result_large_err,
    reason = "figment's own error, once per file at start-up"
)]
fn tagged<T: Tagged>(value: &Value, section: &str) -> Result<T, figment::Error> {
    let at = |e: figment::Error| e.with_path(section);
    let Value::Dict(tag, dict) = value else {
        return Err(at(figment::Error::from(format!(
            "expected a table with a `type` key, found {}",
            value.to_actual()
        ))));
    };
    let kind = match dict.get("type") {
        Some(Value::String(_, k)) => k.clone(),
        Some(other) => {
            return Err(figment::Error::from(format!(
                "invalid type: found {}, expected a string (one of {})",
                other.to_actual(),
                T::types().join(", ")
            ))
            .with_path(&format!("{section}.type")));
        }
        None => {
            return Err(figment::Error::from(format!(
                "missing `type`: expected one of {}",
                T::types().join(", ")
            ))
            .with_path(section));
        }
    };
    let mut rest = dict.clone();
    rest.remove("type");
    let rest = Value::Dict(*tag, rest);
    match T::from_parts(&kind, &rest) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(figment::Error::from(format!(
            "unknown type {kind:?}: expected one of {}",
            T::types().join(", ")
        ))
        .with_path(&format!("{section}.type"))),
        // The variant's errors carry paths inside the section: put the section in front.
        Err(e) => Err(e
            .into_iter()
            .map(|mut e| {
                e.path.insert(0, section.to_string());
                e
            })
            .reduce(|a, b| a.chain(b))
            .unwrap_or_else(|| figment::Error::from(String::from("invalid section")))),
    }
}

/// A figment error as flowgate's: every failing key in full (`source.max_batch`), what was
/// expected, and the file.
fn invalid_config(e: figment::Error, origin: &Path) -> Error {
    let mut keys = Vec::new();
    let mut details = Vec::new();
    for one in e.into_iter() {
        let key = one.path.join(".");
        details.push(if key.is_empty() {
            one.kind.to_string()
        } else {
            format!("`{key}`: {}", one.kind)
        });
        if !key.is_empty() {
            keys.push(key);
        }
    }
    let mut err = Error::config(format!("invalid configuration: {}", details.join("; ")))
        .with_context("file", origin.display());
    if !keys.is_empty() {
        err = err.with_context("key", keys.join(", "));
    }
    err
}

#[cfg(test)]
mod tests;
