// SPDX-License-Identifier: MIT OR Apache-2.0
//! The plot of bench/lmk_side_by_side.py's runs (its --json output):
//! the cgroup's usage around the trigger line per run, and the time from
//! the line to memory back, per killer. Drawn here rather than in Python so
//! that every figure of the project comes from one toolchain (plotters,
//! DejaVu Sans), with no plotting package to install.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::Deserialize;

const TRIGGER_MIB: f64 = 192.0;
const LIMIT_MIB: f64 = 256.0;

#[derive(Debug, Deserialize)]
struct Bench {
    #[serde(default)]
    earlyoom_version: String,
    runs: Vec<Run>,
}

#[derive(Debug, Deserialize)]
struct Run {
    method: String,
    trigger_to_back_ms: Option<f64>,
    crossed_s: Option<f64>,
    #[serde(default)]
    usage_trace: Vec<(f64, f64)>,
}

fn style(method: &str) -> (RGBColor, &'static str) {
    match method {
        "kernel" => (RGBColor(214, 39, 40), "kernel OOM killer alone"),
        "lmk" => (RGBColor(31, 119, 180), "reapd-lmk (no capabilities)"),
        "earlyoom" => (RGBColor(44, 160, 44), "earlyoom (CAP_KILL)"),
        _ => (RGBColor(127, 127, 127), "other"),
    }
}

pub fn plot(json: &Path, out: &Path) -> anyhow::Result<()> {
    let bench: Bench = serde_json::from_slice(&std::fs::read(json).with_context(|| format!("{}", json.display()))?)
        .with_context(|| format!("{}: not lmk_side_by_side.py --json output", json.display()))?;
    anyhow::ensure!(
        crate::report::load_font().is_some(),
        "no TrueType font (DejaVu Sans) found"
    );
    let mut methods: Vec<&str> = Vec::new();
    for r in &bench.runs {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    draw(&bench, &methods, out).map_err(|e| anyhow::anyhow!("plot {}: {e}", out.display()))
}

fn draw(bench: &Bench, methods: &[&str], out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(out, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(720);

    // Left: usage against time since the line was crossed, every run.
    let mut chart = ChartBuilder::on(&left)
        .caption(
            "256 MiB cgroup, no swap: usage around the trigger line",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-150f64..700f64, 150f64..265f64)?;
    chart
        .configure_mesh()
        .x_desc("ms since usage crossed 75 % of the limit")
        .y_desc("cgroup usage, MiB")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (y, label) in [(TRIGGER_MIB, "trigger line"), (LIMIT_MIB, "memory limit")] {
        chart.draw_series(LineSeries::new([(-150.0, y), (700.0, y)], BLACK.mix(0.5)))?;
        chart.draw_series(std::iter::once(Text::new(label, (-140.0, y + 2.5), ("sans-serif", 13))))?;
    }
    for &method in methods {
        let (color, label) = style(method);
        let mut first = true;
        for run in bench.runs.iter().filter(|r| r.method == method) {
            let Some(c) = run.crossed_s else { continue };
            let pts: Vec<(f64, f64)> = run
                .usage_trace
                .iter()
                .map(|&(t, mib)| ((t - c) * 1e3, mib))
                .filter(|&(ms, _)| (-150.0..=700.0).contains(&ms))
                .collect();
            let series = chart.draw_series(LineSeries::new(pts, color.mix(0.6).stroke_width(2)))?;
            if first {
                let label = if method == "earlyoom" && !bench.earlyoom_version.is_empty() {
                    format!("earlyoom {} (CAP_KILL)", bench.earlyoom_version)
                } else {
                    label.to_string()
                };
                series
                    .label(label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
                first = false;
            }
        }
    }
    crate::report::legend_box(&mut chart, SeriesLabelPosition::LowerRight)?;

    // Right: trigger line to back under it, one dot per run, median bar.
    let hi = bench
        .runs
        .iter()
        .filter_map(|r| r.trigger_to_back_ms)
        .fold(100.0f64, f64::max)
        * 1.15;
    let n = methods.len();
    let names: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
    let mut chart = ChartBuilder::on(&right)
        .caption("trigger line to back under it", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..hi)?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| crate::report::category_label(&names, *x))
        .y_desc("ms")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .disable_x_mesh()
        .draw()?;
    for (i, &method) in methods.iter().enumerate() {
        let (color, _) = style(method);
        let mut xs: Vec<f64> = bench
            .runs
            .iter()
            .filter(|r| r.method == method)
            .filter_map(|r| r.trigger_to_back_ms)
            .collect();
        let k = xs.len().max(1) as f64;
        chart.draw_series(
            xs.iter()
                .enumerate()
                .map(|(j, &y)| Circle::new((i as f64 - 0.2 + 0.4 * j as f64 / k, y), 4, color.filled())),
        )?;
        // The median as the table's (Python's statistics.median): the mean
        // of the middle two for an even count.
        xs.sort_by(f64::total_cmp);
        if let Some(&med) = xs.get(xs.len() / 2) {
            let med = if xs.len().is_multiple_of(2) {
                (med + xs[xs.len() / 2 - 1]) / 2.0
            } else {
                med
            };
            chart.draw_series(LineSeries::new(
                [(i as f64 - 0.3, med), (i as f64 + 0.3, med)],
                BLACK.stroke_width(2),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}
