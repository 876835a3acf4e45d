//! Every adapter crate the CLI knows, in one list: its Cargo feature, its `type` in a pipeline
//! file, its config type and how it is built. The list generates the config enums of broker
//! sources and sinks (a variant per adapter, or a placeholder naming the missing feature when
//! the binary was built without it), reading them from a file, and building them. Adding an
//! adapter to the CLI is one line here and one feature in `Cargo.toml`.

use std::sync::Arc;

use figment::value::Value;
use flowgate_checkpoint::MemoryStore;
use flowgate_core::{Error, LeaseStore, Sink, Source};

use crate::factory::Stores;

/// What an adapter's constructor may use besides its own settings.
pub(crate) struct Resources<'a> {
    /// The pipeline's stores (Kinesis keeps its shard leases in them).
    #[cfg_attr(not(feature = "kinesis"), allow(dead_code))]
    pub(crate) stores: &'a Stores,
}

impl Resources<'_> {
    /// The pipeline store's leases; without a store, leases in memory (one worker owns all).
    #[cfg_attr(not(feature = "kinesis"), allow(dead_code))]
    fn leases(&self) -> Arc<dyn LeaseStore> {
        match &self.stores.leases {
            Some(l) => l.clone(),
            None => Arc::new(MemoryStore::new()),
        }
    }
}

/// Settings of an adapter this binary was built without; read so that the error can name the
/// missing Cargo feature instead of calling the `type` unknown.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[allow(dead_code)]
pub(crate) struct NotCompiled {}

/// The error for an adapter this binary was built without.
#[allow(dead_code)]
pub(crate) fn missing_feature(feature: &str, key: &str) -> Error {
    Error::config(format!(
        "this flowgate binary was built without the `{feature}` adapter"
    ))
    .with_context("key", format!("{key}.type"))
    .with_hint(format!(
        "build the flowgate CLI with `--features {feature}` (on by default)"
    ))
}

macro_rules! adapters {
    (
        sources { $( $sfeature:literal => $SVariant:ident($SConfig:ty), |$scfg:ident, $sres:ident| $sbuild:expr; )* }
        sinks { $( $kfeature:literal => $KVariant:ident($KConfig:ty), |$kcfg:ident, $kres:ident| $kbuild:expr; )* }
    ) => {
        /// A broker source, by `type`.
        #[derive(Clone, Debug)]
        pub(crate) enum BrokerSource {
            $(
                #[doc = concat!("`type = \"", $sfeature, "\"`.")]
                #[cfg(feature = $sfeature)]
                $SVariant($SConfig),
                #[doc = concat!("`type = \"", $sfeature, "\"`, not compiled in.")]
                #[cfg(not(feature = $sfeature))]
                $SVariant(NotCompiled),
            )*
        }

        impl BrokerSource {
            /// The `type` of every broker source.
            pub(crate) const TYPES: &'static [&'static str] = &[$($sfeature),*];

            /// The source of `type = kind`, read from the rest of its section.
            #[allow(clippy::result_large_err, reason = "figment's own error, once per file at start-up")]
            pub(crate) fn from_parts(kind: &str, rest: &Value) -> Result<Option<Self>, figment::Error> {
                Ok(Some(match kind {
                    $( $sfeature => BrokerSource::$SVariant(rest.deserialize()?), )*
                    _ => return Ok(None),
                }))
            }

            /// Builds it.
            #[allow(unused_variables)]
            pub(crate) async fn build(&self, resources: &Resources<'_>) -> Result<Box<dyn Source>, Error> {
                match self {
                    $(
                        #[cfg(feature = $sfeature)]
                        BrokerSource::$SVariant($scfg) => {
                            let $sres = resources;
                            Ok($sbuild)
                        }
                        #[cfg(not(feature = $sfeature))]
                        BrokerSource::$SVariant(_) => Err(missing_feature($sfeature, "source")),
                    )*
                }
            }
        }

        /// A broker (or service) sink, by `type`.
        #[derive(Clone, Debug)]
        pub(crate) enum BrokerSink {
            $(
                #[doc = concat!("`type = \"", $kfeature, "\"`.")]
                #[cfg(feature = $kfeature)]
                $KVariant($KConfig),
                #[doc = concat!("`type = \"", $kfeature, "\"`, not compiled in.")]
                #[cfg(not(feature = $kfeature))]
                $KVariant(NotCompiled),
            )*
        }

        impl BrokerSink {
            /// The `type` of every broker sink.
            pub(crate) const TYPES: &'static [&'static str] = &[$($kfeature),*];

            /// The sink of `type = kind`, read from the rest of its section.
            #[allow(clippy::result_large_err, reason = "figment's own error, once per file at start-up")]
            pub(crate) fn from_parts(kind: &str, rest: &Value) -> Result<Option<Self>, figment::Error> {
                Ok(Some(match kind {
                    $( $kfeature => BrokerSink::$KVariant(rest.deserialize()?), )*
                    _ => return Ok(None),
                }))
            }

            /// Builds it (`key`: `sink` or `dead_letter`, named in errors).
            #[allow(unused_variables)]
            pub(crate) async fn build(&self, resources: &Resources<'_>, key: &str) -> Result<Box<dyn Sink>, Error> {
                match self {
                    $(
                        #[cfg(feature = $kfeature)]
                        BrokerSink::$KVariant($kcfg) => {
                            let $kres = resources;
                            Ok($kbuild)
                        }
                        #[cfg(not(feature = $kfeature))]
                        BrokerSink::$KVariant(_) => Err(missing_feature($kfeature, key)),
                    )*
                }
            }
        }
    };
}

adapters! {
    sources {
        "kafka" => Kafka(flowgate_kafka::KafkaSourceConfig),
            |cfg, res| Box::new(flowgate_kafka::KafkaSource::new(cfg.clone())?);
        "kinesis" => Kinesis(flowgate_kinesis::KinesisSourceConfig),
            |cfg, res| Box::new(flowgate_kinesis::KinesisSource::new(cfg.clone(), res.leases())?);
        "rabbitmq" => Rabbitmq(flowgate_rabbitmq::RabbitSourceConfig),
            |cfg, res| Box::new(flowgate_rabbitmq::RabbitSource::new(cfg.clone())?);
    }
    sinks {
        "kafka" => Kafka(flowgate_kafka::KafkaSinkConfig),
            |cfg, res| Box::new(flowgate_kafka::KafkaSink::new(cfg.clone())?);
        "kinesis" => Kinesis(flowgate_kinesis::KinesisSinkConfig),
            |cfg, res| Box::new(flowgate_kinesis::KinesisSink::connect(cfg.clone()).await?);
        "rabbitmq" => Rabbitmq(flowgate_rabbitmq::RabbitSinkConfig),
            |cfg, res| Box::new(flowgate_rabbitmq::RabbitSink::new(cfg.clone())?);
        "http" => Http(flowgate_http::HttpSinkConfig),
            |cfg, res| Box::new(flowgate_http::HttpSink::new(cfg.clone())?);
    }
}
