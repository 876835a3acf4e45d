//! `[sink] type = "http"`: the settings, their defaults, and `Debug` without secrets.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The HTTP sink's settings.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// The endpoint. May name record fields: `{partition}`, `{position}`, `{key}` (the record
    /// key, percent-encoded) and `{header.NAME}` (a record header, percent-encoded); records
    /// of one batch whose URLs differ go in separate requests. Required; checked when read.
    #[serde(deserialize_with = "checked_url")]
    pub url: String,
    /// `post` (default), `put` or `patch`.
    pub method: HttpMethod,
    /// How records become request bodies: `ndjson` (default), `json_array` or `single`.
    pub encoding: Encoding,
    /// `Content-Type`; default `application/x-ndjson` (ndjson) or `application/json`.
    pub content_type: Option<String>,
    /// Headers sent with every request (after the defaults; names are case-insensitive).
    pub headers: BTreeMap<String, String>,
    /// Authentication: `{ type = "bearer", token_env = "…" }` or
    /// `{ type = "basic", username = "…", password_env = "…" }`.
    pub auth: Option<HttpAuth>,
    /// The header that carries the idempotency key; `""` sends none. Default
    /// `Idempotency-Key`.
    pub idempotency_header: String,
    /// Most records in one request (batch encodings). Default 500; `single` sends one record
    /// per request whatever this says.
    pub max_batch_records: usize,
    /// Most payload bytes in one request (batch encodings). Default 4 MiB.
    pub max_batch_bytes: usize,
    /// A record's payload over this is poison (dead-lettered without a request). Default 1 MiB.
    pub max_record_bytes: usize,
    /// A request (connect, send, answer) that takes longer failed transiently. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Connecting that takes longer failed transiently. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle connections kept per host. Default 64 (the runtime's concurrency bounds how many
    /// are busy).
    pub pool_max_idle_per_host: usize,
    /// Speak HTTP/2 without negotiation (`h2c` on plain HTTP). Default false: HTTP/2 when the
    /// server offers it over TLS (ALPN), else HTTP/1.1.
    pub http2_prior_knowledge: bool,
    /// Read per-record outcomes from a batch's `2xx` answer, as documented in the guide
    /// (`{"results": [{"status": 200}, {"status": 422, "error": "…"}, …]}`, one entry per
    /// record in body order): only the failed records are retried or dead-lettered.
    pub per_record_results: bool,
    /// Bytes of an error answer's body kept in the error (and so in the dead letter).
    /// Default 1024.
    pub error_body_limit: usize,
    /// TLS for `https://` URLs: a custom CA and a client certificate.
    pub tls: Option<HttpTls>,
}

impl Default for HttpSinkConfig {
    fn default() -> Self {
        HttpSinkConfig {
            url: String::new(),
            method: HttpMethod::Post,
            encoding: Encoding::Ndjson,
            content_type: None,
            headers: BTreeMap::new(),
            auth: None,
            idempotency_header: "Idempotency-Key".into(),
            max_batch_records: 500,
            max_batch_bytes: 4 << 20,
            max_record_bytes: 1 << 20,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            pool_max_idle_per_host: 64,
            http2_prior_knowledge: false,
            per_record_results: false,
            error_body_limit: 1024,
            tls: None,
        }
    }
}

impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: BTreeMap<&str, &str> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), if sensitive(k) { "<redacted>" } else { v }))
            .collect();
        f.debug_struct("HttpSinkConfig")
            .field("url", &crate::error::shown_url(&self.url))
            .field("method", &self.method)
            .field("encoding", &self.encoding)
            .field("content_type", &self.content_type)
            .field("headers", &headers)
            .field("auth", &self.auth)
            .field("idempotency_header", &self.idempotency_header)
            .field("max_batch_records", &self.max_batch_records)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("http2_prior_knowledge", &self.http2_prior_knowledge)
            .field("per_record_results", &self.per_record_results)
            .field("error_body_limit", &self.error_body_limit)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The URL, refused when read if its template is malformed (so the error names the key and
/// the file).
fn checked_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let url = String::deserialize(d)?;
    crate::request::UrlTemplate::parse(&url).map_err(|e| serde::de::Error::custom(e.message()))?;
    Ok(url)
}

/// Header names whose values are credentials (hidden from `Debug`, marked sensitive on the
/// wire so that HTTP/2 never indexes them).
pub(crate) fn sensitive(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "authorization"
        || n == "proxy-authorization"
        || n == "cookie"
        || [
            "token",
            "secret",
            "key",
            "password",
            "auth",
            "credential",
            "signature",
        ]
        .iter()
        .any(|word| n.contains(word))
}

/// The request method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpMethod {
    /// `POST` (the default).
    #[default]
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
}

/// How records become request bodies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// One request per batch, each payload a line (payloads must be JSON without newlines).
    #[default]
    Ndjson,
    /// One request per batch, the payloads as a JSON array (payloads must be JSON).
    JsonArray,
    /// One request per record, the payload as the body, sent as it is.
    Single,
}

/// How the sink authenticates.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HttpAuth {
    /// `Authorization: Bearer …`.
    Bearer {
        /// The token; never logged. Prefer `token_env`.
        #[serde(default)]
        token: Option<String>,
        /// An environment variable holding the token (read at start).
        #[serde(default)]
        token_env: Option<String>,
    },
    /// `Authorization: Basic …`.
    Basic {
        /// The user name.
        username: String,
        /// The password; never logged. Prefer `password_env`.
        #[serde(default)]
        password: Option<String>,
        /// An environment variable holding the password (read at start).
        #[serde(default)]
        password_env: Option<String>,
    },
}

impl fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpAuth::Bearer { token, token_env } => f
                .debug_struct("Bearer")
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .field("token_env", token_env)
                .finish(),
            HttpAuth::Basic {
                username,
                password,
                password_env,
            } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &password.as_ref().map(|_| "<redacted>"))
                .field("password_env", password_env)
                .finish(),
        }
    }
}

/// TLS settings for `https://` endpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpTls {
    /// A PEM file of CA certificates to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate (chain) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub key_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        let mut cfg = HttpSinkConfig {
            url: "https://app:url-secret@scoring.internal/v1/score".into(),
            auth: Some(HttpAuth::Basic {
                username: "app".into(),
                password: Some("basic-secret".into()),
                password_env: None,
            }),
            ..Default::default()
        };
        cfg.headers
            .insert("X-Api-Key".into(), "header-secret".into());
        cfg.headers.insert("X-Team".into(), "fraud".into());
        let shown = format!("{cfg:?}");
        for secret in ["url-secret", "basic-secret", "header-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("fraud"), "{shown}");
        let bearer = HttpAuth::Bearer {
            token: Some("bearer-secret".into()),
            token_env: None,
        };
        assert!(!format!("{bearer:?}").contains("bearer-secret"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = serde_json::from_str::<HttpSinkConfig>(r#"{"url":"http://x","retries":3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("retries"), "{err}");
        let err = serde_json::from_str::<HttpSinkConfig>(r#"{"url":"http://x/{nope}"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("{nope}"), "{err}");
    }
}
