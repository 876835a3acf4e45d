//! Measuring a contender from outside: its output file's growth, its CPU time and its peak RSS,
//! from `/proc` (std only).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::measure::{file_len, line_count, proc_status_mib};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One run of one contender.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Sample {
    /// Records/s from the process's start to the last record written.
    pub(super) rate: f64,
    /// Records/s from the first record written to the last (start-up excluded).
    pub(super) steady: f64,
    /// CPU seconds (user + system) per million records.
    pub(super) cpu_per_m: f64,
    /// Peak resident memory (VmHWM), MiB.
    pub(super) rss_mib: f64,
    /// Records in the output (or reported by the tool).
    pub(super) records: u64,
}

/// The kernel's clock ticks per second for `/proc` times (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + system) of this process's reaped children (`cutime` + `cstime`): the
/// difference across a child's `wait` is that child's CPU time.
pub(super) fn children_cpu() -> Result<f64, String> {
    let stat = fs::read_to_string("/proc/self/stat")
        .map_err(|e| format!("cannot read /proc/self/stat (Linux only): {e}"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); cutime and cstime are fields 16 and 17.
    let tick = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    match (tick(16), tick(17)) {
        (Some(u), Some(s)) => Ok((u + s) / TICKS),
        _ => Err(format!("unexpected /proc/self/stat: {stat}")),
    }
}

/// A process's peak resident set (VmHWM), MiB; 0 once it has exited.
pub(super) fn peak_rss_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmHWM")
}

/// A contender that writes every record it reads to `out`, one line per record.
pub(super) struct Writer<'a> {
    pub(super) name: &'a str,
    pub(super) out: &'a Path,
    pub(super) records: u64,
    pub(super) timeout: Duration,
}

/// Starts `cmd` and watches `out` grow (its size, every 5 ms: reading it meanwhile would take
/// CPU from the contender). Once it has not grown for 2 s its lines are counted; at `records`
/// the process's peak RSS is read and it is SIGKILLed. The last record's time is when the size
/// last changed; the first record's, when it first grew.
pub(super) fn measure_writer(w: &Writer<'_>, cmd: &mut Command) -> Result<Sample, String> {
    let cpu0 = children_cpu()?;
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: cannot start {:?}: {e}", w.name, cmd.get_program()))?;
    let pid = child.id();
    let (mut first, mut last, mut size, mut rss) = (None, started, 0, 0.0f64);
    let mut size_at_first = 0;
    let mut next_rss = Instant::now();
    let res = loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = Instant::now();
        let len = file_len(w.out);
        if len != size {
            size = len;
            last = now;
            if first.is_none() {
                first = Some(now);
                size_at_first = len;
            }
        }
        if now >= next_rss {
            rss = rss.max(peak_rss_mib(pid));
            next_rss = now + Duration::from_millis(100);
        }
        if size > 0 && now - last > Duration::from_secs(2) {
            let n = line_count(w.out)?;
            if n >= w.records {
                break Ok(n);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("{}: exited early ({status})", w.name));
        }
        if started.elapsed() > w.timeout {
            break Err(format!(
                "{}: {} of {} records after {:?}",
                w.name,
                line_count(w.out)?,
                w.records,
                w.timeout
            ));
        }
    };
    rss = rss.max(peak_rss_mib(pid));
    kill(&mut child);
    let cpu = children_cpu()? - cpu0;
    let n = res?;
    let first = first.unwrap_or(started);
    // The first poll that saw output already holds some records: the steady rate counts the
    // records written after it, by the share of the file written by then.
    let after_first = n as f64 * (1.0 - size_at_first as f64 / size.max(1) as f64);
    Ok(Sample {
        rate: n as f64 / (last - started).as_secs_f64(),
        steady: after_first / (last - first).as_secs_f64().max(1e-3),
        cpu_per_m: cpu * 1e6 / n as f64,
        rss_mib: rss,
        records: n,
    })
}

/// Runs `cmd` to its end, sampling its peak RSS every 50 ms; its standard output, its CPU
/// seconds and peak RSS (MiB), and when it was started.
pub(super) fn run_tool(cmd: &mut Command, what: &str) -> Result<(String, f64, f64), String> {
    let cpu0 = children_cpu()?;
    let out_path = std::env::temp_dir().join(format!("flowgate-peers-{}.out", std::process::id()));
    let out = fs::File::create(&out_path)
        .map_err(|e| format!("cannot create {}: {e}", out_path.display()))?;
    let mut child = cmd
        .stdout(out)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let pid = child.id();
    let mut rss = 0.0f64;
    let status = loop {
        rss = rss.max(peak_rss_mib(pid));
        if let Some(status) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let cpu = children_cpu()? - cpu0;
    let text = read_to_string(&out_path)?;
    let _ = fs::remove_file(&out_path);
    if !status.success() {
        return Err(format!("{what} failed ({status}); its output:\n{text}"));
    }
    Ok((text, cpu, rss))
}

pub(super) fn read_to_string(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub(super) fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads the lines appended to a file since the last call (for the kill test's ledger).
pub(super) struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    pub(super) fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The record numbers of the complete lines appended since the last call: a JSON-lines
    /// record's `"payload":"N"`, or a line that is the number itself.
    pub(super) fn new_values(&mut self) -> Vec<u64> {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return Vec::new();
        };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .filter_map(record_number)
            .collect()
    }
}

fn record_number(line: &str) -> Option<u64> {
    match line.find("\"payload\":\"") {
        Some(i) => {
            let rest = &line[i + 11..];
            rest[..rest.find('"')?].parse().ok()
        }
        None => line.trim().parse().ok(),
    }
}
