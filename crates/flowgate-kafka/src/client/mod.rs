//! The librdkafka client settings shared by the source and the sink: brokers, TLS, SASL;
//! the partition queues read through librdkafka's C API ([`queue`]), and Kafka messages
//! turned into flowgate records ([`records`]).

use std::path::Path;

use flowgate_core::Error;
use rdkafka::ClientConfig;

use crate::config::{KafkaSasl, KafkaTls, SaslMechanism, SecurityProtocol};

pub(crate) mod queue;
pub(crate) mod records;

/// How a client reaches its brokers: the first-class security keys of a source or sink.
pub(crate) struct Brokers<'a> {
    pub(crate) bootstrap_servers: &'a str,
    pub(crate) security_protocol: Option<SecurityProtocol>,
    pub(crate) tls: Option<&'a KafkaTls>,
    pub(crate) sasl: Option<&'a KafkaSasl>,
    /// `source` or `sink`: names the keys in errors.
    pub(crate) side: &'static str,
}

impl Brokers<'_> {
    /// The protocol in force: the configured one, else inferred from the tables present.
    pub(crate) fn protocol(&self) -> SecurityProtocol {
        self.security_protocol
            .unwrap_or(match (self.sasl.is_some(), self.tls.is_some()) {
                (true, _) => SecurityProtocol::SaslSsl,
                (false, true) => SecurityProtocol::Ssl,
                (false, false) => SecurityProtocol::Plaintext,
            })
    }

    /// What errors and connection events name: the servers, the protocol and the mechanism
    /// (never a credential).
    pub(crate) fn describe(&self) -> String {
        let protocol = protocol_name(self.protocol());
        match self.sasl {
            Some(s) => format!(
                "{} ({protocol}, {})",
                self.bootstrap_servers,
                s.mechanism.as_str()
            ),
            None => format!("{} ({protocol})", self.bootstrap_servers),
        }
    }

    /// Sets `bootstrap.servers`, `security.protocol` and the `ssl.*` / `sasl.*` properties.
    /// Refuses settings that cannot work (a SASL table on a protocol without SASL, a key
    /// without its certificate, a missing file or password variable), naming the key.
    pub(crate) fn apply(&self, cc: &mut ClientConfig) -> Result<(), Error> {
        let side = self.side;
        let protocol = self.protocol();
        // librdkafka's reconnect backoff grows to 10 s: a client whose broker was unreachable
        // for a while came back up to 10 s after the network did (9.6 s measured by
        // `cargo xtask chaos` after a 15 s cut). 1 s caps that at one attempt a second.
        cc.set("bootstrap.servers", self.bootstrap_servers)
            .set("security.protocol", protocol_name(protocol))
            .set("reconnect.backoff.max.ms", "1000");
        let uses_tls = matches!(protocol, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl);
        let uses_sasl = matches!(
            protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        );
        if self.sasl.is_some() && !uses_sasl {
            return Err(Error::config(format!(
                "kafka: a `sasl` table is given but security_protocol is {}",
                protocol_name(protocol)
            ))
            .with_context("key", format!("{side}.security_protocol"))
            .with_hint(
                "use sasl_ssl (or sasl_plaintext on a trusted network), or remove the sasl table",
            ));
        }
        if uses_sasl && self.sasl.is_none() {
            return Err(Error::config(format!(
                "kafka: security_protocol {} needs a `sasl` table",
                protocol_name(protocol)
            ))
            .with_context("key", format!("{side}.sasl")));
        }
        if let Some(tls) = self.tls {
            if !uses_tls {
                return Err(Error::config(format!(
                    "kafka: a `tls` table is given but security_protocol is {}",
                    protocol_name(protocol)
                ))
                .with_context("key", format!("{side}.security_protocol"))
                .with_hint("use ssl or sasl_ssl"));
            }
            if let Some(ca) = &tls.ca {
                cc.set("ssl.ca.location", readable(ca, &format!("{side}.tls.ca"))?);
            }
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => {
                    cc.set(
                        "ssl.certificate.location",
                        readable(cert, &format!("{side}.tls.cert"))?,
                    )
                    .set(
                        "ssl.key.location",
                        readable(key, &format!("{side}.tls.key"))?,
                    );
                }
                (None, None) => {}
                _ => {
                    return Err(Error::config(
                        "kafka: a client certificate needs both `tls.cert` and `tls.key`",
                    )
                    .with_context("key", format!("{side}.tls")));
                }
            }
            if let Some(pw) = &tls.key_password {
                cc.set("ssl.key.password", pw);
            }
            cc.set(
                "ssl.endpoint.identification.algorithm",
                if tls.verify_hostname { "https" } else { "none" },
            );
        }
        if let Some(sasl) = self.sasl {
            cc.set("sasl.mechanism", sasl.mechanism.as_str());
            if sasl.mechanism != SaslMechanism::Oauthbearer {
                let user = sasl.username.as_deref().ok_or_else(|| {
                    Error::config(format!(
                        "kafka: SASL {} needs a username",
                        sasl.mechanism.as_str()
                    ))
                    .with_context("key", format!("{side}.sasl.username"))
                })?;
                cc.set("sasl.username", user)
                    .set("sasl.password", password(sasl, side)?);
            }
        }
        Ok(())
    }
}

/// The password: given inline or read from the variable `password_env` names.
fn password(sasl: &KafkaSasl, side: &str) -> Result<String, Error> {
    match (&sasl.password, &sasl.password_env) {
        (Some(p), None) => Ok(p.clone()),
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            Error::config(format!(
                "kafka: the environment variable {var} (sasl.password_env) is not set"
            ))
            .with_context("key", format!("{side}.sasl.password_env"))
        }),
        (Some(_), Some(_)) => Err(Error::config(
            "kafka: give either sasl.password or sasl.password_env, not both",
        )
        .with_context("key", format!("{side}.sasl"))),
        (None, None) => Err(Error::config(format!(
            "kafka: SASL {} needs a password (sasl.password or sasl.password_env)",
            sasl.mechanism.as_str()
        ))
        .with_context("key", format!("{side}.sasl.password"))),
    }
}

/// `path` as a string, if the file can be read; a config error naming `key` otherwise.
fn readable(path: &Path, key: &str) -> Result<String, Error> {
    std::fs::File::open(path).map_err(|e| {
        Error::config("kafka: a TLS file cannot be read")
            .with_context("key", key.to_string())
            .with_context("path", path.display())
            .with_context("cause", e)
    })?;
    Ok(path.display().to_string())
}

fn protocol_name(p: SecurityProtocol) -> &'static str {
    match p {
        SecurityProtocol::Plaintext => "plaintext",
        SecurityProtocol::Ssl => "ssl",
        SecurityProtocol::SaslPlaintext => "sasl_plaintext",
        SecurityProtocol::SaslSsl => "sasl_ssl",
    }
}

/// Whether a librdkafka error means the credentials or certificates are wrong: retrying
/// cannot fix those, so they stop the pipeline as configuration errors. `detail` is what
/// librdkafka said about it (its log line or the error's reason): the codes alone also cover
/// what a retry does fix — a TLS connection cut while a broker restarts ("SSL handshake
/// failed: Disconnected"), an identity provider briefly down for OAUTHBEARER.
pub(crate) fn is_auth_failure(e: &rdkafka::error::KafkaError, detail: &str) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    let detail = detail.to_ascii_lowercase();
    match e.rdkafka_error_code() {
        Some(C::Authentication | C::SaslAuthenticationFailed) => {
            detail.contains("invalid credentials")
                || detail.contains("authentication failed")
                || detail.contains("unsupported sasl mechanism")
        }
        // The broker's refusal of the client's certificate arrives as a TLS alert after the
        // handshake (TLS 1.3), which librdkafka reports as a transport failure.
        Some(C::SSL | C::BrokerTransportFailure) => {
            detail.contains("certificate verify failed")
                || detail.contains("unknown ca")
                || detail.contains("bad certificate")
                || detail.contains("certificate required")
                || detail.contains("certificate unknown")
        }
        _ => false,
    }
}

/// The configuration error for an authentication or TLS failure on `conn`.
pub(crate) fn auth_error(conn: &str, side: &str, cause: &str) -> Error {
    let client_cert = cause.contains("alert bad certificate")
        || cause.contains("alert certificate required")
        || cause.contains("alert unknown ca");
    if client_cert {
        return Error::config("kafka: the broker refused the client certificate (or its absence)")
            .with_context("endpoint", conn)
            .with_context("cause", cause)
            .with_hint(format!(
                "set {side}.tls.cert and {side}.tls.key to a certificate the broker's CA signed (TLS)"
            ));
    }
    let tls = cause.contains("SSL") || cause.contains("certificate");
    Error::config(if tls {
        "kafka: the TLS handshake with the broker failed"
    } else {
        "kafka: the broker refused the credentials"
    })
    .with_context("endpoint", conn)
    .with_context("cause", cause)
    .with_hint(if tls {
        format!("check {side}.tls.ca (the CA that signed the broker's certificate) and that bootstrap_servers names a host the certificate covers")
    } else {
        format!("check {side}.sasl.mechanism, username and password (or password_env) against the cluster's users")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

    #[test]
    fn only_refused_credentials_and_certificates_are_configuration_errors() {
        let ssl = KafkaError::Global(C::SSL);
        let auth = KafkaError::Global(C::Authentication);
        assert!(is_auth_failure(
            &ssl,
            "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed"
        ));
        assert!(is_auth_failure(
            &auth,
            "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
        ));
        // A broker restarting under a TLS connection, an identity provider briefly down.
        assert!(!is_auth_failure(&ssl, "SSL handshake failed: Disconnected"));
        assert!(!is_auth_failure(
            &auth,
            "Failed to acquire SASL OAUTHBEARER token: connection refused"
        ));
        assert!(!is_auth_failure(
            &KafkaError::Global(C::AllBrokersDown),
            "certificate verify failed"
        ));
        let transport = KafkaError::Global(C::BrokerTransportFailure);
        assert!(is_auth_failure(
            &transport,
            "Receive failed: error:0A000412:SSL routines::sslv3 alert bad certificate: SSL alert number 42"
        ));
        assert!(!is_auth_failure(
            &transport,
            "Connect to ipv4#127.0.0.1:1 failed: Connection refused"
        ));
    }
}
