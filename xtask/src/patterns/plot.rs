//! Figures as SVG (plotters) and the numbers behind them as CSV.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

/// One line of a panel.
pub(super) struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure: its title, y axis and lines, over seconds.
pub(super) struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn fail<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> String + '_ {
    move |e| format!("cannot draw {}: {e:?}", path.display())
}

/// Draws the panels stacked, one under the other, into `path` (SVG).
pub(super) fn svg(path: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    let height = 60 + 280 * panels.len() as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(fail(path))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(fail(path))?;
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let all = || panel.series.iter().flat_map(|s| s.points.iter());
        let x_max = all().map(|p| p.0).fold(1.0, f64::max);
        let y_max = all().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(fail(path))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(&panel.y_label)
            .y_label_formatter(&|v| {
                if v.fract().abs() < 1e-9 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            })
            .draw()
            .map_err(fail(path))?;
        for (i, s) in panel.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(fail(path))?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(fail(path))?;
    }
    root.present().map_err(fail(path))
}

/// The panels' points as CSV: `panel,series,seconds,value`.
pub(super) fn csv(path: &Path, panels: &[Panel]) -> Result<(), String> {
    let mut out = String::from("panel,series,seconds,value\n");
    for p in panels {
        for s in &p.series {
            for (t, v) in &s.points {
                let _ = writeln!(out, "{:?},{:?},{t:.3},{v:.3}", p.title, s.label);
            }
        }
    }
    std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))
}
