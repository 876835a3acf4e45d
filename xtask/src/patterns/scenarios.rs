//! The four patterns: how each is set up, what is drawn, and the one-line result.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::plot::{Panel, Series};
use super::probe::{self, Recorder, Sample, Target};
use super::{Bench, fmt_int};
use crate::rig::{Broker, Engine};

const PORT: u16 = 19_581;
const SECOND_PORT: u16 = 19_582;

impl Bench {
    /// Runs `config` for `length`, sampled every `every`; then stops it with SIGTERM.
    fn record(
        &self,
        name: &str,
        config: &str,
        length: Duration,
        every: Duration,
    ) -> Result<Vec<Sample>, String> {
        let mut child = self.start(name, config, PORT)?;
        let rec = Recorder::start(
            vec![Target {
                port: PORT,
                pid: Some(child.id()),
            }],
            every,
        );
        std::thread::sleep(length);
        let series = rec.finish().pop().unwrap_or_default();
        crate::chaos::stop_gracefully(&mut child);
        Ok(series)
    }

    /// A fresh topic of `partitions` on the rig's Kafka.
    fn topic(&self, name: &str, partitions: u32) -> Result<String, String> {
        self.rig.up(&[Broker::Kafka], Engine::Native)?;
        let topic = format!("{name}-{}", std::process::id());
        crate::run(
            &format!("create topic {topic}"),
            &mut self.rig.kafka_topics(&[
                "--create",
                "--topic",
                &topic,
                "--partitions",
                &partitions.to_string(),
                "--replication-factor",
                "1",
            ]),
        )?;
        Ok(topic)
    }

    fn drop_topic(&self, topic: &str) {
        let _ = self
            .rig
            .kafka_topics(&["--delete", "--topic", topic])
            .stdout(Stdio::null())
            .status();
    }

    /// Kafka's producer-perf-test writing 100-byte records to `topic` at `rate` for `length`.
    fn producer(&self, topic: &str, rate: u64, length: Duration) -> Result<Child, String> {
        let records = (rate as f64 * length.as_secs_f64()) as u64;
        let log = std::fs::File::create(self.report.join(format!("{topic}.producer.log")))
            .map_err(|e| e.to_string())?;
        self.rig
            .kafka_java(&self.rig.state_dir(Broker::Kafka))
            .args([
                "org.apache.kafka.tools.ProducerPerformance",
                "--topic",
                topic,
                "--num-records",
                &records.to_string(),
                "--record-size",
                "100",
                "--throughput",
                &rate.to_string(),
                "--producer-props",
                "bootstrap.servers=127.0.0.1:9092",
                "linger.ms=5",
            ])
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start Kafka's producer-perf-test: {e}"))
    }
}

fn kafka_source(topic: &str, extra: &str) -> String {
    format!(
        "[source]\ntype = \"kafka\"\nbootstrap_servers = \"127.0.0.1:9092\"\ntopics = [\"{topic}\"]\n{extra}\n"
    )
}

fn series(label: &str, points: Vec<(f64, f64)>) -> Series {
    Series {
        label: label.into(),
        points,
    }
}

fn panel(title: &str, y_label: &str, series: Vec<Series>) -> Panel {
    Panel {
        title: title.into(),
        y_label: y_label.into(),
        series,
    }
}

/// A 2× producer spike for 60 s into a sink with 1.5× the base rate: `block` against
/// `shed_oldest`.
pub(super) fn spike(b: &Bench) -> Result<Vec<String>, String> {
    let (at, len, total) = (b.secs(10.0), b.secs(60.0), b.secs(210.0));
    let (mut lag, mut out, mut shed, mut rows) = (vec![], vec![], vec![], vec![]);
    for policy in ["block", "shed_oldest"] {
        let config = format!(
            "name = \"spike-{policy}\"\n\n[source]\ntype = \"generator\"\npartitions = 4\n\
             rate = 20000\nspikes = [{{ at = \"{}ms\", duration = \"{}ms\", factor = 2.0 }}]\n\n\
             [sink]\ntype = \"null\"\nfaults = {{ capacity_per_sec = 30000 }}\n\n\
             [store]\ntype = \"memory\"\n\n[runtime]\noverflow = \"{policy}\"\n",
            at.as_millis(),
            len.as_millis()
        );
        let s = b.record(
            &format!("spike-{policy}"),
            &config,
            total,
            Duration::from_millis(250),
        )?;
        let peak = s.iter().map(|x| x.lag).fold(0.0, f64::max);
        let end = (at + len).as_secs_f64();
        let before = s
            .iter()
            .filter(|x| x.t < at.as_secs_f64())
            .map(|x| x.lag)
            .fold(0.0, f64::max);
        let recovered = s
            .iter()
            .find(|x| x.t > end && x.lag <= (2.0 * before).max(1_000.0))
            .map_or("not within the run".into(), |x| {
                format!(
                    "back to its level before the spike {:.0} s after it ended",
                    x.t - end
                )
            });
        let label = format!("overflow = {policy}");
        rows.push(format!(
            "| lag spike | {label} | peak lag {} records; {recovered}; {} records shed |",
            fmt_int(peak),
            fmt_int(s.last().map_or(0.0, |x| x.shed))
        ));
        lag.push(series(&label, probe::points(&s, |x| x.lag)));
        out.push(series(&label, probe::rate(&s, |x| x.out)));
        shed.push(series(&label, probe::points(&s, |x| x.shed)));
    }
    b.publish(
        "lag-spike",
        "Lag spike: 20,000 records/s, 2x for 60 s from 10 s, into a sink taking 30,000/s",
        &[
            panel("lag", "records", lag),
            panel("records written per second", "records/s", out),
            panel("records shed (total)", "records", shed),
        ],
    )?;
    Ok(rows)
}

/// Kafka at 5,000 records/s into a sink taking 500/s, for minutes.
pub(super) fn slow_sink(b: &Bench) -> Result<Vec<String>, String> {
    let length = b.secs(180.0);
    let topic = b.topic("patterns-slow-sink", 4)?;
    let mut producer = b.producer(&topic, 5_000, length)?;
    let config = format!(
        "name = \"{topic}\"\n\n{}\n[sink]\ntype = \"null\"\nfaults = {{ capacity_per_sec = 500 }}\n\n\
         [store]\ntype = \"none\"\n",
        kafka_source(&topic, "")
    );
    let s = b.record("slow-sink", &config, length, Duration::from_millis(500));
    let _ = producer.kill();
    let _ = producer.wait();
    b.drop_topic(&topic);
    let s = s?;
    let settled: Vec<&Sample> = s
        .iter()
        .filter(|x| x.t > length.as_secs_f64() / 3.0)
        .collect();
    let rss = |f: fn(f64, f64) -> f64, init| settled.iter().map(|x| x.rss_mib).fold(init, f);
    // The first assignment counts as one.
    let rebalances = (s.last().map_or(0.0, |x| x.rebalances) - 1.0).max(0.0);
    let label = "flowgate";
    b.publish(
        "slow-sink",
        "Slow sink: Kafka at 5,000 records/s, a sink taking 500/s",
        &[
            panel(
                "lag",
                "records",
                vec![series(label, probe::points(&s, |x| x.lag))],
            ),
            panel(
                "resident memory",
                "MiB",
                vec![series(label, probe::points(&s, |x| x.rss_mib))],
            ),
            panel(
                "rebalances (total)",
                "rebalances",
                vec![series(label, probe::points(&s, |x| x.rebalances))],
            ),
        ],
    )?;
    Ok(vec![format!(
        "| slow sink | Kafka, 5,000/s in, 500/s out, {:.0} s | lag {} records at the end; RSS {:.0}–{:.0} MiB after the first third; {rebalances:.0} rebalances after the first assignment |",
        length.as_secs_f64(),
        fmt_int(s.last().map_or(0.0, |x| x.lag)),
        rss(f64::min, f64::MAX),
        rss(f64::max, 0.0),
    )])
}

/// A sink throttling above 10,000 records/s, fed 20,000/s: adaptive against fixed
/// concurrency.
pub(super) fn throttle(b: &Bench) -> Result<Vec<String>, String> {
    let length = b.secs(90.0);
    let (mut out, mut throttles, mut conc, mut rows) = (vec![], vec![], vec![], vec![]);
    for (label, name, concurrency) in [
        (
            "adaptive (AIMD)",
            "throttle-adaptive",
            "mode = \"adaptive\"",
        ),
        (
            "fixed at 16",
            "throttle-fixed",
            "mode = \"fixed\"\ninitial = 16",
        ),
    ] {
        let config = format!(
            "name = \"{name}\"\n\n[source]\ntype = \"generator\"\npartitions = 8\nrate = 20000\n\n\
             [sink]\ntype = \"null\"\nfaults = {{ latency = \"20ms\", throttle_above_per_sec = 10000 }}\n\n\
             [store]\ntype = \"memory\"\n\n[runtime.concurrency]\n{concurrency}\n"
        );
        let s = b.record(name, &config, length, Duration::from_millis(500))?;
        let written = probe::rate(&s, |x| x.out);
        let half = length.as_secs_f64() / 2.0;
        let late: Vec<f64> = written.iter().filter(|p| p.0 > half).map(|p| p.1).collect();
        let concs: Vec<f64> = s
            .iter()
            .filter(|x| x.t > half)
            .map(|x| x.concurrency)
            .collect();
        rows.push(format!(
            "| silent throttling | {label} | {} records/s written (median, second half); {} throttles in all; concurrency {} (median, second half) |",
            fmt_int(crate::median(&late)),
            fmt_int(s.last().map_or(0.0, |x| x.throttles)),
            crate::median(&concs)
        ));
        out.push(series(label, written));
        throttles.push(series(label, probe::rate(&s, |x| x.throttles)));
        conc.push(series(label, probe::points(&s, |x| x.concurrency)));
    }
    b.publish(
        "throttling",
        "Silent throttling: 20,000 records/s into a sink throttling above 10,000/s",
        &[
            panel("records written per second", "records/s", out),
            panel("throttled answers per second", "throttles/s", throttles),
            panel("sink concurrency (batches in flight)", "batches", conc),
        ],
    )?;
    Ok(rows)
}

/// A second member joining and leaving every 5 s under load, classic against KIP-848.
pub(super) fn storm(b: &Bench) -> Result<Vec<String>, String> {
    const RATE: f64 = 10_000.0;
    let length = b.secs(60.0);
    let (mut written, mut rows) = (vec![], vec![]);
    for (label, protocol) in [
        ("classic (cooperative-sticky)", "classic"),
        ("consumer (KIP-848)", "consumer"),
    ] {
        let topic = b.topic(&format!("patterns-storm-{protocol}"), 8)?;
        let mut producer = b.producer(&topic, RATE as u64, length + Duration::from_secs(5))?;
        let config = format!(
            "name = \"{topic}\"\n\n{}\n[sink]\ntype = \"null\"\n\n[store]\ntype = \"none\"\n",
            kafka_source(&topic, &format!("group_protocol = \"{protocol}\""))
        );
        let res = churn(b, protocol, &config, length);
        let _ = producer.kill();
        let _ = producer.wait();
        b.drop_topic(&topic);
        let (total, events) = res?;
        let pauses: Vec<f64> = events
            .iter()
            .map(|&e| longest_below(&total, e, e + 5.0, RATE / 2.0))
            .collect();
        rows.push(format!(
            "| rebalance storm | {label} | {} rebalances; pause per rebalance (fewer than half the produced records/s written) median {:.2} s, worst {:.2} s |",
            events.len(),
            crate::median(&pauses),
            pauses.iter().copied().fold(0.0, f64::max)
        ));
        written.push(series(label, total));
    }
    b.publish(
        "rebalance-storm",
        "Rebalance storm: 10,000 records/s, a second member joining and leaving every 5 s",
        &[panel(
            "records written per second (both members)",
            "records/s",
            written,
        )],
    )?;
    Ok(rows)
}

/// Records written per second by both members, and when the second joined or left.
type Churn = (Vec<(f64, f64)>, Vec<f64>);

/// One member throughout, a second started and stopped (SIGTERM) every 5 s: the records
/// written per second by both, in 250 ms bins, and when the second joined or left.
fn churn(b: &Bench, protocol: &str, config: &str, length: Duration) -> Result<Churn, String> {
    let steady_name = format!("storm-{protocol}-steady");
    let churn_name = format!("storm-{protocol}-churn");
    let mut steady = b.start(&steady_name, config, PORT)?;
    let rec = Recorder::start(
        vec![
            Target {
                port: PORT,
                pid: None,
            },
            Target {
                port: SECOND_PORT,
                pid: None,
            },
        ],
        Duration::from_millis(250),
    );
    let started = Instant::now();
    let mut events = Vec::new();
    let mut second: Option<Child> = None;
    std::thread::sleep(Duration::from_secs(5));
    while started.elapsed() + Duration::from_secs(5) < length {
        events.push(started.elapsed().as_secs_f64());
        match second.take() {
            Some(mut c) => crate::chaos::stop_gracefully(&mut c),
            None => second = Some(b.start(&churn_name, config, SECOND_PORT)?),
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    let series = rec.finish();
    if let Some(mut c) = second {
        crate::chaos::stop_gracefully(&mut c);
    }
    crate::chaos::stop_gracefully(&mut steady);
    let mut bins = std::collections::BTreeMap::<u64, f64>::new();
    for s in &series {
        for (t, r) in probe::rate(s, |x| x.out) {
            *bins.entry((t * 4.0).round() as u64).or_default() += r;
        }
    }
    let total = bins.into_iter().map(|(k, r)| (k as f64 / 4.0, r)).collect();
    Ok((total, events))
}

/// The longest stretch within `[from, to)` in which `rate` stays below `floor`, in seconds.
fn longest_below(rate: &[(f64, f64)], from: f64, to: f64, floor: f64) -> f64 {
    let (mut longest, mut since) = (0.0f64, None);
    for &(t, r) in rate.iter().filter(|p| p.0 >= from && p.0 < to) {
        match (r < floor, since) {
            (true, None) => since = Some(t - 0.25),
            (false, Some(s)) => {
                longest = longest.max(t - 0.25 - s);
                since = None;
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        longest = longest.max(to - s);
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::longest_below;

    #[test]
    fn the_longest_stretch_below_the_floor() {
        let rate: Vec<(f64, f64)> = [10.0, 0.0, 0.0, 10.0, 0.0, 10.0]
            .iter()
            .enumerate()
            .map(|(i, r)| (i as f64 * 0.25 + 0.25, *r))
            .collect();
        assert_eq!(longest_below(&rate, 0.0, 2.0, 5.0), 0.5);
    }
}
