//! `flowgate top [ADDR]`: a live terminal view of a running pipeline, read from its
//! `/status` once a second: health, in/out rates, and per partition its status, a lag bar,
//! lag in seconds, rate of change, catch-up estimate and in-flight records.
//! Keys: `s` cycles the sort order (partition, lag, status), `q` or Esc quits.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use flowgate_core::Error;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use serde_json::Value;

/// The order of the partition rows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sort {
    Partition,
    Lag,
    Status,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Partition => Sort::Lag,
            Sort::Lag => Sort::Status,
            Sort::Status => Sort::Partition,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Sort::Partition => "partition",
            Sort::Lag => "lag",
            Sort::Status => "status",
        }
    }
}

/// What the view shows: the last reading and the rates between the last two.
struct View {
    addr: String,
    sort: Sort,
    status: Option<Value>,
    error: Option<String>,
    rate_in: f64,
    rate_out: f64,
    previous: Option<(Instant, u64, u64)>,
}

impl View {
    fn refresh(&mut self) {
        match fetch_status(&self.addr) {
            Ok(v) => {
                let now = Instant::now();
                let (records_in, records_out) = (
                    v["records_in"].as_u64().unwrap_or(0),
                    v["records_out"].as_u64().unwrap_or(0),
                );
                if let Some((at, i, o)) = self.previous {
                    let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                    self.rate_in = records_in.saturating_sub(i) as f64 / dt;
                    self.rate_out = records_out.saturating_sub(o) as f64 / dt;
                }
                self.previous = Some((now, records_in, records_out));
                self.status = Some(v);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    fn rows(&self) -> Vec<Value> {
        let mut rows: Vec<Value> = self
            .status
            .as_ref()
            .and_then(|s| s["partitions"].as_array().cloned())
            .unwrap_or_default();
        let status_rank = |v: &Value| match v["status"].as_str() {
            Some("STALL") => 0,
            Some("STOP") => 1,
            Some("WARN") => 2,
            Some("REWIND") => 3,
            _ => 4,
        };
        match self.sort {
            Sort::Partition => rows.sort_by_key(|r| r["partition"].as_str().map(str::to_string)),
            Sort::Lag => rows.sort_by_key(|r| std::cmp::Reverse(r["lag"].as_u64().unwrap_or(0))),
            Sort::Status => rows.sort_by_key(status_rank),
        }
        rows
    }

    fn draw(&self, frame: &mut ratatui::Frame) {
        let [head, body, foot] = Layout::vertical([
            Constraint::Length(3),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(
            Paragraph::new(self.header()).block(Block::bordered().title(" flowgate top ")),
            head,
        );
        frame.render_widget(self.partition_table(), body);
        frame.render_widget(
            Paragraph::new(format!(" s sort ({})   q quit", self.sort.name())),
            foot,
        );
    }

    /// The pipeline's health and rates, or why there are none.
    fn header(&self) -> Line<'static> {
        match (&self.status, &self.error) {
            (_, Some(e)) => Line::from(format!("{}: {e} (retrying)", self.addr))
                .style(Style::default().fg(Color::Red)),
            (Some(s), None) => Line::from(format!(
                "pipeline {}  {}  in {:.0}/s  out {:.0}/s  lag {}  in-flight {}",
                s["pipeline"].as_str().unwrap_or("?"),
                s["health"].as_str().unwrap_or("?"),
                self.rate_in,
                self.rate_out,
                s["lag"].as_u64().unwrap_or(0),
                s["in_flight"].as_u64().unwrap_or(0),
            )),
            (None, None) => Line::from(format!("{}: waiting for /status", self.addr)),
        }
    }

    /// A row per partition, its lag bar scaled to the largest lag.
    fn partition_table(&self) -> Table<'static> {
        let rows = self.rows();
        let max_lag = rows
            .iter()
            .filter_map(|r| r["lag"].as_u64())
            .max()
            .unwrap_or(0)
            .max(1);
        let table_rows: Vec<Row<'static>> =
            rows.iter().map(|r| partition_row(r, max_lag)).collect();
        Table::new(
            table_rows,
            [
                Constraint::Min(14),
                Constraint::Length(7),
                Constraint::Length(BAR_WIDTH as u16 + 12),
                Constraint::Length(9),
                Constraint::Length(11),
                Constraint::Length(15),
                Constraint::Length(10),
            ],
        )
        .header(
            Row::new(vec![
                "PARTITION",
                "STATUS",
                "LAG (records)",
                "LAG (s)",
                "RATE",
                "CATCH-UP",
                "IN-FLIGHT",
            ])
            .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered())
    }
}

/// Characters of a full lag bar.
const BAR_WIDTH: usize = 20;

/// One partition of `/status`, coloured by its status.
fn partition_row(r: &Value, max_lag: u64) -> Row<'static> {
    let lag = r["lag"].as_u64().unwrap_or(0);
    let status = r["status"].as_str().unwrap_or("?").to_string();
    let color = match status.as_str() {
        "OK" => Color::Green,
        "WARN" => Color::Yellow,
        "REWIND" => Color::Blue,
        _ => Color::Red,
    };
    let secs = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |s| format!("{s:.1}s"))
    };
    let catch_up = match r["catch_up_seconds"].as_f64() {
        Some(s) => format!("{s:.0}s"),
        None => "falling behind".to_string(),
    };
    Row::new(vec![
        r["partition"].as_str().unwrap_or("?").to_string(),
        status,
        lag_bar(lag, max_lag),
        secs(&r["lag_seconds"]),
        format!("{:+.1}/s", r["lag_rate"].as_f64().unwrap_or(0.0)),
        catch_up,
        r["in_flight"].as_u64().unwrap_or(0).to_string(),
    ])
    .style(Style::default().fg(color))
}

/// `lag` as a bar of `BAR_WIDTH` characters, full at `max_lag`, then the number.
fn lag_bar(lag: u64, max_lag: u64) -> String {
    let filled = ((lag as f64 / max_lag as f64) * BAR_WIDTH as f64).ceil() as usize;
    format!(
        "{}{} {lag}",
        "█".repeat(filled.min(BAR_WIDTH)),
        "·".repeat(BAR_WIDTH - filled.min(BAR_WIDTH))
    )
}

/// `GET /status` on `addr`, as JSON.
fn fetch_status(addr: &str) -> Result<Value, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("cannot connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /status HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body.trim()).map_err(|e| format!("/status is not JSON: {e}"))
}

/// Runs the view until `q`.
pub(crate) fn run(addr: &str) -> Result<(), Error> {
    let mut terminal = ratatui::try_init()
        .map_err(|e| Error::config("cannot draw on this terminal").with_context("cause", e))?;
    let mut view = View {
        addr: addr.to_string(),
        sort: Sort::Partition,
        status: None,
        error: None,
        rate_in: 0.0,
        rate_out: 0.0,
        previous: None,
    };
    let res = (|| -> std::io::Result<()> {
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                view.refresh();
                next = Instant::now() + Duration::from_secs(1);
            }
            terminal.draw(|f| view.draw(f))?;
            if event::poll(next.saturating_duration_since(Instant::now()))? {
                if let Event::Key(k) = event::read()? {
                    if k.kind != KeyEventKind::Press {
                        continue;
                    }
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('s') => view.sort = view.sort.next(),
                        _ => {}
                    }
                }
            }
        }
    })();
    ratatui::restore();
    res.map_err(|e| Error::fatal("the terminal failed").with_context("cause", e))
}
