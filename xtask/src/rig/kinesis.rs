//! kinesis-mock (npm `kinesis-local`), kept on loopback.

use super::*;

impl Rig {
    pub(super) fn start_kinesis(&self, dir: &Path) -> Res {
        need_command("node", &["nodejs"])?;
        let pkg_dir = self
            .cache
            .join(format!("kinesis-local-{KINESIS_LOCAL_VERSION}"));
        let main = pkg_dir.join("node_modules/kinesis-local/main.js");
        if !main.exists() {
            need_command("npm", &["npm"])?;
            eprintln!(
                "    kinesis   installing kinesis-local@{KINESIS_LOCAL_VERSION} into {}",
                pkg_dir.display()
            );
            fs::create_dir_all(&pkg_dir)
                .map_err(|e| format!("cannot create {}: {e}", pkg_dir.display()))?;
            run_quiet(
                Command::new("npm")
                    .args(["install", "--no-audit", "--no-fund", "--prefix"])
                    .arg(&pkg_dir)
                    .arg(format!("kinesis-local@{KINESIS_LOCAL_VERSION}")),
                "npm install kinesis-local",
            )?;
        }
        // kinesis-local hard-codes 0.0.0.0 as its bind host; keep it on loopback.
        let js = fs::read_to_string(&main)
            .map_err(|e| format!("cannot read {}: {e}", main.display()))?;
        const WILD: &str = r#"Host$().em("0.0.0.0")"#;
        const LOOP: &str = r#"Host$().em("127.0.0.1")"#;
        if js.contains(WILD) {
            write(&main, &js.replace(WILD, LOOP))?;
        } else if !js.contains(LOOP) {
            return Err(format!(
                "kinesis-local's bind-host pattern {WILD} was not found in {}: the package changed; \
                 the rig refuses to start it on 0.0.0.0",
                main.display()
            ));
        }
        let mut cmd = Command::new("node");
        cmd.arg(&main)
            .env(
                "KINESIS_MOCK_CERT_PATH",
                pkg_dir.join("node_modules/kinesis-local/server.json"),
            )
            .env("KINESIS_MOCK_PLAIN_PORT", KINESIS_PORT.to_string())
            .env("KINESIS_MOCK_TLS_PORT", KINESIS_TLS_PORT.to_string())
            .env("SHOULD_PERSIST_DATA", (!self.kinesis_in_memory).to_string())
            .env("PERSIST_PATH", dir.join("data"))
            .env("PERSIST_INTERVAL", "2s")
            .env("CREATE_STREAM_DURATION", "200ms")
            .env("DELETE_STREAM_DURATION", "200ms")
            .env("UPDATE_SHARD_COUNT_DURATION", "200ms")
            // Every test makes its own stream and the state persists across runs: the default
            // account limit (50 open shards) would be reached after a few runs.
            .env("SHARD_LIMIT", "100000")
            .env("AWS_REGION", "us-east-1")
            .env("LOG_LEVEL", "WARN");
        self.spawn(Broker::Kinesis, "pid", &mut cmd, &dir.join("stdout.log"))
    }
}

/// A ListStreams call over plain HTTP (kinesis-mock accepts any credentials).
pub(super) fn kinesis_list_streams() -> Res<String> {
    let (status, body) = http(
        "POST",
        KINESIS_PORT,
        "/",
        &[
            ("Content-Type", "application/x-amz-json-1.1"),
            ("X-Amz-Target", "Kinesis_20131202.ListStreams"),
            (
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=flowgate/20260101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=0",
            ),
            ("X-Amz-Date", "20260101T000000Z"),
        ],
        "{}",
    )?;
    match status {
        200 => Ok(body),
        other => Err(format!("ListStreams: HTTP {other}")),
    }
}
