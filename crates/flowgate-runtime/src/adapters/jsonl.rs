use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use flowgate_core::{
    Error, IdempotencyKey, PartitionId, Position, Record, Sink, SinkCapabilities, WriteError,
};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// Settings of the [`JsonLinesSink`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonLinesConfig {
    /// File to append to (created if missing).
    pub path: PathBuf,
    /// `fdatasync` after every batch, so confirmed records survive a machine crash, not only a
    /// process crash. Default false.
    #[serde(default)]
    pub fsync: bool,
}

/// Appends one JSON object per record to a file:
/// `{"partition","position","key","payload","idempotency_key","headers"}`. Text that is not
/// UTF-8 is written as hex under `key_hex` / `payload_hex`. A batch is confirmed once it was
/// written to the file (and synced, with `fsync`).
pub struct JsonLinesSink {
    cfg: JsonLinesConfig,
    /// Written from blocking tasks, one per batch.
    file: Arc<Mutex<std::fs::File>>,
}

/// A line as read back ([`JsonLinesSink::read`]); `encode` writes the same fields in place.
#[derive(Deserialize)]
struct Line<'a> {
    partition: Cow<'a, str>,
    position: Cow<'a, str>,
    #[serde(default)]
    key: Option<Cow<'a, str>>,
    #[serde(default)]
    key_hex: Option<String>,
    #[serde(default)]
    payload: Option<Cow<'a, str>>,
    #[serde(default)]
    payload_hex: Option<String>,
    #[serde(default)]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

impl JsonLinesSink {
    /// Opens (creating) the file for appending.
    pub async fn open(cfg: JsonLinesConfig) -> Result<Self, Error> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| io_err("cannot create the directory of", &cfg.path, e))?;
        }
        let path = cfg.path.clone();
        let file = tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_err("cannot open", &path, e))?;
            repair_torn_tail(&path)?;
            Ok::<_, Error>(file)
        })
        .await
        .map_err(|e| Error::fatal("JSON-lines open task failed").with_source(e))??;
        Ok(JsonLinesSink {
            cfg,
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Reads a file written by this sink. A torn last line (the process died mid-write) is
    /// ignored; any other unreadable line is an error naming the line.
    pub fn read(path: &Path) -> Result<Vec<Record>, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err("cannot read", path, e))?;
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            let parsed: Result<Line<'_>, _> = serde_json::from_str(line);
            let l = match parsed {
                Ok(l) => l,
                Err(_) if i + 1 == lines.len() && !complete => break,
                Err(e) => {
                    return Err(Error::new(
                        flowgate_core::ErrorKind::Corrupt,
                        "unreadable JSON line",
                    )
                    .with_context("path", path.display())
                    .with_context("line", i + 1)
                    .with_source(e));
                }
            };
            let position = Position::parse_decimal(&l.position).map_err(|e| {
                Error::new(flowgate_core::ErrorKind::Corrupt, "bad position")
                    .with_context("line", i + 1)
                    .with_source(e)
            })?;
            let payload = match (l.payload, l.payload_hex) {
                (Some(p), _) => Bytes::from(p.into_owned()),
                (None, Some(h)) => Bytes::from(unhex(&h).unwrap_or_default()),
                _ => Bytes::new(),
            };
            let mut r = Record::new(PartitionId::new(&*l.partition), position, payload);
            r.key = match (l.key, l.key_hex) {
                (Some(k), _) => Some(Bytes::from(k.into_owned())),
                (None, Some(h)) => unhex(&h).map(Bytes::from),
                _ => None,
            };
            r.idempotency_key = l
                .idempotency_key
                .map(|k| IdempotencyKey::new(k.into_owned()));
            for (k, v) in l.headers {
                r.headers.push(k, v);
            }
            out.push(r);
        }
        Ok(out)
    }

    /// The batch as JSON lines. Fields are written in place (strings escaped by serde_json)
    /// rather than through a [`Line`] per record: no allocation per record unless a key or
    /// payload is not UTF-8 or the record has headers.
    fn encode(batch: &[Record]) -> Result<Vec<u8>, Error> {
        use std::io::Write;
        let mut buf = Vec::with_capacity(batch.len() * 160);
        for r in batch {
            buf.extend_from_slice(b"{\"partition\":");
            json_str(&mut buf, r.partition.as_str())?;
            // Positions are decimal digits: no escaping needed.
            buf.extend_from_slice(b",\"position\":\"");
            let _ = write!(buf, "{}", r.position);
            buf.push(b'"');
            if let Some(k) = r.key.as_deref() {
                text_or_hex_field(&mut buf, "key", k)?;
            }
            text_or_hex_field(&mut buf, "payload", &r.payload)?;
            if let Some(k) = &r.idempotency_key {
                buf.extend_from_slice(b",\"idempotency_key\":");
                json_str(&mut buf, &String::from_utf8_lossy(k.as_bytes()))?;
            }
            if !r.headers.is_empty() {
                // By name, the last value of a repeated name (as a map reads them back).
                let headers: BTreeMap<&str, Cow<'_, str>> = r
                    .headers
                    .iter()
                    .map(|h| (&*h.name, String::from_utf8_lossy(&h.value)))
                    .collect();
                buf.extend_from_slice(b",\"headers\":");
                serde_json::to_writer(&mut buf, &headers).map_err(unencodable)?;
            }
            buf.extend_from_slice(b"}\n");
        }
        Ok(buf)
    }
}

fn unencodable(e: serde_json::Error) -> Error {
    Error::poison("record cannot be encoded as JSON").with_source(e)
}

/// `s` as a JSON string.
fn json_str(buf: &mut Vec<u8>, s: &str) -> Result<(), Error> {
    serde_json::to_writer(&mut *buf, s).map_err(unencodable)
}

/// `,"name":"text"` for UTF-8 bytes, else `,"name_hex":"…"`.
fn text_or_hex_field(buf: &mut Vec<u8>, name: &str, b: &[u8]) -> Result<(), Error> {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(name.as_bytes());
    match std::str::from_utf8(b) {
        Ok(text) => {
            buf.extend_from_slice(b"\":");
            json_str(buf, text)
        }
        Err(_) => {
            buf.extend_from_slice(b"_hex\":\"");
            buf.extend_from_slice(hex(b).as_bytes());
            buf.push(b'"');
            Ok(())
        }
    }
}

/// A process killed in the middle of a write leaves a torn last line. Those records were
/// never confirmed (the runtime will deliver them again), so the fragment is cut off before
/// appending; otherwise the next line would be glued to it.
fn repair_torn_tail(path: &Path) -> Result<(), Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err("cannot open", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| io_err("cannot stat", path, e))?
        .len();
    if len == 0 {
        return Ok(());
    }
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))
            .map_err(|e| io_err("cannot read", path, e))?;
        f.read_exact(&mut buf[..n])
            .map_err(|e| io_err("cannot read", path, e))?;
        if end == len && buf[n - 1] == b'\n' {
            return Ok(());
        }
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            tracing::warn!(path = %path.display(), dropped_bytes = len - keep, "cut a torn last line (a previous run died mid-write; those records were not confirmed)");
            return f
                .set_len(keep)
                .map_err(|e| io_err("cannot truncate", path, e));
        }
        if start == 0 {
            tracing::warn!(path = %path.display(), dropped_bytes = len, "the file holds only a torn line; cut it");
            return f.set_len(0).map_err(|e| io_err("cannot truncate", path, e));
        }
        end = start;
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound => {
            flowgate_core::ErrorKind::Config
        }
        _ => flowgate_core::ErrorKind::Transient,
    };
    Error::new(kind, format!("{what} the JSON-lines file"))
        .with_context("path", path.display())
        .with_source(e)
}

#[async_trait]
impl Sink for JsonLinesSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic().with_forwards_idempotency_key(true)
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        if batch.is_empty() {
            return Ok(());
        }
        let buf = Self::encode(batch)?;
        let fsync = self.cfg.fsync;
        self.on_file(move |f, path| {
            use std::io::Write;
            f.write_all(&buf)
                .map_err(|e| io_err("cannot write", path, e))?;
            if fsync {
                f.sync_data().map_err(|e| io_err("cannot sync", path, e))?;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), Error> {
        self.on_file(|f, path| f.sync_data().map_err(|e| io_err("cannot sync", path, e)))
            .await
    }
}

impl JsonLinesSink {
    /// Runs `op` on the file in a blocking task (one per call: a write and its sync together).
    async fn on_file(
        &self,
        op: impl FnOnce(&mut std::fs::File, &Path) -> Result<(), Error> + Send + 'static,
    ) -> Result<(), Error> {
        let file = Arc::clone(&self.file);
        let path = self.cfg.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = file.lock().map_err(|_| {
                Error::fatal("a JSON-lines write panicked").with_context("path", path.display())
            })?;
            op(&mut f, &path)
        })
        .await
        .map_err(|e| Error::fatal("JSON-lines write task failed").with_source(e))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_written_as_json_and_reads_back() {
        let mut r = Record::new(
            PartitionId::new("orders-\"3\""),
            Position::new(u128::from(u64::MAX) + 7),
            Bytes::from_static(b"\xff\x00payload"),
        );
        r.key = Some(Bytes::from_static(b"k\n\x01\\"));
        r.idempotency_key = Some(IdempotencyKey::new("id-1".to_string()));
        r.headers.push("b", "two");
        r.headers.push("a", "\"one\"");
        r.headers.push("b", "three");
        let plain = Record::new(PartitionId::new("p"), Position::from(0u64), "");
        let buf = JsonLinesSink::encode(&[r.clone(), plain.clone()]).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"partition":"orders-\"3\"","position":"18446744073709551622","key":"k\n\u0001\\","payload_hex":"ff007061796c6f6164","idempotency_key":"id-1","headers":{"a":"\"one\"","b":"three"}}"#
        );
        assert_eq!(
            text.lines().nth(1).unwrap(),
            r#"{"partition":"p","position":"0","payload":""}"#
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, &buf).unwrap();
        let back = JsonLinesSink::read(&path).unwrap();
        assert_eq!(back[0].partition, r.partition);
        assert_eq!(back[0].position, r.position);
        assert_eq!(back[0].key, r.key);
        assert_eq!(back[0].payload, r.payload);
        assert_eq!(back[0].idempotency_key, r.idempotency_key);
        assert_eq!(back[1], plain);
    }

    #[tokio::test]
    async fn a_torn_tail_from_a_crash_is_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let first = JsonLinesSink::encode(&[Record::new(
            PartitionId::new("p"),
            Position::from(1u64),
            "one",
        )])
        .unwrap();
        let mut content = first.clone();
        content.extend_from_slice(br#"{"partition":"p","posit"#);
        std::fs::write(&path, &content).unwrap();
        let sink = JsonLinesSink::open(JsonLinesConfig {
            path: path.clone(),
            fsync: false,
        })
        .await
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first, "the fragment is cut");
        sink.write(&[Record::new(
            PartitionId::new("p"),
            Position::from(2u64),
            "two",
        )])
        .await
        .unwrap();
        let back = JsonLinesSink::read(&path).unwrap();
        assert_eq!(
            back.iter()
                .map(|r| r.position.as_u64().unwrap())
                .collect::<Vec<_>>(),
            vec![1, 2]
        );

        // A file holding only a fragment is emptied.
        std::fs::write(&path, b"{\"partial").unwrap();
        drop(
            JsonLinesSink::open(JsonLinesConfig {
                path: path.clone(),
                fsync: false,
            })
            .await
            .unwrap(),
        );
        assert!(std::fs::read(&path).unwrap().is_empty());
    }
}
