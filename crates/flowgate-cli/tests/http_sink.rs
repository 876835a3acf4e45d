//! `type = "http"` from the command line: `flowgate validate` reaches the endpoint (or says
//! why not), and `flowgate run` delivers every generated record to it.
#![allow(clippy::unwrap_used)]

mod cli;
mod http;

use std::time::Duration;

fn config(dir: &std::path::Path, url: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("http.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"http-cli\"\n[source]\ntype = \"generator\"\npartitions = 2\nrecords_per_partition = 1000\n\
             [sink]\ntype = \"http\"\nurl = \"{url}\"\n{extra}[store]\ntype = \"memory\"\n\
             [observability]\ndisabled = true\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn validate_reaches_the_endpoint_or_names_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let up = http::Recorder::start(Duration::ZERO, 200);
    let (code, report) = cli::validate(&config(
        dir.path(),
        &format!("http://{}/ingest", up.addr),
        "",
    ));
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("✓ sink"), "{report}");
    assert!(
        up.seen().iter().any(|(p, _, _)| p == "HEAD /ingest"),
        "a HEAD was sent"
    );

    let (code, report) = cli::validate(&config(dir.path(), "http://127.0.0.1:1/ingest", ""));
    assert_eq!(code, 3, "unreachable: {report}");
    assert!(
        report.contains("✗ sink") && report.contains("127.0.0.1:1"),
        "{report}"
    );

    let refusing = http::Recorder::start(Duration::ZERO, 401);
    let (code, report) = cli::validate(&config(
        dir.path(),
        &format!("http://{}/ingest", refusing.addr),
        "auth = { type = \"bearer\", token = \"cli-s3cret\" }\n",
    ));
    assert_eq!(code, 4, "refused credentials: {report}");
    assert!(report.contains("sink.auth"), "{report}");
    assert!(!report.contains("cli-s3cret"), "{report}");

    let (code, report) = cli::validate(&config(dir.path(), "http://127.0.0.1/{nope}", ""));
    assert_eq!(code, 2, "a bad template: {report}");
    assert!(report.contains("sink.url"), "{report}");
}

#[test]
fn run_delivers_every_record_as_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = http::Recorder::start(Duration::ZERO, 200);
    let path = config(dir.path(), &format!("http://{}/ingest", endpoint.addr), "");
    let out = cli::flowgate(&["run", "-c", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = endpoint.seen();
    let lines: usize = seen
        .iter()
        .map(|(_, _, body)| {
            body.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count()
        })
        .sum();
    assert_eq!(lines, 2_000, "every record, one line each");
    for (path, key, body) in &seen {
        assert_eq!(path, "/ingest");
        // A batch's key names its first and last record, `gen-0@0..gen-0@499`.
        assert!(key.starts_with("gen-"), "{key}");
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            serde_json::from_slice::<serde_json::Value>(line).unwrap();
        }
    }
}
