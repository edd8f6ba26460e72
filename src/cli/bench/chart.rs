//! The benchmark's chart: for each mode, the distribution (CDF) of end-to-end latency,
//! solid, and of the critical path, dashed — the gap between them is the overhead.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::ModeResult;

const COLORS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

pub fn draw(path: &Path, modes: &[ModeResult], title: &str) -> anyhow::Result<()> {
    let max_s = modes
        .iter()
        .flat_map(|m| m.e2e_ms.iter().chain(&m.critical_ms))
        .fold(0.0_f64, |a, b| a.max(*b))
        / 1000.0;
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..(max_s * 1.05).max(0.001), 0.0..1.0)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("latency (s)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, mode) in modes.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let e2e = cdf(&mode.e2e_ms);
        let critical = cdf(&mode.critical_ms);
        chart
            .draw_series(LineSeries::new(e2e, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("{}: end to end", mode.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(DashedLineSeries::new(critical, 6, 4, color.stroke_width(1)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("{}: critical path", mode.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
    }
    finish(&mut chart, &root, path)
}

/// Sorted latencies (ms) as CDF points (seconds, fraction).
fn cdf(values_ms: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = values_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    sorted
        .iter()
        .enumerate()
        .map(|(i, v)| (v / 1000.0, (i + 1) as f64 / n))
        .collect()
}

/// `bench limits`: the concurrency limit (solid) and the calls in flight (dashed) over
/// time, from samples of (seconds, limit, in flight).
pub fn draw_limits(path: &Path, samples: &[(f64, u32, u32)], title: &str) -> anyhow::Result<()> {
    let max_t = samples.iter().map(|s| s.0).fold(0.0_f64, f64::max);
    let max_y = samples
        .iter()
        .map(|s| s.1.max(s.2))
        .max()
        .unwrap_or(1)
        .max(1);
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_t.max(0.1), 0u32..(max_y + max_y / 10 + 1))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("calls")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (limit, in_flight) = (COLORS[1], COLORS[0]);
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.0, s.1)),
            limit.stroke_width(2),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("concurrency limit")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], limit.stroke_width(2)));
    chart
        .draw_series(DashedLineSeries::new(
            samples.iter().map(|s| (s.0, s.2)),
            6,
            4,
            in_flight.stroke_width(1),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("calls in flight")
        .legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], in_flight.stroke_width(1))
        });
    finish(&mut chart, &root, path)
}

/// Draws the legend and writes the file.
fn finish<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    path: &Path,
) -> anyhow::Result<()>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot write the chart {}", path.display()))
}
