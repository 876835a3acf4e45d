//! Reading a process or a file from outside, std only: a process's memory from
//! `/proc/PID/status`, a file's size and lines.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

/// A size `field` of `/proc/PID/status` (`VmRSS`, `VmHWM`, …) in MiB; 0 once the process
/// is gone.
pub(crate) fn proc_status_mib(pid: u32, field: &str) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A file's size in bytes; 0 if it does not exist.
pub(crate) fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// Lines in a file, by `wc -l` (fast on hundreds of megabytes, unlike a debug build's loop).
pub(crate) fn line_count(path: &Path) -> Result<u64, String> {
    if !path.exists() {
        return Ok(0);
    }
    let out = Command::new("wc")
        .arg("-l")
        .arg(path)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run wc -l {}: {e}", path.display()))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("wc -l {}: unexpected output", path.display()))
}
