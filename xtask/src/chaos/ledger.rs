//! The ledger at the end of a chaos run: every record the broker accepted received, the
//! duplicates of each cycle held to the dedup window, the broker's own tools showing
//! everything consumed; the report as Markdown and JSON.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use super::output::{Mark, Output, Placed};
use super::{Cycle, Fault, Options, Target, write};
use crate::rig::Rig;

/// What a run produced, for the ledger.
pub(super) struct Run<'a> {
    pub(super) stream: &'a str,
    pub(super) dir: &'a Path,
    pub(super) config: &'a Path,
    pub(super) output: &'a Output,
    pub(super) cycles: &'a [Cycle],
    /// Where the sink stood when the last run (to the end) started.
    pub(super) drain_from: Mark,
    pub(super) fed: u64,
    pub(super) drained: bool,
    pub(super) started: Instant,
}

/// The records written from one cycle's start to the next's (the last: the run to the end):
/// the replay after the previous cycle's SIGKILL, and whatever the cycle's own fault replays.
#[derive(Clone, Copy, Default)]
struct Segment {
    received: usize,
    duplicates: usize,
}

/// What the ledger found.
struct Tally {
    accepted: usize,
    received: usize,
    distinct: usize,
    lost: Vec<u64>,
    unexpected: usize,
    duplicates: usize,
    /// One per cycle, then the run to the end.
    segments: Vec<Segment>,
    consumed_to_end: bool,
    resume_median: f64,
    resume_worst: f64,
    never: usize,
    exits: u32,
}

/// The segment (cycle index; `starts.len() - 1` for the run to the end) a record placed at
/// `place` belongs to, by where each segment started.
fn segment_of(starts: &[u64], place: u64) -> usize {
    starts.partition_point(|s| *s < place).saturating_sub(1)
}

/// Duplicates per segment: a record received more often than the broker holds it (a producer
/// may have written a number twice) is a duplicate where it appears again.
fn segments(
    accepted: &HashMap<u64, u32>,
    marks: &[Mark],
    main: &[Placed],
    churn: &[Placed],
) -> Vec<Segment> {
    let mut by_segment: Vec<Vec<u64>> = vec![Vec::new(); marks.len()];
    for (records, starts) in [
        (main, marks.iter().map(|m| m.0).collect::<Vec<_>>()),
        (churn, marks.iter().map(|m| m.1).collect()),
    ] {
        for (place, n) in records {
            by_segment[segment_of(&starts, *place)].push(*n);
        }
    }
    let mut seen: HashMap<u64, u32> = HashMap::new();
    by_segment
        .iter()
        .map(|records| {
            let mut s = Segment {
                received: records.len(),
                duplicates: 0,
            };
            for n in records {
                let count = seen.entry(*n).or_default();
                if *count >= accepted.get(n).copied().unwrap_or(1) {
                    s.duplicates += 1;
                }
                *count += 1;
            }
            s
        })
        .collect()
}

/// Events in segment `i` of `cycles` that may replay what the sink already wrote: the SIGKILL
/// ending the cycle before, and the cycle's own fault.
fn events(cycles: &[Cycle], i: usize) -> u64 {
    u64::from(i > 0)
        + cycles
            .get(i)
            .map_or(0, |c| u64::from(c.fault != Fault::Kill))
}

fn tally(rig: &Rig, t: &dyn Target, run: &Run<'_>) -> Result<Tally, String> {
    let accepted = t.accepted(rig, run.stream, run.fed)?;
    let (main, churn) = run.output.records(rig)?;
    let mut held: HashMap<u64, u32> = HashMap::new();
    for v in &accepted {
        *held.entry(*v).or_default() += 1;
    }
    let got: HashSet<u64> = main.iter().chain(&churn).map(|(_, n)| *n).collect();
    let mut marks: Vec<Mark> = run.cycles.iter().map(|c| c.from).collect();
    marks.push(run.drain_from);
    let segments = segments(&held, &marks, &main, &churn);
    let mut lost: Vec<u64> = held.keys().filter(|v| !got.contains(v)).copied().collect();
    lost.sort_unstable();
    let mut resumes: Vec<f64> = run
        .cycles
        .iter()
        .filter_map(|c| c.resume.map(|d| d.as_secs_f64()))
        .collect();
    resumes.sort_by(f64::total_cmp);
    Ok(Tally {
        accepted: accepted.len(),
        received: main.len() + churn.len(),
        distinct: got.len(),
        lost,
        unexpected: got.iter().filter(|v| !held.contains_key(v)).count(),
        duplicates: segments.iter().map(|s| s.duplicates).sum(),
        segments,
        consumed_to_end: run.drained && t.consumed_to_end(rig, run.stream, run.config)?,
        resume_median: resumes.get(resumes.len() / 2).copied().unwrap_or(0.0),
        resume_worst: resumes.last().copied().unwrap_or(0.0),
        never: run.cycles.iter().filter(|c| c.resume.is_none()).count(),
        exits: run.cycles.iter().map(|c| c.restarts).sum(),
    })
}

/// A value of the report, written into its Markdown and its JSON alike.
enum Value {
    Count(u64),
    Ratio(f64),
    Seconds(f64),
    Yes(bool),
    Text(String),
}

impl Value {
    fn md(&self) -> String {
        match self {
            Value::Count(n) => n.to_string(),
            Value::Ratio(r) => format!("{r:.2}"),
            Value::Seconds(s) => format!("{s:.2} s"),
            Value::Yes(b) => if *b { "yes" } else { "**no**" }.to_string(),
            Value::Text(t) => t.clone(),
        }
    }

    fn json(&self) -> String {
        match self {
            Value::Count(n) => n.to_string(),
            Value::Ratio(r) => format!("{r:.2}"),
            Value::Seconds(s) => format!("{s:.3}"),
            Value::Yes(b) => b.to_string(),
            Value::Text(t) => format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")),
        }
    }
}

/// The command line that reproduces the run.
fn command(name: &str, o: &Options) -> String {
    let mut c = format!(
        "cargo xtask chaos {name} --cycles={} --rate={} --seed={} --store={}",
        o.cycles,
        o.rate,
        o.seed,
        o.store().name()
    );
    if o.table {
        c.push_str(" --sink=table");
    } else if o.dedup {
        c.push_str(" --dedup");
    }
    if o.mixed {
        c.push_str(" --mixed");
    }
    c
}

pub(super) fn ledger(rig: &Rig, t: &dyn Target, o: &Options, run: &Run<'_>) -> Result<(), String> {
    let x = tally(rig, t, run)?;
    let name = t.broker().name();
    let kills = run.cycles.len();
    let window = o
        .dedup
        .then_some(super::DEDUP_CONCURRENCY * super::DEDUP_BATCH);
    // Segments whose duplicates pass the dedup window (per event that replays), or any
    // duplicate into the table sink.
    let over: Vec<usize> = (0..x.segments.len())
        .filter(|i| match (o.table, window) {
            (true, _) => x.segments[*i].duplicates > 0,
            (false, Some(w)) => x.segments[*i].duplicates as u64 > w * events(run.cycles, *i),
            (false, None) => false,
        })
        .collect();
    let worst = x.segments.iter().map(|s| s.duplicates).max().unwrap_or(0);
    let dedup = match (o.table, window) {
        (true, _) => format!(
            "{}, with `dedup.key = \"{}\"`: no duplicate allowed",
            run.output.name(),
            t.dedup_key()
        ),
        (false, Some(w)) => format!(
            "`dedup.key = \"{}\"`, concurrency ≤ {}, batches ≤ {} records: at most {w} duplicates per SIGKILL or fault",
            t.dedup_key(),
            super::DEDUP_CONCURRENCY,
            super::DEDUP_BATCH
        ),
        (false, None) => "no dedup".to_string(),
    };
    let summary: Vec<(&str, &str, Value)> = vec![
        ("broker", "broker", Value::Text(name.to_string())),
        ("command", "command", Value::Text(command(name, o))),
        ("cycles", "cycles", Value::Count(kills as u64)),
        (
            "fed",
            "records the producer was given",
            Value::Count(run.fed),
        ),
        (
            "accepted",
            "records the broker accepted",
            Value::Count(x.accepted as u64),
        ),
        (
            "received",
            "records received",
            Value::Count(x.received as u64),
        ),
        (
            "distinct",
            "distinct records received",
            Value::Count(x.distinct as u64),
        ),
        ("lost", "**lost**", Value::Count(x.lost.len() as u64)),
        (
            "duplicates",
            "duplicates",
            Value::Count(x.duplicates as u64),
        ),
        (
            "duplicates_per_kill",
            "duplicates per kill",
            Value::Ratio(x.duplicates as f64 / kills.max(1) as f64),
        ),
        (
            "duplicates_worst_cycle",
            "duplicates, worst cycle",
            Value::Count(worst as u64),
        ),
        ("dedup", "dedup", Value::Text(dedup.clone())),
        (
            "within_window",
            "duplicates within the window",
            Value::Yes(over.is_empty()),
        ),
        (
            "end_check",
            "the broker's own check",
            Value::Text(t.end_check().to_string()),
        ),
        (
            "consumed_to_end",
            "consumed to the end",
            Value::Yes(x.consumed_to_end),
        ),
        (
            "resume_median_s",
            "time to resume, median",
            Value::Seconds(x.resume_median),
        ),
        (
            "resume_worst_s",
            "time to resume, worst",
            Value::Seconds(x.resume_worst),
        ),
        (
            "never_resumed",
            "cycles that never resumed",
            Value::Count(x.never as u64),
        ),
        (
            "exits",
            "flowgate exits by itself (fatal errors), started again",
            Value::Count(u64::from(x.exits)),
        ),
    ];
    let store = o.store().label();
    let mut md = format!(
        "# chaos {name}\n\n`{}`: {kills} cycles in {:.0} s (each ends with a SIGKILL of flowgate; \
         the faults before it, by kind, below); {} Checkpoints in {store}; sink: {}.\n\n| | |\n|---|---|\n",
        command(name, o),
        run.started.elapsed().as_secs_f64(),
        t.setup(),
        run.output.name(),
    );
    for (_, label, v) in &summary {
        md.push_str(&format!("| {label} | {} |\n", v.md()));
    }
    md.push('\n');
    md.push_str(&by_fault(run.cycles));
    md.push_str(
        "\n| cycle | fault | ran | resumed in | records | duplicates | flowgate exited by itself |\n\
         |---:|---|---:|---:|---:|---:|---:|\n",
    );
    let mut rows = Vec::new();
    for (i, s) in x.segments.iter().enumerate() {
        let c = run.cycles.get(i);
        let row: Vec<(&str, Value)> = vec![
            (
                "cycle",
                c.map_or(Value::Text("to the end".into()), |_| Value::Count(i as u64)),
            ),
            (
                "fault",
                Value::Text(
                    c.map_or("none, SIGTERM at the end", |c| c.fault.name())
                        .into(),
                ),
            ),
            (
                "ran_s",
                c.map_or(Value::Text("".into()), |c| {
                    Value::Seconds(c.ran.as_secs_f64())
                }),
            ),
            (
                "resume_s",
                match c.map(|c| c.resume) {
                    Some(Some(d)) => Value::Seconds(d.as_secs_f64()),
                    Some(None) => Value::Text("never".into()),
                    None => Value::Text("".into()),
                },
            ),
            ("records", Value::Count(s.received as u64)),
            ("duplicates", Value::Count(s.duplicates as u64)),
            (
                "exited",
                Value::Count(u64::from(c.map_or(0, |c| c.restarts))),
            ),
        ];
        md.push_str(&format!(
            "| {} |\n",
            row.iter()
                .map(|(_, v)| v.md())
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        rows.push(format!(
            "{{{}}}",
            row.iter()
                .map(|(k, v)| format!("\"{k}\":{}", v.json()))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let json = format!(
        "{{{},\"rows\":[{}]}}\n",
        summary
            .iter()
            .map(|(k, _, v)| format!("\"{k}\":{}", v.json()))
            .collect::<Vec<_>>()
            .join(","),
        rows.join(",")
    );
    write(&run.dir.join("report.md"), &md)?;
    write(&run.dir.join("report.json"), &json)?;
    println!("{}", md.split("| cycle |").next().unwrap_or(&md));
    println!("report: {}", run.dir.join("report.md").display());
    if !x.lost.is_empty()
        || x.unexpected > 0
        || !x.consumed_to_end
        || x.never > 0
        || !over.is_empty()
    {
        return Err(format!(
            "chaos {name} failed: {} lost (first {:?}), {} not accepted by the broker, consumed to the end: {}, {} cycles never resumed, duplicates past the window in cycles {over:?} ({dedup})",
            x.lost.len(),
            x.lost.iter().take(5).collect::<Vec<_>>(),
            x.unexpected,
            x.consumed_to_end,
            x.never
        ));
    }
    Ok(())
}

/// Per kind of fault: cycles, the median and worst time to resume, and exits.
fn by_fault(cycles: &[Cycle]) -> String {
    let mut kinds: Vec<Fault> = Vec::new();
    for c in cycles {
        if !kinds.contains(&c.fault) {
            kinds.push(c.fault);
        }
    }
    let mut md = String::from(
        "| fault | cycles | resume median | resume worst | flowgate exited by itself |\n|---|---:|---:|---:|---:|\n",
    );
    for k in kinds {
        let of: Vec<&Cycle> = cycles.iter().filter(|c| c.fault == k).collect();
        let mut r: Vec<f64> = of
            .iter()
            .filter_map(|c| c.resume.map(|d| d.as_secs_f64()))
            .collect();
        r.sort_by(f64::total_cmp);
        md.push_str(&format!(
            "| {} | {} | {:.2} s | {:.2} s | {} |\n",
            k.name(),
            of.len(),
            r.get(r.len() / 2).copied().unwrap_or(0.0),
            r.last().copied().unwrap_or(0.0),
            of.iter().map(|c| c.restarts).sum::<u32>()
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_a_duplicate_in_the_cycle_it_comes_again() {
        // Cycle 0 wrote lines 1–3, cycle 1 lines 4–6, the run to the end line 7; the churning
        // member wrote its line 1 in cycle 1.
        let marks = [(0, 0), (3, 0), (6, 1)];
        let main = [
            (1, 10),
            (2, 11),
            (3, 12),
            (4, 12),
            (5, 13),
            (6, 14),
            (7, 14),
        ];
        let churn = [(1, 11)];
        // The broker holds 14 twice (the producer wrote it twice): its second copy is no
        // duplicate.
        let accepted = HashMap::from([(10, 1), (11, 1), (12, 1), (13, 1), (14, 2)]);
        let s = segments(&accepted, &marks, &main, &churn);
        let got: Vec<(usize, usize)> = s.iter().map(|s| (s.received, s.duplicates)).collect();
        assert_eq!(got, [(3, 0), (4, 2), (1, 0)]);
    }

    #[test]
    fn every_cycle_after_the_first_replays_the_kill_before_it_and_its_own_fault() {
        let cycle = |fault| Cycle {
            fault,
            resume: None,
            ran: std::time::Duration::ZERO,
            restarts: 0,
            from: (0, 0),
        };
        let cycles = [
            cycle(Fault::Kill),
            cycle(Fault::BrokerRestart),
            cycle(Fault::Kill),
        ];
        let e: Vec<u64> = (0..=cycles.len()).map(|i| events(&cycles, i)).collect();
        assert_eq!(e, [0, 2, 1, 1]);
    }
}
