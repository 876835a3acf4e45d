//! Turning records into requests: the URL template, the body encodings, and the
//! idempotency key as a header value.

use bytes::{BufMut, Bytes, BytesMut};
use flowgate_core::{Error, IdempotencyKey, Record};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::config::Encoding;

/// Characters left as they are in a templated URL part (RFC 3986 unreserved).
const PART: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `url` with `{partition}`, `{position}`, `{key}` and `{header.NAME}` filled per record.
#[derive(Clone, Debug)]
pub(crate) struct UrlTemplate {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Partition,
    Position,
    Key,
    Header(String),
}

impl UrlTemplate {
    /// Parses the template; an unknown `{field}` or an unclosed brace names `sink.url`.
    pub(crate) fn parse(url: &str) -> Result<UrlTemplate, Error> {
        let bad = |what: &str| {
            Error::config(format!(
                "the URL template {what} (fields: {{partition}}, {{position}}, {{key}}, {{header.NAME}})"
            ))
                .with_context("key", "sink.url")
                .with_context("url", crate::error::shown_url(url))
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad("must start with http:// or https://"));
        }
        let mut parts = Vec::new();
        let mut rest = url;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| bad("has an unclosed `{`"))?;
            let field = &rest[open + 1..open + close];
            parts.push(match field {
                "partition" => Part::Partition,
                "position" => Part::Position,
                "key" => Part::Key,
                f => match f.strip_prefix("header.") {
                    Some(name) if !name.is_empty() => Part::Header(name.to_string()),
                    _ => return Err(bad(&format!("names an unknown field `{{{f}}}`"))),
                },
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(UrlTemplate { parts })
    }

    /// The URL when it names no record field.
    pub(crate) fn fixed(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Text(t)] => Some(t),
            [] => Some(""),
            _ => None,
        }
    }

    /// The URL for one record (a missing key or header renders empty).
    pub(crate) fn render(&self, r: &Record) -> String {
        let mut url = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => url.push_str(t),
                Part::Partition => url.extend(utf8_percent_encode(r.partition.as_str(), PART)),
                Part::Position => url.push_str(&r.position.to_string()),
                Part::Key => {
                    if let Some(k) = &r.key {
                        url.extend(utf8_percent_encode(&String::from_utf8_lossy(k), PART));
                    }
                }
                Part::Header(name) => {
                    if let Some(v) = r.headers.get(name) {
                        url.extend(utf8_percent_encode(&String::from_utf8_lossy(v), PART));
                    }
                }
            }
        }
        url
    }
}

/// Checks that a record's payload can go into a body: batch encodings need JSON. `Ok(None)`:
/// the payload goes as it is; `Ok(Some(_))`: a multi-line JSON payload compacted onto one
/// line for `ndjson`.
pub(crate) fn payload(encoding: Encoding, r: &Record) -> Result<Option<Bytes>, Error> {
    if encoding == Encoding::Single {
        return Ok(None);
    }
    let not_json = |e: serde_json::Error| {
        Error::poison("the record's payload is not JSON, which the sink's encoding needs")
            .with_context("key", "sink.encoding")
            .with_context("cause", e)
            .with_hint("send it with encoding = \"single\", or fix the producer")
    };
    if r.payload.contains(&b'\n') {
        let value: serde_json::Value = serde_json::from_slice(&r.payload).map_err(not_json)?;
        return serde_json::to_vec(&value)
            .map(|v| Some(Bytes::from(v)))
            .map_err(not_json);
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&r.payload).map_err(not_json)?;
    Ok(None)
}

/// The body of one request from already checked payloads.
pub(crate) fn body<'a>(
    encoding: Encoding,
    payloads: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
) -> Bytes {
    match encoding {
        Encoding::Single => payloads
            .into_iter()
            .next()
            .map(Bytes::copy_from_slice)
            .unwrap_or_default(),
        Encoding::Ndjson => {
            let mut b = BytesMut::with_capacity(payloads.clone().map(|p| p.len() + 1).sum());
            for p in payloads {
                b.put_slice(p);
                b.put_u8(b'\n');
            }
            b.freeze()
        }
        Encoding::JsonArray => {
            let mut b =
                BytesMut::with_capacity(payloads.clone().map(|p| p.len() + 1).sum::<usize>() + 2);
            b.put_u8(b'[');
            for (i, p) in payloads.enumerate() {
                if i > 0 {
                    b.put_u8(b',');
                }
                b.put_slice(p);
            }
            b.put_u8(b']');
            b.freeze()
        }
    }
}

/// The idempotency key of one record as header text: its key when that is visible ASCII,
/// `PARTITION@POSITION` for keys derived from the position (and records without a key), else
/// the key's bytes in hex behind `x`.
pub(crate) fn key_text(r: &Record) -> String {
    let Some(key) = &r.idempotency_key else {
        return format!("{}@{}", r.partition, r.position);
    };
    let bytes = key.as_bytes();
    if !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| (0x21..=0x7e).contains(b) && *b != b',')
    {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    if *key == IdempotencyKey::from_position(&r.partition, &r.position) {
        return format!("{}@{}", r.partition, r.position);
    }
    let mut hex = String::with_capacity(1 + bytes.len() * 2);
    hex.push('x');
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The idempotency key of a request: the record's own for one record; for several,
/// `FIRST..LAST/N-HASH` — the first and last records' keys, how many records, and a 64-bit
/// FNV-1a hash of every record's key. The same records give the same key on every retry; a
/// retry of only some of them (per-record outcomes) gives another.
pub(crate) fn request_key(records: &[&Record]) -> Option<String> {
    match records {
        [] => None,
        [one] => Some(key_text(one)),
        [first, .., last] => {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for r in records {
                for b in key_text(r).bytes().chain(std::iter::once(b',')) {
                    hash ^= u64::from(b);
                    hash = hash.wrapping_mul(0x0100_0000_01b3);
                }
            }
            Some(format!(
                "{}..{}/{}-{hash:016x}",
                key_text(first),
                key_text(last),
                records.len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::{PartitionId, Position};

    fn rec(i: u128, payload: &str) -> Record {
        Record::new(
            PartitionId::new("orders/3"),
            Position::new(i),
            Bytes::from(payload.to_string()),
        )
    }

    #[test]
    fn the_template_fills_record_fields_percent_encoded() {
        let t = UrlTemplate::parse(
            "http://127.0.0.1:8080/v1/{partition}/{key}?at={position}&t={header.tenant}",
        )
        .unwrap();
        assert_eq!(t.fixed(), None);
        let mut r = rec(42, "{}").with_key(Bytes::from_static(b"card 7/x"));
        r.headers.push("tenant", Bytes::from_static(b"eu"));
        assert_eq!(
            t.render(&r),
            "http://127.0.0.1:8080/v1/orders%2F3/card%207%2Fx?at=42&t=eu"
        );
        let fixed = UrlTemplate::parse("https://scoring.internal/v1/score").unwrap();
        assert_eq!(fixed.fixed(), Some("https://scoring.internal/v1/score"));
        for bad in [
            "http://x/{nope}",
            "http://x/{key",
            "ftp://x/",
            "http://x/{header.}",
        ] {
            let e = UrlTemplate::parse(bad).unwrap_err().to_string();
            assert!(e.contains("sink.url"), "{bad}: {e}");
        }
    }

    #[test]
    fn batch_encodings_need_json_and_keep_it_on_one_line() {
        let ok = rec(0, r#"{"a":1}"#);
        let pretty = rec(1, "{\n  \"b\": [1, 2]\n}");
        let bad = rec(2, "not json");
        assert_eq!(payload(Encoding::Ndjson, &ok).unwrap(), None);
        assert_eq!(
            payload(Encoding::Ndjson, &pretty).unwrap().as_deref(),
            Some(&br#"{"b":[1,2]}"#[..])
        );
        let e = payload(Encoding::JsonArray, &bad).unwrap_err();
        assert_eq!(e.kind(), flowgate_core::ErrorKind::Poison);
        assert_eq!(payload(Encoding::Single, &bad).unwrap(), None);

        let (a, b): (&[u8], &[u8]) = (b"{\"a\":1}", b"2");
        assert_eq!(
            &body(Encoding::Ndjson, [a, b].into_iter())[..],
            b"{\"a\":1}\n2\n"
        );
        assert_eq!(
            &body(Encoding::JsonArray, [a, b].into_iter())[..],
            b"[{\"a\":1},2]"
        );
        assert_eq!(&body(Encoding::JsonArray, std::iter::empty())[..], b"[]");
        assert_eq!(&body(Encoding::Single, [a].into_iter())[..], b"{\"a\":1}");
    }

    #[test]
    fn keys_are_readable_header_values() {
        let plain = rec(5, "{}").with_idempotency_key(IdempotencyKey::new("order-17"));
        assert_eq!(key_text(&plain), "order-17");
        let positional = rec(5, "{}").with_idempotency_key(IdempotencyKey::from_position(
            &PartitionId::new("orders/3"),
            &Position::new(5),
        ));
        assert_eq!(key_text(&positional), "orders/3@5");
        assert_eq!(key_text(&rec(6, "{}")), "orders/3@6");
        let binary = rec(7, "{}").with_idempotency_key(IdempotencyKey::new(vec![0u8, 255]));
        assert_eq!(key_text(&binary), "x00ff");
        let (a, b, c) = (rec(1, "{}"), rec(2, "{}"), rec(3, "{}"));
        let all = request_key(&[&a, &b, &c]).unwrap();
        assert!(all.starts_with("orders/3@1..orders/3@3/3-"), "{all}");
        assert_eq!(
            request_key(&[&a, &b, &c]).unwrap(),
            all,
            "stable across retries"
        );
        let subset = request_key(&[&a, &c]).unwrap();
        assert!(subset.starts_with("orders/3@1..orders/3@3/2-"), "{subset}");
        assert_ne!(
            subset, all,
            "a retry of some of the records is another request"
        );
        assert_eq!(request_key(&[&b]).as_deref(), Some("orders/3@2"));
    }
}
