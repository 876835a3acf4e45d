//! Helpers of the rig smoke tests and of every crate's broker tests: the endpoints
//! `cargo xtask brokers up` prints, unique names, and stopping/starting one broker.
//!
//! Every helper fails loudly when its variable is missing: a broker test that runs must have
//! its broker, never skip.

/// The value of a `FLOWGATE_TEST_*` variable, or a panic saying how to get it.
pub fn endpoint(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: start the brokers with `cargo xtask brokers up` and export what it \
             prints (or run everything with `cargo xtask test`)"
        )
    })
}

/// A name unique to this test run, for topics, queues and streams.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// `cargo xtask brokers <verb> --only <broker>` from the workspace root (`verb`: `up` or
/// `down`), for tests that take a broker away under a running pipeline. Panics if it fails.
pub fn rig(verb: &str, broker: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["xtask", "brokers", verb, "--only", broker])
        .current_dir(root)
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo xtask: {e}"));
    assert!(
        status.success(),
        "cargo xtask brokers {verb} --only {broker} failed"
    );
}

/// Stops `broker`, waits `down_for`, starts it again (blocking calls run off the async
/// threads); returns how long it was gone.
pub async fn bounce(broker: &'static str, down_for: std::time::Duration) -> std::time::Duration {
    let stopped = std::time::Instant::now();
    tokio::task::spawn_blocking(move || rig("down", broker))
        .await
        .unwrap_or_else(|e| panic!("stopping {broker}: {e}"));
    tokio::time::sleep(down_for).await;
    tokio::task::spawn_blocking(move || rig("up", broker))
        .await
        .unwrap_or_else(|e| panic!("starting {broker}: {e}"));
    stopped.elapsed()
}

/// Polls `done` every 50 ms until it holds; panics with `what` (and the elapsed time) after
/// `timeout`.
pub async fn wait_until(
    what: impl Fn() -> String,
    timeout: std::time::Duration,
    mut done: impl FnMut() -> bool,
) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}: {}",
            what()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Records the distinct successive values of `sample` (polled every 20 ms) until stopped:
/// how a pipeline's health went through a broker restart, say.
pub struct Transitions<T> {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<T>>,
}

/// Starts recording the transitions of `sample`.
pub fn transitions<T>(sample: impl Fn() -> T + Send + 'static) -> Transitions<T>
where
    T: PartialEq + Send + 'static,
{
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut seen: Vec<T> = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let v = sample();
            if seen.last() != Some(&v) {
                seen.push(v);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        seen
    });
    Transitions { stop, task }
}

impl<T> Transitions<T> {
    /// Stops recording; the values seen, in order, each change once.
    pub async fn stop(self) -> Vec<T> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

impl<T: PartialEq + std::fmt::Debug> Transitions<T> {
    /// Stops recording and asserts that `away` was seen and `back` is the last value: a
    /// broker restart read as disconnected, then healthy. `what` names it in the output.
    pub async fn assert_away_then_back(self, what: &str, away: T, back: T) {
        let seen = self.stop().await;
        eprintln!("{what}: health went {seen:?}");
        assert!(seen.contains(&away), "{what}: never {away:?}: {seen:?}");
        assert_eq!(seen.last(), Some(&back), "{what}: {seen:?}");
    }
}

/// A client certificate and key signed by a CA of their own (made with `openssl` in `dir`),
/// which no server of the rig trusts: for "a wrong client certificate is refused".
pub fn foreign_client_certificate(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=foreign CA",
        "-keyout",
        "fca.key",
        "-out",
        "fca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=flowgate",
        "-keyout",
        "foreign.key",
        "-out",
        "foreign.csr",
    ]);
    std::fs::write(dir.join("foreign.ext"), "extendedKeyUsage=clientAuth\n")
        .expect("write foreign.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "foreign.csr",
        "-CA",
        "fca.pem",
        "-CAkey",
        "fca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "foreign.ext",
        "-out",
        "foreign.pem",
    ]);
    (dir.join("foreign.pem"), dir.join("foreign.key"))
}
