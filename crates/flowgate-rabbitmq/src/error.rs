//! lapin errors mapped onto flowgate's error kinds, in one place.

use flowgate_core::{Error, ErrorKind};

/// Maps an AMQP/lapin error onto a flowgate error of the right kind, naming what failed.
pub(crate) fn map(e: lapin::Error, what: &'static str) -> Error {
    let kind = match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.get_id() {
            // content-too-large, no-route: this record, not the others.
            311 | 312 => ErrorKind::Poison,
            // access-refused, not-found, precondition-failed (a declaration that does not
            // match the existing queue), not-allowed, command-invalid: the configuration.
            403 | 404 | 406 | 503 | 530 => ErrorKind::Config,
            _ => ErrorKind::Transient,
        },
        lapin::ErrorKind::InvalidProtocolVersion(_) | lapin::ErrorKind::NoDefaultRuntime => {
            ErrorKind::Config
        }
        _ => ErrorKind::Transient,
    };
    let mut err = Error::new(kind, format!("rabbitmq: {what} failed")).with_source(e);
    if kind == ErrorKind::Config {
        err = err.with_hint(
            "check the RabbitMQ settings: url (user, password, vhost), queue name and type, permissions",
        );
    }
    err
}
