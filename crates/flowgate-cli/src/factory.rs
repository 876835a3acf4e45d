//! Building the parts a pipeline file names: the source, the sinks and the stores.

use std::sync::Arc;

use flowgate_checkpoint::{EmbeddedStore, MemoryStore, PostgresStore, TableMode};
use flowgate_core::{CheckpointStore, DedupStore, Error, LeaseStore, Sink, Source};
use flowgate_runtime::Pipeline;
use flowgate_runtime::adapters::{
    FaultConfig, FaultInjectingSink, GeneratorSource, JsonLinesConfig, JsonLinesSink, NullSink,
};

use crate::config::{PipelineConfig, SinkConfig, SourceConfig, StoreConfig};
use crate::registry::Resources;
#[cfg(feature = "kafka")]
use crate::registry::{BrokerSink, BrokerSource};

/// The stores of `[store]`, by the roles they play.
pub(crate) struct Stores {
    pub(crate) checkpoint: Option<Arc<dyn CheckpointStore>>,
    pub(crate) dedup: Option<Arc<dyn DedupStore>>,
    /// The same store's leases (Kinesis shards), fencing its own checkpoints.
    pub(crate) leases: Option<Arc<dyn LeaseStore>>,
    pub(crate) embedded: Option<EmbeddedStore>,
    pub(crate) postgres: Option<Arc<PostgresStore>>,
}

impl Stores {
    /// No store at all.
    pub(crate) fn none() -> Stores {
        Stores {
            checkpoint: None,
            dedup: None,
            leases: None,
            embedded: None,
            postgres: None,
        }
    }

    /// A store that plays every role and has no table sink.
    fn shared<S: CheckpointStore + DedupStore + LeaseStore + 'static>(s: Arc<S>) -> Stores {
        Stores {
            checkpoint: Some(s.clone()),
            dedup: Some(s.clone()),
            leases: Some(s),
            ..Stores::none()
        }
    }
}

/// Opens (connects to) `[store]`.
pub(crate) async fn open_store(cfg: &StoreConfig) -> Result<Stores, Error> {
    Ok(match cfg {
        StoreConfig::Embedded(e) => {
            let s = EmbeddedStore::open_dir(&e.path).await?;
            Stores {
                checkpoint: Some(Arc::new(s.clone())),
                dedup: Some(Arc::new(s.clone())),
                leases: Some(Arc::new(s.clone())),
                embedded: Some(s),
                postgres: None,
            }
        }
        StoreConfig::Postgres(c) => {
            let s = PostgresStore::connect(c.clone()).await?;
            Stores {
                checkpoint: Some(s.clone()),
                dedup: Some(s.clone()),
                leases: Some(s.clone()),
                embedded: None,
                postgres: Some(s),
            }
        }
        StoreConfig::Redis(c) => {
            Stores::shared(flowgate_checkpoint::RedisStore::connect(c.clone()).await?)
        }
        StoreConfig::Dynamodb(c) => {
            Stores::shared(flowgate_checkpoint::DynamoDbStore::connect(c.clone()).await?)
        }
        StoreConfig::Memory => Stores::shared(Arc::new(MemoryStore::new())),
        StoreConfig::None => Stores::none(),
    })
}

/// The sink `cfg` describes (`key`: `sink` or `dead_letter`, named in errors).
pub(crate) async fn make_sink(
    cfg: &SinkConfig,
    stores: &Stores,
    pipeline: &str,
    key: &str,
) -> Result<Box<dyn Sink>, Error> {
    let (sink, faults): (Box<dyn Sink>, &Option<FaultConfig>) = match cfg {
        SinkConfig::Null(n) => (Box::new(NullSink::default()), &n.faults),
        SinkConfig::Jsonl(j) => (
            Box::new(
                JsonLinesSink::open(JsonLinesConfig {
                    path: j.path.clone(),
                    fsync: j.fsync,
                })
                .await?,
            ),
            &j.faults,
        ),
        SinkConfig::Table(t) => {
            let (table, mode, faults) = (&t.table, &t.mode, &t.faults);
            let sink: Box<dyn Sink> = match (&stores.embedded, &stores.postgres) {
                (Some(store), _) if *mode == TableMode::Insert => Box::new(store.table_sink(table)),
                (_, Some(store)) => Box::new(store.table_sink(pipeline, table, *mode).await?),
                (Some(_), None) => {
                    return Err(
                        Error::config("mode = \"upsert\" needs the PostgreSQL store")
                            .with_context("key", format!("{key}.mode")),
                    );
                }
                (None, None) => {
                    return Err(Error::config(
                        "a `table` sink needs the embedded or PostgreSQL store",
                    )
                    .with_context("key", format!("{key}.type"))
                    .with_hint("set store.type = \"embedded\" or \"postgres\""));
                }
            };
            (sink, faults)
        }
        SinkConfig::Broker(b) => (b.build(&Resources { stores }, key).await?, &None),
    };
    Ok(match faults {
        Some(f) => Box::new(FaultInjectingSink::new(sink, f.clone())),
        None => sink,
    })
}

/// The whole pipeline of a file, and its stores (kept open while it runs).
pub(crate) async fn build(cfg: &PipelineConfig) -> Result<(Pipeline, Stores), Error> {
    let stores = open_store(&cfg.store).await?;
    // Kafka -> transactional Kafka sink: the consumed offsets commit inside the sink's
    // transactions (exactly-once).
    let (source, bridge): (Box<dyn Source>, Option<Box<dyn Sink>>) = match (&cfg.source, &cfg.sink)
    {
        #[cfg(feature = "kafka")]
        (
            SourceConfig::Broker(BrokerSource::Kafka(k)),
            SinkConfig::Broker(BrokerSink::Kafka(sk)),
        ) if sk.transactional_id.is_some() => {
            let source = flowgate_kafka::KafkaSource::new(k.clone())?;
            let sink = flowgate_kafka::KafkaSink::new(sk.clone())?
                .with_offsets_of(source.offsets_link())?;
            (Box::new(source), Some(Box::new(sink)))
        }
        _ => (make_source(&cfg.source, &stores).await?, None),
    };
    let sink = match bridge {
        Some(sink) => sink,
        None => make_sink(&cfg.sink, &stores, &cfg.name, "sink").await?,
    };
    let mut b = Pipeline::builder(cfg.name.clone())
        .source(source)
        .sink(sink)
        .settings(cfg.runtime.clone());
    if let Some(dl) = &cfg.dead_letter {
        b = b.dead_letter(make_sink(dl, &stores, &cfg.name, "dead_letter").await?);
    }
    if let Some(store) = &stores.checkpoint {
        b = b.checkpoint_store(store.clone());
    }
    if let Some(d) = &cfg.dedup {
        let store = stores.dedup.clone().ok_or_else(|| {
            Error::config("dedup needs a store")
                .with_context("key", "dedup")
                .with_hint("set store.type = \"embedded\" or \"memory\"")
        })?;
        b = b.dedup(store, d.extractor()?);
    }
    Ok((b.build()?, stores))
}

/// The source `cfg` describes.
pub(crate) async fn make_source(
    cfg: &SourceConfig,
    stores: &Stores,
) -> Result<Box<dyn Source>, Error> {
    Ok(match cfg {
        SourceConfig::Generator(g) => Box::new(GeneratorSource::new(g.clone())?),
        SourceConfig::Broker(b) => b.build(&Resources { stores }).await?,
    })
}
