//! What an endpoint's answer, or a failure to get one, means for the records sent: the one
//! place where HTTP outcomes become flowgate's error kinds.

use std::time::{Duration, SystemTime};

use flowgate_core::{Error, ErrorKind};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// The most a `Retry-After` is honoured for: an endpoint asking for hours is throttling, and
/// the runtime's retry budget decides when to give up, not the endpoint.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A URL as flowgate shows it (errors, logs, dead letters, `Debug`): without the password of
/// its user info, and with every query value hidden, since endpoints often take their key in
/// the query (`?code=…`, `?api_key=…`).
pub(crate) fn shown_url(url: &str) -> String {
    let url = flowgate_core::redact_url(url);
    let Some((base, query)) = url.split_once('?') else {
        return url;
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let hidden: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) => format!("{name}=<redacted>"),
            None => pair.to_string(),
        })
        .collect();
    let mut out = format!("{base}?{}", hidden.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// An answer's status, `Retry-After` and (the start of) its body, as an outcome:
///
/// | status | kind |
/// |---|---|
/// | 2xx | confirmed (`Ok`) |
/// | 429, 503 | `Throttled`, with `Retry-After` (seconds or an HTTP date) |
/// | 408, 409, 425, other 5xx | `Transient` (409: a request with the same idempotency key still in progress) |
/// | 401, 403, 407 | `Config` (the credentials are wrong: retrying cannot help) |
/// | 3xx, 404, 405, 410, 415 on a fixed URL | `Config` (they describe the endpoint, not a record: a wrong URL, method or content type, a redirect) |
/// | other 4xx (400, 413, 422, …; 404 and 410 on a templated URL) | `Poison` (dead letter with status and body) |
pub(crate) fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    url: &str,
    fixed_url: bool,
) -> Result<(), Error> {
    if status.is_success() {
        return Ok(());
    }
    let code = status.as_u16();
    let endpoint_wrong =
        matches!(code, 300..=399 | 405 | 415) || (fixed_url && matches!(code, 404 | 410));
    let kind = match code {
        429 | 503 => ErrorKind::Throttled,
        408 | 409 | 425 | 500..=599 => ErrorKind::Transient,
        401 | 403 | 407 => ErrorKind::Config,
        _ if endpoint_wrong => ErrorKind::Config,
        _ => ErrorKind::Poison,
    };
    let message = match (kind, endpoint_wrong) {
        (ErrorKind::Throttled, _) => "the HTTP endpoint asks to slow down",
        (ErrorKind::Transient, _) => "the HTTP endpoint failed the request",
        (ErrorKind::Config, false) => "the HTTP endpoint refused the credentials",
        (ErrorKind::Config, true) => "the HTTP endpoint does not take these requests",
        _ => "the HTTP endpoint rejected the record",
    };
    let mut e = Error::new(kind, message)
        .with_context("status", code)
        .with_context("url", shown_url(url));
    if !body.is_empty() {
        e = e.with_context("body", String::from_utf8_lossy(body));
    }
    if kind == ErrorKind::Throttled {
        if let Some(after) = retry_after(headers, SystemTime::now()) {
            e = e.with_retry_after(after);
        }
    }
    if kind == ErrorKind::Config {
        e = e.with_hint(if endpoint_wrong {
            "check sink.url, sink.method and sink.content_type (redirects are not followed)"
        } else {
            "check sink.auth and sink.headers (the token, user or password)"
        });
    }
    Err(e)
}

/// An answer for one record inside a batch's `2xx` (`per_record_results`): its status alone.
pub(crate) fn classify_entry(status: u16, error: Option<&str>, url: &str) -> Result<(), Error> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    classify(
        status,
        &HeaderMap::new(),
        error.unwrap_or_default().as_bytes(),
        url,
        false,
    )
}

/// A request that got no answer: timeouts and connection failures are transient; a TLS
/// handshake refused for the client's certificate, or a certificate we do not trust, is a
/// configuration error (retrying cannot fix it).
///
/// `probe`: what a TLS handshake of our own heard from the endpoint (see
/// `client::tls_refusal`), when the failure itself does not say.
pub(crate) fn no_answer(e: &reqwest::Error, url: &str, probe: Option<&str>) -> Error {
    let mut chain = chain_text(e);
    // reqwest names the URL in its own words: show it as flowgate shows URLs.
    if let Some(raw) = e.url() {
        chain = chain.replace(raw.as_str(), &shown_url(raw.as_str()));
    }
    if let Some(heard) = probe {
        chain.push_str("; a TLS handshake to the endpoint: ");
        chain.push_str(heard);
    }
    let https = url.starts_with("https://");
    let url = shown_url(url);
    // A fatal alert in a fresh handshake of our own is the endpoint refusing this TLS setup
    // (with a client certificate configured: that certificate); a retry cannot change it.
    let refused_in_probe = probe.is_some_and(|p| p.contains("received fatal alert"));
    if flowgate_core::tls::refused_client_certificate(&chain) || refused_in_probe {
        return Error::config("the HTTP endpoint refused the client certificate")
            .with_context("url", url)
            .with_context("cause", chain)
            .with_hint(
                "set sink.tls.cert_file and sink.tls.key_file to a certificate the endpoint trusts",
            );
    }
    if chain.contains("invalid peer certificate") || chain.contains("UnknownIssuer") {
        return Error::config("the HTTP endpoint's certificate is not trusted")
            .with_context("url", url)
            .with_context("cause", chain)
            .with_hint("set sink.tls.ca_file to the CA that signed the endpoint's certificate");
    }
    let message = if e.is_timeout() {
        "the HTTP endpoint did not answer in time"
    } else if e.is_connect() {
        "cannot connect to the HTTP endpoint"
    } else {
        "the HTTP request failed"
    };
    let mut err = Error::transient(message)
        .with_context("url", url)
        .with_context("cause", chain);
    if e.is_timeout() {
        err = err.with_hint("raise sink.timeout if the endpoint is slow but healthy");
    } else if https && !e.is_connect() {
        // Under TLS 1.3 an endpoint that refuses the client's certificate may only close the
        // connection: the alert saying why can be lost.
        err = err.with_hint("if the endpoint requires a client certificate, check that sink.tls.cert_file is one it trusts");
    }
    err
}

/// The error and its causes, joined (reqwest's own text names only the outermost).
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `Retry-After` as a wait from `now`: delay-seconds or an HTTP date, capped.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn kind_at(code: u16, fixed: bool) -> Option<ErrorKind> {
        classify(
            StatusCode::from_u16(code).unwrap(),
            &HeaderMap::new(),
            b"",
            "http://x",
            fixed,
        )
        .err()
        .map(|e| e.kind())
    }

    fn kind(code: u16) -> Option<ErrorKind> {
        kind_at(code, false)
    }

    #[test]
    fn every_status_class_maps_to_one_kind() {
        for ok in [200, 201, 202, 204, 207] {
            assert_eq!(kind(ok), None, "{ok}");
        }
        for t in [429, 503] {
            assert_eq!(kind(t), Some(ErrorKind::Throttled), "{t}");
        }
        for t in [408, 409, 425, 500, 502, 504, 599] {
            assert_eq!(kind(t), Some(ErrorKind::Transient), "{t}");
        }
        for c in [301, 308, 401, 403, 405, 407, 415] {
            assert_eq!(kind(c), Some(ErrorKind::Config), "{c}");
        }
        for p in [400, 404, 410, 413, 422] {
            assert_eq!(kind(p), Some(ErrorKind::Poison), "{p} on a templated URL");
        }
        // On a fixed URL a 404 or 410 says the endpoint is wrong, not the record: dead-letter
        // the whole stream record by record would be the wrong answer.
        for c in [404, 410] {
            assert_eq!(
                kind_at(c, true),
                Some(ErrorKind::Config),
                "{c} on a fixed URL"
            );
        }
        assert_eq!(kind_at(422, true), Some(ErrorKind::Poison));
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_is_kept() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&past).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("86400"));
        assert_eq!(retry_after(&h, now), Some(MAX_RETRY_AFTER));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);

        h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        let e = classify(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            b"slow down",
            "http://x",
            true,
        )
        .unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
        assert!(e.to_string().contains("status=429"), "{e}");
        assert!(e.to_string().contains("body=slow down"), "{e}");
    }

    #[test]
    fn shown_urls_hide_passwords_and_query_values() {
        assert_eq!(
            shown_url("https://u:pw@h/f?code=abc&x=1#top"),
            "https://u:<redacted>@h/f?code=<redacted>&x=<redacted>#top"
        );
        assert_eq!(shown_url("http://h/path"), "http://h/path");
    }

    #[test]
    fn credentials_in_the_url_never_reach_the_error() {
        let e = classify(
            StatusCode::UNPROCESSABLE_ENTITY,
            &HeaderMap::new(),
            b"{\"error\":\"amount missing\"}",
            "https://app:s3cret@scoring.internal/v1?code=q5ecret",
            true,
        )
        .unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(
            !e.to_string().contains("q5ecret"),
            "query values are hidden too: {e}"
        );
        assert!(e.to_string().contains("amount missing"), "{e}");
    }
}
