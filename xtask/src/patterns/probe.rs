//! What a running `flowgate run` shows from outside, sampled over time: its `/metrics`
//! endpoint (what a Prometheus server would scrape) and its resident memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One scrape of one process.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Sample {
    /// Seconds from the start of the recording.
    pub t: f64,
    /// `flowgate_lag`, summed over partitions (records).
    pub lag: f64,
    /// `flowgate_records_out_total`.
    pub out: f64,
    /// `flowgate_throttles_total`.
    pub throttles: f64,
    /// `flowgate_sink_concurrency`.
    pub concurrency: f64,
    /// `flowgate_shed_total`.
    pub shed: f64,
    /// `flowgate_rebalances_total`.
    pub rebalances: f64,
    /// Resident set size (MiB), when the process is known.
    pub rss_mib: f64,
}

/// A process to sample: its metrics port, and its PID for the RSS.
#[derive(Clone, Copy)]
pub(super) struct Target {
    pub port: u16,
    pub pid: Option<u32>,
}

/// Samples each target every `every` until stopped; one series per target.
pub(super) struct Recorder {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Vec<Sample>>>,
}

impl Recorder {
    pub(super) fn start(targets: Vec<Target>, every: Duration) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut series = vec![Vec::new(); targets.len()];
            while !flag.load(Ordering::Relaxed) {
                let t = started.elapsed().as_secs_f64();
                for (target, s) in targets.iter().zip(series.iter_mut()) {
                    // A member between restarts answers nothing: no sample, not a zero.
                    if let Some(mut sample) = scrape(target.port) {
                        sample.t = t;
                        sample.rss_mib = target.pid.map_or(0.0, rss_mib);
                        s.push(sample);
                    }
                }
                std::thread::sleep(every.saturating_sub(Duration::from_millis(2)));
            }
            series
        });
        Recorder { stop, thread }
    }

    /// Stops sampling; the series, one per target.
    pub(super) fn finish(self) -> Vec<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// `GET /metrics` on 127.0.0.1:`port`, parsed.
pub(super) fn scrape(port: u16) -> Option<Sample> {
    match crate::rig::http("GET", port, "/metrics", &[], "") {
        Ok((200, body)) => Some(parse(&body)),
        _ => None,
    }
}

/// The metrics a recording keeps, each summed over its label sets.
fn parse(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name_labels.split('{').next().unwrap_or_default();
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let field = match name {
            "flowgate_lag" => &mut s.lag,
            "flowgate_records_out_total" => &mut s.out,
            "flowgate_throttles_total" => &mut s.throttles,
            "flowgate_sink_concurrency" => &mut s.concurrency,
            "flowgate_shed_total" => &mut s.shed,
            "flowgate_rebalances_total" => &mut s.rebalances,
            _ => continue,
        };
        *field += v;
    }
    s
}

/// Resident set size of `pid` in MiB (`VmRSS`), 0 once it is gone.
fn rss_mib(pid: u32) -> f64 {
    crate::measure::proc_status_mib(pid, "VmRSS")
}

/// Per-second rates of a counter between consecutive samples, at the later sample's time. A
/// counter that went down (the process restarted) counts from zero.
pub(super) fn rate(series: &[Sample], counter: fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    series
        .windows(2)
        .filter(|w| w[1].t > w[0].t)
        .map(|w| {
            let (a, b) = (counter(&w[0]), counter(&w[1]));
            let delta = if b >= a { b - a } else { b };
            (w[1].t, delta / (w[1].t - w[0].t))
        })
        .collect()
}

/// `(t, value)` points of one field.
pub(super) fn points(series: &[Sample], field: fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    series.iter().map(|s| (s.t, field(s))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_label_sets_and_skips_comments() {
        let s = parse(
            "# TYPE flowgate_lag gauge\n\
             flowgate_lag{pipeline=\"p\",partition=\"a\",unit=\"records\"} 10\n\
             flowgate_lag{pipeline=\"p\",partition=\"b\",unit=\"records\"} 5.5\n\
             flowgate_records_out_total{pipeline=\"p\"} 1200\n\
             flowgate_sink_concurrency{pipeline=\"p\"} 7\n",
        );
        assert_eq!(s.lag, 15.5);
        assert_eq!(s.out, 1200.0);
        assert_eq!(s.concurrency, 7.0);
        assert_eq!(s.shed, 0.0);
    }

    #[test]
    fn a_counter_reset_counts_from_zero() {
        let at = |t, out| Sample {
            t,
            out,
            ..Sample::default()
        };
        let r = rate(&[at(0.0, 100.0), at(1.0, 300.0), at(2.0, 50.0)], |s| s.out);
        assert_eq!(r, vec![(1.0, 200.0), (2.0, 50.0)]);
    }
}
