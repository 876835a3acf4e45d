//! The connection: one `reqwest` client (pool, timeouts, TLS, default headers) per sink.

use std::time::Duration;

use flowgate_core::Error;
use flowgate_core::tls::ClientIdentity;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{HttpAuth, HttpSinkConfig, HttpTls, sensitive};

/// Builds the client: idle connections bounded, timeouts, the configured CA and client
/// certificate, the static headers (credentials marked sensitive). Errors name the key.
pub(crate) fn build(cfg: &HttpSinkConfig) -> Result<reqwest::Client, Error> {
    let mut builder = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.connect_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        // A redirect would resend the records elsewhere: an answer like any other 3xx.
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(default_headers(cfg)?)
        .user_agent(concat!("flowgate/", env!("CARGO_PKG_VERSION")));
    if cfg.http2_prior_knowledge {
        builder = builder.http2_prior_knowledge();
    }
    if let Some(tls) = &cfg.tls {
        if let Some(ca) = &tls.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                Error::config("cannot read the CA file")
                    .with_context("key", "sink.tls.ca_file")
                    .with_context("path", ca.display())
                    .with_context("cause", e)
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::config("the CA file holds no PEM certificate")
                    .with_context("key", "sink.tls.ca_file")
                    .with_context("path", ca.display())
                    .with_context("cause", e)
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(id) =
            ClientIdentity::load(tls.cert_file.as_ref(), tls.key_file.as_ref(), "sink.tls")?
        {
            let mut pem = id.cert_pem;
            pem.push(b'\n');
            pem.extend_from_slice(&id.key_pem);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                Error::config("the client certificate and key do not load")
                    .with_context("key", "sink.tls.cert_file")
                    .with_context("cause", e)
                    .with_hint(
                        "give a PEM certificate (cert_file) and its PEM private key (key_file)",
                    )
            })?;
            builder = builder.identity(identity);
        }
    }
    builder.build().map_err(|e| {
        Error::config("cannot build the HTTP client")
            .with_context("key", "sink")
            .with_context("cause", e)
    })
}

fn default_headers(cfg: &HttpSinkConfig) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::new();
    for (name, value) in &cfg.headers {
        let key = format!("sink.headers.{name}");
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
            Error::config("not a valid header name")
                .with_context("key", key.clone())
                .with_context("cause", e)
        })?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            Error::config("a header value must be visible ASCII").with_context("key", key)
        })?;
        value.set_sensitive(sensitive(name));
        headers.insert(header, value);
    }
    Ok(headers)
}

/// Why the endpoint refuses our TLS, when it says so: a handshake of our own with the
/// configured CA and client certificate, then one read, since under TLS 1.3 the endpoint's
/// alert about the client's certificate comes after the handshake and reqwest's pool may drop
/// the connection without reading it. `None`: no custom TLS to check, or nothing refused.
pub(crate) async fn tls_refusal(url: &str, tls: &HttpTls) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    let ca = tls.ca_file.as_ref()?;
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?.trim_matches(['[', ']']).to_string();
    let port = parsed.port_or_known_default()?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).ok()? {
        roots.add(cert.ok()?).ok()?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .ok()?
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_file(key).ok()?;
            builder.with_client_auth_cert(chain, key).ok()?
        }
        _ => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from(host.clone()).ok()?;
    let probe = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .ok()?;
        let mut stream = match connector.connect(name, tcp).await {
            Ok(s) => s,
            Err(e) => return Some(e.to_string()),
        };
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await {
            Ok(Err(e)) => Some(e.to_string()),
            _ => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()
        .flatten()
}

/// Resolved credentials, applied to each request by reqwest (which marks them sensitive).
#[derive(Clone)]
pub(crate) enum Credentials {
    /// No `Authorization` header of ours.
    None,
    /// `Authorization: Bearer …`.
    Bearer(String),
    /// `Authorization: Basic …`.
    Basic(String, String),
}

impl Credentials {
    /// Reads the secrets (from the environment for the `*_env` keys).
    pub(crate) fn resolve(auth: Option<&HttpAuth>) -> Result<Credentials, Error> {
        Ok(match auth {
            None => Credentials::None,
            Some(HttpAuth::Bearer { token, token_env }) => {
                Credentials::Bearer(secret(token, token_env, "sink.auth.token")?)
            }
            Some(HttpAuth::Basic {
                username,
                password,
                password_env,
            }) => Credentials::Basic(
                username.clone(),
                secret(password, password_env, "sink.auth.password")?,
            ),
        })
    }

    /// The request with these credentials.
    pub(crate) fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Credentials::None => request,
            Credentials::Bearer(token) => request.bearer_auth(token),
            Credentials::Basic(user, password) => request.basic_auth(user, Some(password)),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Bearer(_) => "Bearer(<redacted>)",
            Credentials::Basic(..) => "Basic(<redacted>)",
        })
    }
}

fn secret(value: &Option<String>, env: &Option<String>, key: &str) -> Result<String, Error> {
    match (value, env) {
        (Some(v), None) => Ok(v.clone()),
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            Error::config("the environment variable holding the secret is not set")
                .with_context("key", format!("{key}_env"))
                .with_context("variable", var)
        }),
        (Some(_), Some(_)) => Err(Error::config("give the secret or its variable, not both")
            .with_context("key", key.to_string())),
        (None, None) => Err(Error::config("the secret is missing")
            .with_context("key", key.to_string())
            .with_hint("set it, or name an environment variable holding it with the `_env` key")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_secret_variable_names_its_key() {
        let auth = HttpAuth::Bearer {
            token: None,
            token_env: Some("FLOWGATE_TEST_UNSET_TOKEN_VARIABLE".into()),
        };
        let e = Credentials::resolve(Some(&auth)).unwrap_err().to_string();
        assert!(e.contains("sink.auth.token_env"), "{e}");
        assert!(e.contains("FLOWGATE_TEST_UNSET_TOKEN_VARIABLE"), "{e}");
    }
}
