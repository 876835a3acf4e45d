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

/// The records written from one cycle's start to the next's (the last: the run to the end).
#[derive(Clone, Copy, Default)]
struct Segment {
    received: usize,
    /// Records of this segment written again later: the replay after the SIGKILL that ended
    /// it, after the fault in it, or after an exit of flowgate during it.
    repeated: usize,
}

/// A duplicate: a record number written again, where, and the segment of its previous copy.
struct Repeat {
    number: u64,
    place: u64,
    churn: bool,
    segment: usize,
    of: usize,
}

/// What the ledger found.
struct Tally {
    accepted: usize,
    received: usize,
    distinct: usize,
    lost: Vec<u64>,
    unexpected: usize,
    /// One per cycle, then the run to the end.
    segments: Vec<Segment>,
    repeats: Vec<Repeat>,
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

/// Per segment, its records and how many of them were written again later; and every
/// duplicate. A record received more often than the broker holds it (a producer may have
/// written a number twice) is a duplicate where it appears again, charged to the segment of
/// its previous copy: the crash or fault there kept that copy's dedup mark from being durable.
fn segments(
    accepted: &HashMap<u64, u32>,
    marks: &[Mark],
    main: &[Placed],
    churn: &[Placed],
) -> (Vec<Segment>, Vec<Repeat>) {
    let mut by_segment: Vec<Vec<(u64, u64, bool)>> = vec![Vec::new(); marks.len()];
    for (records, starts, is_churn) in [
        (main, marks.iter().map(|m| m.0).collect::<Vec<_>>(), false),
        (churn, marks.iter().map(|m| m.1).collect(), true),
    ] {
        for (place, n) in records {
            by_segment[segment_of(&starts, *place)].push((*place, *n, is_churn));
        }
    }
    let mut segments = vec![Segment::default(); marks.len()];
    let mut repeats = Vec::new();
    // Per number: copies so far, and the segment of the last.
    let mut seen: HashMap<u64, (u32, usize)> = HashMap::new();
    for (i, records) in by_segment.iter().enumerate() {
        segments[i].received = records.len();
        for (place, n, churn) in records {
            let copies = seen.entry(*n).or_insert((0, i));
            if copies.0 >= accepted.get(n).copied().unwrap_or(1) {
                segments[copies.1].repeated += 1;
                repeats.push(Repeat {
                    number: *n,
                    place: *place,
                    churn: *churn,
                    segment: i,
                    of: copies.1,
                });
            }
            *copies = (copies.0 + 1, i);
        }
    }
    (segments, repeats)
}

/// Events in segment `i` of `cycles` that may keep dedup marks of written records from being
/// durable: the SIGKILL ending the cycle (the run to the end stops on SIGTERM, a clean
/// stop), the cycle's own fault, and each exit of flowgate by itself during it.
fn events(cycles: &[Cycle], i: usize) -> u64 {
    cycles.get(i).map_or(0, |c| {
        1 + u64::from(c.fault != Fault::Kill)
            + u64::from(c.overlap.is_some())
            + u64::from(c.restarts)
    })
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
    let (segments, repeats) = segments(&held, &marks, &main, &churn);
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
        segments,
        repeats,
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
    /// No value (JSON `null`), shown as this text.
    None(&'static str),
}

impl Value {
    fn md(&self) -> String {
        match self {
            Value::Count(n) => n.to_string(),
            Value::Ratio(r) => format!("{r:.2}"),
            Value::Seconds(s) => format!("{s:.2} s"),
            Value::Yes(b) => if *b { "yes" } else { "**no**" }.to_string(),
            Value::Text(t) => t.clone(),
            Value::None(t) => t.to_string(),
        }
    }

    fn json(&self) -> String {
        match self {
            Value::Count(n) => n.to_string(),
            Value::Ratio(r) => format!("{r:.2}"),
            Value::Seconds(s) => format!("{s:.3}"),
            Value::Yes(b) => b.to_string(),
            Value::Text(t) => format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")),
            Value::None(_) => "null".to_string(),
        }
    }
}

/// `(key, value)` pairs as a JSON object.
fn json_object(fields: &[(&str, Value)]) -> String {
    let fields: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\":{}", v.json()))
        .collect();
    format!("{{{}}}", fields.join(","))
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
    if let Some(m) = o.minutes {
        c.push_str(&format!(" --minutes={m}"));
    }
    if o.table {
        c.push_str(" --sink=table");
    } else if o.dedup {
        c.push_str(" --dedup");
    }
    if o.mixed {
        c.push_str(" --mixed");
    }
    if o.overlap {
        c.push_str(" --overlap");
    }
    c
}

/// How many records of segment `i` the run may write again: with the table sink none, with
/// dedup the window per event, without dedup any number.
fn bound(o: &Options, cycles: &[Cycle], i: usize) -> Option<u64> {
    match (o.table, o.dedup) {
        (true, _) => Some(0),
        (false, true) => Some(super::DEDUP_CONCURRENCY * super::DEDUP_BATCH * events(cycles, i)),
        (false, false) => None,
    }
}

/// The ledger: tallies the run, writes the report and fails the run on a loss, a record the
/// broker never held, a partition not consumed to its end, a cycle that never resumed, or a
/// segment written again past its bound.
pub(super) fn ledger(rig: &Rig, t: &dyn Target, o: &Options, run: &Run<'_>) -> Result<(), String> {
    let x = tally(rig, t, run)?;
    let name = t.broker().name();
    let kills = run.cycles.len();
    let over: Vec<usize> = (0..x.segments.len())
        .filter(|i| bound(o, run.cycles, *i).is_some_and(|b| x.segments[*i].repeated as u64 > b))
        .collect();
    let cycle_name = |i: usize| {
        if i < kills {
            format!("cycle {i}")
        } else {
            "the run to the end".to_string()
        }
    };
    let duplicates = x.repeats.len();
    let worst = x.segments.iter().map(|s| s.repeated).max().unwrap_or(0);
    let window = super::DEDUP_CONCURRENCY * super::DEDUP_BATCH;
    let dedup = match (o.table, o.dedup) {
        (true, _) => format!(
            "{}, `dedup.key = \"{}\"`: no record written twice",
            run.output.name(),
            t.dedup_key()
        ),
        (false, true) => format!(
            "`dedup.key = \"{}\"`, concurrency ≤ {}, batches ≤ {} records: at most {window} records of a cycle written again per SIGKILL, fault or exit in it",
            t.dedup_key(),
            super::DEDUP_CONCURRENCY,
            super::DEDUP_BATCH
        ),
        (false, false) => "none: duplicates are counted, not bounded".to_string(),
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
        ("duplicates", "duplicates", Value::Count(duplicates as u64)),
        (
            "duplicates_per_kill",
            "duplicates per kill",
            Value::Ratio(duplicates as f64 / kills.max(1) as f64),
        ),
        (
            "duplicates_worst_cycle",
            "records of one cycle written again, worst",
            Value::Count(worst as u64),
        ),
        ("dedup", "dedup", Value::Text(dedup.clone())),
        (
            "within_bound",
            "duplicates within the bound",
            if o.dedup {
                Value::Yes(over.is_empty())
            } else {
                Value::None("no bound")
            },
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
        "\n\"written again later\": records of the cycle that a later one wrote again (the \
         replay after the SIGKILL that ended it, its fault, or an exit of flowgate in it).\n\n\
         | cycle | fault | ran | resumed in | records | written again later | bound | flowgate exited by itself |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut rows = Vec::new();
    for (i, s) in x.segments.iter().enumerate() {
        let c = run.cycles.get(i);
        let row: Vec<(&str, Value)> = vec![
            (
                "cycle",
                c.map_or(Value::None("to the end"), |_| Value::Count(i as u64)),
            ),
            (
                "fault",
                Value::Text(c.map_or("none, SIGTERM at the end".to_string(), Cycle::label)),
            ),
            (
                "ran_s",
                c.map_or(Value::None(""), |c| Value::Seconds(c.ran.as_secs_f64())),
            ),
            (
                "resume_s",
                match c.map(|c| c.resume) {
                    Some(Some(d)) => Value::Seconds(d.as_secs_f64()),
                    Some(None) => Value::None("never"),
                    None => Value::None(""),
                },
            ),
            ("records", Value::Count(s.received as u64)),
            ("written_again", Value::Count(s.repeated as u64)),
            (
                "bound",
                bound(o, run.cycles, i).map_or(Value::None("none"), Value::Count),
            ),
            (
                "exited",
                Value::Count(u64::from(c.map_or(0, |c| c.restarts))),
            ),
        ];
        let cells: Vec<String> = row.iter().map(|(_, v)| v.md()).collect();
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
        rows.push(json_object(&row));
    }
    let first_repeats: Vec<String> = x
        .repeats
        .iter()
        .take(10)
        .map(|r| {
            format!(
                "{} ({} {} {}, in {}, previous copy in {})",
                r.number,
                if r.churn {
                    "the second member's sink,"
                } else {
                    "the sink,"
                },
                run.output.place_name(),
                r.place,
                cycle_name(r.segment),
                cycle_name(r.of)
            )
        })
        .collect();
    if !first_repeats.is_empty() {
        md.push_str(&format!(
            "\nThe first duplicates: {}.\n",
            first_repeats.join("; ")
        ));
    }
    let summary_fields: Vec<(&str, Value)> = summary.into_iter().map(|(k, _, v)| (k, v)).collect();
    let json = format!(
        "{},\"rows\":[{}]}}\n",
        json_object(&summary_fields).trim_end_matches('}'),
        rows.join(",")
    );
    write(&run.dir.join("report.md"), &md)?;
    write(&run.dir.join("report.json"), &json)?;
    println!(
        "{}",
        md.split("\n\"written again later\"").next().unwrap_or(&md)
    );
    println!("report: {}", run.dir.join("report.md").display());
    let mut failures = Vec::new();
    if !x.lost.is_empty() {
        failures.push(format!(
            "{} lost (first {:?})",
            x.lost.len(),
            x.lost.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if x.unexpected > 0 {
        failures.push(format!("{} records the broker never held", x.unexpected));
    }
    if !x.consumed_to_end {
        failures.push(format!("not consumed to the end ({})", t.end_check()));
    }
    if x.never > 0 {
        failures.push(format!("{} cycles never resumed", x.never));
    }
    if !over.is_empty() {
        let named: Vec<String> = over
            .iter()
            .map(|i| {
                format!(
                    "{}: {} written again",
                    cycle_name(*i),
                    x.segments[*i].repeated
                )
            })
            .collect();
        failures.push(format!(
            "past the bound ({dedup}): {}; first duplicates: {}",
            named.join(", "),
            first_repeats.join("; ")
        ));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("chaos {name} failed: {}", failures.join("; ")))
    }
}

/// Per kind of fault: cycles, the median and worst time to resume, and exits.
fn by_fault(cycles: &[Cycle]) -> String {
    let mut kinds: Vec<String> = Vec::new();
    for c in cycles {
        if !kinds.contains(&c.label()) {
            kinds.push(c.label());
        }
    }
    let mut md = String::from(
        "| fault | cycles | resume median | resume worst | flowgate exited by itself |\n|---|---:|---:|---:|---:|\n",
    );
    for k in kinds {
        let of: Vec<&Cycle> = cycles.iter().filter(|c| c.label() == k).collect();
        let mut r: Vec<f64> = of
            .iter()
            .filter_map(|c| c.resume.map(|d| d.as_secs_f64()))
            .collect();
        r.sort_by(f64::total_cmp);
        md.push_str(&format!(
            "| {} | {} | {:.2} s | {:.2} s | {} |\n",
            k,
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
    fn a_duplicate_is_charged_to_the_cycle_of_its_previous_copy() {
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
            (8, 13),
        ];
        let churn = [(1, 11)];
        // The broker holds 14 twice (the producer wrote it twice): its second copy is no
        // duplicate.
        let accepted = HashMap::from([(10, 1), (11, 1), (12, 1), (13, 1), (14, 2)]);
        let (s, repeats) = segments(&accepted, &marks, &main, &churn);
        let got: Vec<(usize, usize)> = s.iter().map(|s| (s.received, s.repeated)).collect();
        // 12 and 11 of cycle 0 came again in cycle 1; 13 of cycle 1 in the run to the end.
        assert_eq!(got, [(3, 2), (4, 1), (2, 0)]);
        let r: Vec<(u64, u64, bool, usize, usize)> = repeats
            .iter()
            .map(|r| (r.number, r.place, r.churn, r.segment, r.of))
            .collect();
        assert_eq!(
            r,
            [
                (12, 4, false, 1, 0),
                (11, 1, true, 1, 0),
                (13, 8, false, 2, 1)
            ]
        );
    }

    #[test]
    fn a_cycle_ends_with_a_sigkill_and_may_add_a_fault_and_exits() {
        let cycle = |fault, restarts| Cycle {
            fault,
            overlap: None,
            resume: None,
            ran: std::time::Duration::ZERO,
            restarts,
            from: (0, 0),
        };
        let cycles = [
            cycle(Fault::Kill, 0),
            cycle(Fault::BrokerRestart, 1),
            cycle(Fault::Kill, 0),
        ];
        let e: Vec<u64> = (0..=cycles.len()).map(|i| events(&cycles, i)).collect();
        // The run to the end stops on SIGTERM.
        assert_eq!(e, [1, 3, 1, 0]);
        let overlapping = Cycle {
            overlap: Some(super::super::Net::Cut),
            ..cycle(Fault::StoreRestart, 0)
        };
        assert_eq!(
            overlapping.label(),
            "store restart and network: cut for 15 s at once, then SIGKILL"
        );
        assert_eq!(events(&[overlapping], 0), 3);
    }
}
