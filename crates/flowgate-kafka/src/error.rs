//! librdkafka errors mapped onto flowgate's error kinds, in one place.

use flowgate_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Maps a librdkafka error onto a flowgate error of the right kind, naming what failed.
pub(crate) fn map(e: KafkaError, what: &'static str) -> Error {
    let kind = match e.rdkafka_error_code() {
        Some(code) => kind_of(code),
        None => match &e {
            KafkaError::ClientConfig(..) => ErrorKind::Config,
            KafkaError::ClientCreation(..) => ErrorKind::Config,
            KafkaError::Canceled => ErrorKind::Transient,
            _ => ErrorKind::Transient,
        },
    };
    let mut err = Error::new(kind, format!("kafka: {what} failed")).with_source(e);
    if kind == ErrorKind::Config {
        err = err.with_hint("check the Kafka settings (bootstrap_servers, topics, properties)");
    }
    err
}

fn kind_of(code: RDKafkaErrorCode) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::QueueFull | C::ThrottlingQuotaExceeded => ErrorKind::Throttled,
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidMessage | C::InvalidRecord => {
            ErrorKind::Poison
        }
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::UnknownTopicOrPartition
        | C::InvalidConfig
        | C::InvalidArgument => ErrorKind::Config,
        C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch | C::FencedInstanceId => {
            ErrorKind::Fenced
        }
        C::Fatal => ErrorKind::Fatal,
        _ => ErrorKind::Transient,
    }
}
