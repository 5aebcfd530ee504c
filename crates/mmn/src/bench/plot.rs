//! The SVG plots of `mmn bench --plots DIR`:
//!
//! - `itree.svg`: interval-tree cost per operation against the number of entries (insert,
//!   2 MiB query, remove), ours beside `iset` and Linux's reference figures; log-log;
//! - `invalidate.svg`: the cost of an invalidation against the number of list
//!   subscribers (beside calling them directly; linear) and of interval subscriptions
//!   (beside the tree lookup alone; log-log);
//! - `latency.svg`: the distribution (CDF) of munmap-to-invalidated latency, monitor and
//!   cache beside a bare userfaultfd reader (only when the uffd group ran).

use std::error::Error;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::series::DashedLineSeries;

use super::{Curve, Report};

type Res<T> = Result<T, Box<dyn Error>>;

/// Line colours, in the order the series are drawn.
const COLOURS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x2c, 0xa0, 0x2c),
];

/// A tick label: 1k, 10k, 1M for counts from a thousand up; otherwise as few digits as
/// the value needs.
fn tick(v: &f64) -> String {
    let v = *v;
    if v >= 1e6 && (v / 1e6).fract() == 0.0 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 && (v / 1e3).fract() == 0.0 {
        format!("{}k", v / 1e3)
    } else if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Writes every plot the report has data for into `dir`; returns the files written.
pub(super) fn write_all(dir: &Path, report: &Report) -> Res<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let curve = |id: &str| report.curves.iter().find(|c| c.id == id);
    if curve("itree_insert_ours").is_some() {
        let path = dir.join("itree.svg");
        let panels: Vec<(&str, Vec<(&Curve, bool)>)> = [
            ("insert", "insert"),
            ("query_2mib", "2 MiB query"),
            ("remove", "remove"),
        ]
        .iter()
        .map(|&(op, title)| {
            let series = ["ours", "iset", "linux"]
                .iter()
                .filter_map(|v| curve(&format!("itree_{op}_{v}")).map(|c| (c, *v == "linux")))
                .collect();
            (title, series)
        })
        .collect();
        grid(
            &path,
            "Interval tree: median ns per operation against entries",
            &panels,
            (true, true),
        )?;
        written.push(path);
    }
    if curve("invalidate_list_subscribers").is_some()
        || curve("invalidate_interval_subscriptions").is_some()
    {
        let path = dir.join("invalidate.svg");
        let mut panels: Vec<(&str, Vec<(&Curve, bool)>)> = Vec::new();
        let list: Vec<_> = [
            "invalidate_list_subscribers",
            "invalidate_list_direct_calls",
        ]
        .iter()
        .filter_map(|id| curve(id).map(|c| (c, false)))
        .collect();
        if !list.is_empty() {
            panels.push(("list subscribers", list));
        }
        let intervals: Vec<_> = [
            "invalidate_interval_subscriptions",
            "invalidate_interval_tree_lookup",
        ]
        .iter()
        .filter_map(|id| curve(id).map(|c| (c, false)))
        .collect();
        if !intervals.is_empty() {
            panels.push(("interval subscriptions (1 hit)", intervals));
        }
        invalidate(&path, &panels)?;
        written.push(path);
    }
    if !report.distributions.is_empty() {
        let path = dir.join("latency.svg");
        latency(&path, report)?;
        written.push(path);
    }
    Ok(written)
}

/// The bounds of the points of `series`, with some room around them (a factor on log
/// axes, a fraction of the span on linear ones).
fn bounds(series: &[(&Curve, bool)], log: (bool, bool)) -> ((f64, f64), (f64, f64)) {
    let pts = series.iter().flat_map(|(c, _)| c.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let pad = |lo: f64, hi: f64, log: bool| {
        if log {
            (lo / 1.5, hi * 1.5)
        } else {
            let room = ((hi - lo) * 0.05).max(1e-9);
            ((lo - room).min(0.0), hi + room)
        }
    };
    (pad(x0, x1, log.0), pad(y0, y1, log.1))
}

/// Draws the series of one panel on `chart` with a legend.
fn draw_series<'a, DB: DrawingBackend + 'a, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &[(&Curve, bool)],
    legend: SeriesLabelPosition,
) -> Res<()>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
    DB::ErrorType: 'static,
{
    for (k, (c, dashed)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let style = colour.stroke_width(2);
        if *dashed {
            chart
                .draw_series(DashedLineSeries::new(c.points.iter().copied(), 6, 4, style))?
                .label(c.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        } else {
            chart
                .draw_series(LineSeries::new(c.points.iter().copied(), style))?
                .label(c.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart.draw_series(c.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// One panel: a chart of `series` on `area` with the given axes.
fn panel<X, Y>(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    series: &[(&Curve, bool)],
    x: X,
    y: Y,
) -> Res<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("ns per operation (median)")
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .max_light_lines(3)
        .label_style(("sans-serif", 12))
        .draw()?;
    // Every curve rises to the right: the legend goes where they are low.
    let legend = if series.iter().any(|(c, _)| c.x == "entries") {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperLeft
    };
    draw_series(&mut chart, series, legend)
}

/// Panels side by side, sharing axis kinds (`log`: x, y).
fn grid(
    path: &Path,
    title: &str,
    panels: &[(&str, Vec<(&Curve, bool)>)],
    log: (bool, bool),
) -> Res<()> {
    let root = SVGBackend::new(path, (420 * panels.len() as u32, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (name, series)) in areas.iter().zip(panels) {
        if series.is_empty() {
            continue;
        }
        let ((x0, x1), (y0, y1)) = bounds(series, log);
        let x_desc = series[0].0.x;
        match log {
            (true, true) => panel(
                area,
                name,
                x_desc,
                series,
                (x0..x1).log_scale(),
                (y0..y1).log_scale(),
            )?,
            (true, false) => panel(area, name, x_desc, series, (x0..x1).log_scale(), y0..y1)?,
            (false, true) => panel(area, name, x_desc, series, x0..x1, (y0..y1).log_scale())?,
            (false, false) => panel(area, name, x_desc, series, x0..x1, y0..y1)?,
        }
    }
    root.present()?;
    Ok(())
}

/// The invalidation plot: list subscribers on linear axes (the count starts at 0),
/// interval subscriptions on log-log ones.
fn invalidate(path: &Path, panels: &[(&str, Vec<(&Curve, bool)>)]) -> Res<()> {
    let root = SVGBackend::new(path, (460 * panels.len() as u32, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Invalidation (start+end): median ns against subscribers",
        ("sans-serif", 20),
    )?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (name, series)) in areas.iter().zip(panels) {
        let log = name.starts_with("interval");
        let ((x0, x1), (y0, y1)) = bounds(series, (log, log));
        let x_desc = series[0].0.x;
        if log {
            let (x, y) = ((x0..x1).log_scale(), (y0..y1).log_scale());
            panel(area, name, x_desc, series, x, y)?;
        } else {
            panel(area, name, x_desc, series, x0.max(0.0)..x1, y0.max(0.0)..y1)?;
        }
    }
    root.present()?;
    Ok(())
}

/// The latency plot: for each distribution, the fraction of samples at or below x µs.
fn latency(path: &Path, report: &Report) -> Res<()> {
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let us = |ns: f64| (ns / 1e3).max(0.1);
    let lo = report
        .distributions
        .iter()
        .map(|d| us(d.quantile(0.0)))
        .fold(f64::MAX, f64::min);
    let hi = report
        .distributions
        .iter()
        .map(|d| us(d.quantile(0.995)))
        .fold(f64::MIN, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "munmap to invalidated: latency distribution",
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(42)
        .y_label_area_size(60)
        .build_cartesian_2d(((lo / 1.2)..(hi * 1.2)).log_scale().base(2.0), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("µs from the munmap call (log; the slowest 0.5% beyond the right edge)")
        .x_label_formatter(&tick)
        .y_desc("fraction of munmaps")
        .label_style(("sans-serif", 12))
        .draw()?;
    for (k, d) in report.distributions.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let style = colour.stroke_width(2);
        let n = d.samples.len();
        // At most ~400 points per curve: every k-th sample of the sorted list.
        let step = (n / 400).max(1);
        let pts: Vec<(f64, f64)> = (0..n)
            .step_by(step)
            .chain(std::iter::once(n - 1))
            .map(|i| (us(d.samples[i]), (i + 1) as f64 / n as f64))
            .filter(|&(x, _)| x <= hi * 1.2)
            .collect();
        chart
            .draw_series(LineSeries::new(pts, style))?
            .label(format!(
                "{} (median {:.1} µs, p99 {:.1} µs)",
                d.label,
                d.quantile(0.5) / 1e3,
                d.quantile(0.99) / 1e3
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}
