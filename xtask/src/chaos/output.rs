//! Where the chaos pipeline writes, and how the ledger reads it back: a JSON-lines file (and
//! the churning member's own file), or rows of the PostgreSQL table sink, written in one
//! transaction with their dedup marks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::measure::{file_len, line_count};
use crate::rig::{Broker, Rig};

/// The table the table sink writes, in the run's schema.
const TABLE: &str = "chaos_rows";

/// A record the sink received: where in the sink (a line number from 1, or the row's id), and
/// its record number.
pub(super) type Placed = (u64, u64);

/// Where the sink stands: the number of the last line or row of the main sink and of the
/// churning member's sink. Every record placed after it was written later.
pub(super) type Mark = (u64, u64);

pub(super) enum Output {
    /// JSON-lines files: the pipeline's, and the churning second member's.
    Jsonl { main: PathBuf, churn: PathBuf },
    /// The PostgreSQL table sink: rows of every member in one table of `schema`, their dedup
    /// marks written in the same transaction.
    Table { schema: String, pipeline: String },
}

impl Output {
    /// The `[sink]` section of the pipeline (`churn`: the second member's), with `faults`.
    pub(super) fn sink_toml(&self, churn: bool, faults: &str) -> String {
        match self {
            Output::Jsonl { main, churn: other } => format!(
                "[sink]\ntype = \"jsonl\"\npath = \"{}\"\n{faults}",
                if churn { other } else { main }.display()
            ),
            Output::Table { .. } => {
                format!("[sink]\ntype = \"table\"\ntable = \"{TABLE}\"\n{faults}")
            }
        }
    }

    /// How often [`Output::progress`] is worth asking: the resolution of the time to resume.
    pub(super) fn poll_every(&self) -> std::time::Duration {
        std::time::Duration::from_millis(match self {
            Output::Jsonl { .. } => 10,
            // A psql call each time.
            Output::Table { .. } => 50,
        })
    }

    /// A number that grows with every write of the pipeline's sink (cheap enough to poll):
    /// the file's size, or the table's highest row id (`None` while PostgreSQL is away).
    pub(super) fn progress(&self, rig: &Rig) -> Option<u64> {
        match self {
            Output::Jsonl { main, .. } => Some(file_len(main)),
            Output::Table { .. } => self.mark(rig).ok().map(|m| m.0),
        }
    }

    /// Where the sink stands now.
    pub(super) fn mark(&self, rig: &Rig) -> Result<Mark, String> {
        match self {
            Output::Jsonl { main, churn } => Ok((line_count(main)?, line_count(churn)?)),
            Output::Table { .. } => {
                let out = match self.query(
                    rig,
                    &format!("SELECT coalesce(max(id), 0) FROM {}", self.table()),
                ) {
                    // The sink creates its table when it first starts (SQLSTATE 42P01:
                    // undefined_table).
                    Err(e) if e.contains("42P01") => return Ok((0, 0)),
                    res => res?,
                };
                let id = out
                    .trim()
                    .parse()
                    .map_err(|e| format!("the highest row id {out:?}: {e}"))?;
                Ok((id, 0))
            }
        }
    }

    /// Every record the sinks received, in the order written: the main sink's, the churning
    /// member's.
    pub(super) fn records(&self, rig: &Rig) -> Result<(Vec<Placed>, Vec<Placed>), String> {
        match self {
            Output::Jsonl { main, churn } => Ok((jsonl_records(main)?, jsonl_records(churn)?)),
            Output::Table { pipeline, .. } => {
                let out = self.query(
                    rig,
                    &format!(
                        "SELECT id, convert_from(payload, 'UTF8') FROM {} WHERE pipeline = '{pipeline}' ORDER BY id",
                        self.table()
                    ),
                )?;
                let rows = out
                    .lines()
                    .filter_map(|l| {
                        let (id, n) = l.split_once('|')?;
                        Some((id.parse().ok()?, n.trim().parse().ok()?))
                    })
                    .collect();
                Ok((rows, Vec::new()))
            }
        }
    }

    /// What a record's place is.
    pub(super) fn place_name(&self) -> &'static str {
        match self {
            Output::Jsonl { .. } => "line",
            Output::Table { .. } => "row id",
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Output::Jsonl { .. } => "JSON-lines",
            Output::Table { .. } => {
                "the PostgreSQL table sink (rows and dedup marks in one transaction)"
            }
        }
    }

    fn table(&self) -> String {
        match self {
            Output::Table { schema, .. } => format!("{schema}.{TABLE}"),
            Output::Jsonl { .. } => String::new(),
        }
    }

    /// `sql`'s rows, `|`-separated; an error holds psql's message with its SQLSTATE.
    fn query(&self, rig: &Rig, sql: &str) -> Result<String, String> {
        let out = rig
            .client(Broker::Postgres)?
            .args(["-At", "-v", "VERBOSITY=verbose", "-c", sql])
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql -c {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Lines of a JSON-lines sink (none if it was never written), numbered from 1, and their
/// payloads (the record numbers).
fn jsonl_records(sink: &Path) -> Result<Vec<Placed>, String> {
    if !sink.exists() {
        return Ok(Vec::new());
    }
    let text = fs::read_to_string(sink).map_err(|e| format!("{}: {e}", sink.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let rest = &l[l.find("\"payload\":\"")? + 11..];
            Some((i as u64 + 1, rest[..rest.find('"')?].parse().ok()?))
        })
        .collect())
}
