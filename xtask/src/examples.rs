//! The facade's runnable examples against the brokers: each one creates what it needs,
//! checks its own result and exits non-zero on failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The examples that run to completion on their own (`quickstart` and `bench_runtime` do not:
/// one runs until interrupted, the other is a benchmark).
const EXAMPLES: [&str; 7] = [
    "custom_sink",
    "custom_source",
    "dedup_key_extractor",
    "kafka_to_rabbitmq",
    "rabbitmq_to_kafka",
    "exactly_once_postgres",
    "kinesis_leases_postgres",
];

/// An example still running after this long is killed and fails (each one bounds its own
/// steps well below it).
const LIMIT: Duration = Duration::from_secs(300);

/// Lines of an example's output shown when it fails.
const TAIL_LINES: usize = 30;

/// Builds the examples once (`cargo build -p flowgate --examples --all-features`), then runs
/// each with `env` (the brokers' `FLOWGATE_TEST_*` variables), one after the other, printing
/// one line per example with its time. Fails at the first example that exits non-zero (or
/// outlives `LIMIT`), with its name and the tail of its stderr.
pub(crate) fn run_examples(env: &[(String, String)]) -> Result<(), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    crate::run(
        "cargo build -p flowgate --examples --all-features",
        crate::cargo()
            .args(["build", "-p", "flowgate", "--examples", "--all-features"])
            .current_dir(&root),
    )?;
    let dir = target_dir(&root).join("debug").join("examples");
    let started = Instant::now();
    eprintln!();
    for name in EXAMPLES {
        let bin = dir.join(name);
        let t = Instant::now();
        let ran = run_one(&bin, env, &root)?;
        let secs = t.elapsed().as_secs_f64();
        match ran.status {
            Some(status) if status.success() => {
                eprintln!("==> example {name}: ok in {secs:.1}s");
            }
            Some(status) => {
                eprintln!("==> example {name}: FAILED in {secs:.1}s");
                return Err(format!(
                    "example {name} failed ({status}); the end of its stderr:\n{}",
                    tail(&ran.stderr, &ran.stdout)
                ));
            }
            None => {
                eprintln!("==> example {name}: killed after {secs:.1}s");
                return Err(format!(
                    "example {name} did not finish within {LIMIT:?} and was killed; the end of its stderr:\n{}",
                    tail(&ran.stderr, &ran.stdout)
                ));
            }
        }
    }
    eprintln!(
        "==> {} examples passed in {:.1}s",
        EXAMPLES.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `CARGO_TARGET_DIR` (relative to the workspace root) if set, else `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// What one example did: its exit status (`None`: killed at `LIMIT`) and its output.
struct Ran {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Runs `bin` with `env` from `root`, collecting its output, and kills it (this child only)
/// if it outlives `LIMIT`.
fn run_one(bin: &Path, env: &[(String, String)], root: &Path) -> Result<Ran, String> {
    let mut child = Command::new(bin)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    // Read both pipes while the example runs, so a full pipe never blocks it.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for {}: {e}", bin.display())),
        }
    };
    let collect = |h: Option<std::thread::JoinHandle<String>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(Ran {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Reads a pipe to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The last `TAIL_LINES` lines of `stderr`, or of `stdout` when stderr is empty.
fn tail(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(TAIL_LINES);
    let shown = lines[from..].join("\n");
    if shown.is_empty() {
        "(no output)".to_string()
    } else {
        shown
    }
}
