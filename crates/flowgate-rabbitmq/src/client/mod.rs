//! Opening a connection (plain or TLS), in one place for the source and the sink; and the
//! source's connection task ([`driver`]).

use flowgate_core::{Error, ErrorKind};
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

use crate::config::{RabbitTls, redact};
use crate::error::map;

pub(crate) mod driver;

/// Refuses TLS settings that cannot apply: they need an `amqps://` URL.
pub(crate) fn check_tls(url: &str, tls: Option<&RabbitTls>, side: &str) -> Result<(), Error> {
    if tls.is_some() && !url.starts_with("amqps://") {
        return Err(
            Error::config("rabbitmq: TLS settings are given but the url is not amqps://")
                .with_context("key", format!("{side}.tls"))
                .with_context("url", redact(url))
                .with_hint("use an amqps:// url (port 5671 by default), or remove the tls table"),
        );
    }
    Ok(())
}

/// Connects to `url`; with `tls`, the server's certificate must be signed by `tls.ca_file`
/// (else by the system's trusted roots). A certificate that does not verify is a `config`
/// error: retrying cannot fix it. `side` (`source` or `sink`) names the keys in errors.
pub(crate) async fn connect(
    url: &str,
    tls: Option<&RabbitTls>,
    side: &str,
) -> Result<Connection, Error> {
    let mut config = OwnedTLSConfig::default();
    if let Some(path) = tls.and_then(|t| t.ca_file.as_ref()) {
        let pem = std::fs::read_to_string(path).map_err(|e| {
            Error::config("rabbitmq: the CA file cannot be read")
                .with_context("key", format!("{side}.tls.ca_file"))
                .with_context("path", path.display())
                .with_context("cause", e)
        })?;
        config.cert_chain = Some(pem);
    }
    if let Some(t) = tls {
        let prefix = format!("{side}.tls");
        if let Some(id) = flowgate_core::tls::ClientIdentity::load(
            t.cert_file.as_ref(),
            t.key_file.as_ref(),
            &prefix,
        )? {
            config.identity = Some(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: id.cert_pem,
                key: id.key_pem,
            });
        }
    }
    let runtime = lapin::runtime::default_runtime().map_err(|e| map(e, "starting lapin"))?;
    Connection::connect_with_config(url, ConnectionProperties::default(), config, runtime)
        .await
        .map_err(|e| {
            let text = e.to_string();
            let mut err = map(e, "connecting").with_context("url", redact(url));
            if flowgate_core::tls::refused_client_certificate(&text) {
                err = Error::new(ErrorKind::Config, "rabbitmq: the broker asks for a client certificate and refused the one given (or none)")
                    .with_context("url", redact(url))
                    .with_context("cause", text)
                    .with_hint(format!(
                        "set {side}.tls.cert_file and {side}.tls.key_file to a certificate the broker's CA signed"
                    ));
            } else if text.contains("certificate") {
                err = Error::new(ErrorKind::Config, "rabbitmq: the server's TLS certificate was refused")
                    .with_context("url", redact(url))
                    .with_context("cause", text)
                    .with_hint(format!(
                        "set {side}.tls.ca_file to the CA that signed the broker's certificate, and connect by the name or IP the certificate names"
                    ));
            }
            err
        })
}
