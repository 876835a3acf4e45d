//! Plain HTTP/1.1 GETs against loopback endpoints (the pipeline's, Prometheus's), a
//! `flowgate run` whose endpoint address is read from its announcement, and a recording
//! endpoint for the HTTP sink.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `GET path` on `addr`: status code and body (chunked bodies are de-chunked).
pub(crate) fn get(addr: &str, path: &str) -> (u16, String) {
    get_with(addr, path, "")
}

/// `GET path` on `addr` with extra header lines (each ending in `\r\n`).
pub(crate) fn get_with(addr: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot reach {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a query parameter.
pub(crate) fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts `flowgate run -c config --metrics-addr metrics_addr` with `args` and returns the
/// child and the endpoint address it announced; its stderr keeps being drained.
pub(crate) fn run_with_endpoint(
    config: &Path,
    metrics_addr: &str,
    args: &[&str],
) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["run", "-c"])
        .arg(config)
        .args(["--metrics-addr", metrics_addr])
        .args(args)
        .env("FLOWGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = String::new();
    let mut line = String::new();
    while addr.is_empty() {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no endpoint announced"
        );
        if let Some(rest) = line.split("http://").nth(1) {
            addr = rest.split('/').next().unwrap().to_string();
        }
    }
    std::thread::spawn(move || for _ in stderr.lines() {});
    (child, addr)
}

/// What the recorder saw of one request: (path, `Idempotency-Key`, body).
pub(crate) type Request = (String, String, Vec<u8>);

/// A user's HTTP endpoint for the HTTP sink: HTTP/1.1 with keep-alive, one thread per
/// connection; answers every request with `status` after `delay` and records its method and
/// path, `Idempotency-Key` and body.
pub(crate) struct Recorder {
    pub(crate) addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
}

impl Recorder {
    pub(crate) fn start(delay: Duration, status: u16) -> Recorder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let log = log.clone();
                std::thread::spawn(move || serve_connection(conn, delay, status, &log));
            }
        });
        Recorder { addr, seen }
    }

    /// Every request so far: (path, idempotency key, body); `HEAD` requests as `HEAD path`.
    pub(crate) fn seen(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_connection(
    conn: TcpStream,
    delay: Duration,
    status: u16,
    log: &std::sync::Mutex<Vec<Request>>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut words = request_line.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let mut path = words.next().unwrap_or_default().to_string();
        if method == "HEAD" {
            path = format!("HEAD {path}");
        }
        let (mut length, mut key) = (0usize, String::new());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap(),
                    "idempotency-key" => key = value.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        std::thread::sleep(delay);
        log.lock().unwrap().push((path, key, body));
        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}
