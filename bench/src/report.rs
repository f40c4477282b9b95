// SPDX-License-Identifier: MIT OR Apache-2.0
//! docs/benchmarks.md and the PNG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::memback::{Method, State, Trial};
use crate::overhead::{ConcurrencyPoint, ScalePoint};
use crate::stats::{summarize, Summary};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub thp: String,
    pub kill_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Footprint {
    pub idle_rss: u64,
    pub calls: usize,
    pub rss_after_calls: u64,
    pub peak_rss: u64,
    pub binaries: Vec<(String, u64)>,
    pub cold_start_ms: Summary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub command: String,
    pub quick: bool,
    pub started_utc: String,
    pub total_secs: f64,
    pub timeout_ms: f64,
    pub sizes: Vec<String>,
    pub memback: Vec<Trial>,
    pub check_grpc_us: Summary,
    pub check_inprocess_us: Summary,
    pub kill_grpc_us: Summary,
    pub kill_inprocess_us: Summary,
    pub check_varlink_us: Summary,
    pub kill_varlink_us: Summary,
    pub policy: Vec<crate::overhead::PolicyPoint>,
    pub throughput: Vec<ConcurrencyPoint>,
    pub footprint: Footprint,
    pub scale: Vec<ScalePoint>,
    pub notes: Vec<String>,
    /// Section 0 (absent from reports written before it existed).
    #[serde(default)]
    pub floor: Option<crate::floor::FloorResults>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Memory-back summary of one (state, size, method) cell: the summary over
/// trials that got the memory back, and how many did not within the timeout.
pub struct Cell {
    pub back: Summary,
    pub timeouts: usize,
    pub n: usize,
    pub call: Summary,
}

pub fn cells(trials: &[Trial]) -> BTreeMap<(State, String, Method), Cell> {
    let mut groups: BTreeMap<(State, String, Method), Vec<&Trial>> = BTreeMap::new();
    for t in trials {
        groups.entry((t.state, t.size.clone(), t.method)).or_default().push(t);
    }
    groups
        .into_iter()
        .map(|(k, ts)| {
            let back: Vec<f64> = ts.iter().filter_map(|t| t.back_ms).collect();
            let call: Vec<f64> = ts.iter().map(|t| t.call_ms).collect();
            let cell = Cell {
                back: summarize(&back),
                timeouts: ts.len() - back.len(),
                n: ts.len(),
                call: summarize(&call),
            };
            (k, cell)
        })
        .collect()
}

/// The median memory-back time of a cell, counting a timed-out trial as
/// the timeout (a lower bound); `true` when that bound decides the median.
pub fn median_with_timeouts(
    trials: &[Trial],
    state: State,
    size: &str,
    method: Method,
    timeout_ms: f64,
) -> Option<(f64, bool)> {
    let mut v: Vec<f64> = trials
        .iter()
        .filter(|t| t.state == state && t.size == size && t.method == method)
        .map(|t| t.back_ms.unwrap_or(f64::INFINITY))
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v[(v.len() - 1) / 2];
    Some(if m.is_finite() { (m, false) } else { (timeout_ms, true) })
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_cell(cell: &Cell, timeout_ms: f64) -> String {
    if cell.timeouts * 2 >= cell.n && cell.timeouts > 0 {
        return format!(
            "> {} ({}/{} never within the timeout)",
            fmt_ms(timeout_ms),
            cell.timeouts,
            cell.n
        );
    }
    let mut s = format!(
        "**{}** ({}–{})",
        fmt_ms(cell.back.p50),
        fmt_ms(cell.back.p10),
        fmt_ms(cell.back.p90)
    );
    if cell.timeouts > 0 {
        let _ = write!(s, ", {}/{} > {}", cell.timeouts, cell.n, fmt_ms(timeout_ms));
    }
    s
}

fn methods_in(trials: &[Trial]) -> Vec<Method> {
    let mut m: Vec<Method> = trials.iter().map(|t| t.method).collect();
    m.sort();
    m.dedup();
    m
}

fn states_in(trials: &[Trial]) -> Vec<State> {
    let mut s: Vec<State> = trials.iter().map(|t| t.state).collect();
    s.sort();
    s.dedup();
    s
}

/// Ratio of kill+wait's to reapd's median memory-back time.
pub fn headline(r: &Results) -> Vec<(State, String, String)> {
    let mut out = Vec::new();
    for state in states_in(&r.memback) {
        for size in &r.sizes {
            let kw = median_with_timeouts(&r.memback, state, size, Method::KillWait, r.timeout_ms);
            let g = median_with_timeouts(&r.memback, state, size, Method::Grpc, r.timeout_ms);
            if let (Some((kw, kw_bound)), Some((g, g_bound))) = (kw, g) {
                let ratio = kw / g;
                let text = match (kw_bound, g_bound) {
                    (false, false) => format!("{ratio:.1}× ({} ms vs {} ms)", fmt_ms(kw), fmt_ms(g)),
                    (true, false) => format!(
                        "> {ratio:.0}× (kill+wait never within {} ms; reapd {} ms)",
                        fmt_ms(kw),
                        fmt_ms(g)
                    ),
                    _ => "n/a (reapd timed out)".to_string(),
                };
                out.push((state, size.clone(), text));
            }
        }
    }
    out
}

pub fn markdown(r: &Results, plots: bool) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# reapd benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `{}` on {} (total {:.0} s){}. Do not edit by hand: rerun the command.\n",
        r.command,
        r.started_utc,
        r.total_secs,
        if r.quick {
            " in **quick** mode (tiny sizes, few repetitions: a smoke run, not a measurement)"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "| machine | |\n|---|---|");
    let _ = writeln!(md, "| CPUs (nproc) | {} ({}) |", m.cpus, m.cpu_model);
    let _ = writeln!(md, "| memory | {:.1} GiB |", m.mem_total_gib);
    let _ = writeln!(md, "| kernel | {} |", m.kernel);
    let _ = writeln!(md, "| transparent hugepages | {} |", m.thp);
    let _ = writeln!(md, "| broker kill path | {} |", m.kill_path);
    let _ = writeln!(md, "| command | `{}` |\n", r.command);

    if let Some(floor) = &r.floor {
        md.push_str(&crate::floor::markdown(floor));
    }
    let _ = writeln!(md, "## Headline\n");
    let _ = writeln!(md, "Memory-back time, kill + wait ÷ reapd (gRPC), medians:\n");
    let _ = writeln!(md, "| state | victim | kill+wait ÷ reapd |\n|---|---|---|");
    for (state, size, text) in headline(r) {
        let _ = writeln!(md, "| {} | {} | {} |", state.name(), size, text);
    }
    let _ = writeln!(
        md,
        "\nBroker overhead, p50 against the same syscalls in-process: KillAndReap of a 1 MiB victim {:.0} µs over gRPC and {:.0} µs over varlink vs {:.0} µs in-process ({:.1}× and {:.1}×); CheckPermission {:.0} µs (gRPC) and {:.0} µs (varlink) vs {:.0} µs in-process.\n",
        r.kill_grpc_us.p50,
        r.kill_varlink_us.p50,
        r.kill_inprocess_us.p50,
        r.kill_grpc_us.p50 / r.kill_inprocess_us.p50,
        r.kill_varlink_us.p50 / r.kill_inprocess_us.p50,
        r.check_grpc_us.p50,
        r.check_varlink_us.p50,
        r.check_inprocess_us.p50,
    );

    let _ = writeln!(md, "## 1. Memory back\n");
    let _ = writeln!(
        md,
        "Time from the method's first syscall until MemAvailable **plus the pages on per-CPU free lists** (`/proc/zoneinfo` pagesets `count:`) has grown by 95% of the victim's resident anonymous memory (RssAnon) *and* the victim's own RssAnon has fallen below 5% of it (so memory freed by another process on a shared machine cannot pass for the victim's), sampled in a tight loop (~50 µs sleep between samples). \
Milliseconds: **median** (p10–p90). Timeout {} ms. Victims run as uid 61000 and are spawned and fully touched before the window opens; \
within each (state, victim) block the methods alternate, each repetition starting with the next method.\n",
        fmt_ms(r.timeout_ms)
    );
    let _ = writeln!(md, "States: *running* — the victim runs normally; *starved* — the victim is SCHED_IDLE and one normal-priority spinner per CPU keeps every core busy; *frozen* — the victim is in a cgroup v1 freezer cgroup (FROZEN), which holds a killed task, so it cannot run its exit path.\n");
    let _ = writeln!(md, "Methods: *kill+wait* — kill(2) SIGKILL then waitpid, as systemd-oomd and earlyoom before 1.8 (Debian 12 ships 1.7) do (earlyoom 1.8 and later add process_mrelease: section 5); *in-process* — pidfd_open + pidfd_send_signal + process_mrelease by a privileged caller in the benchmark process itself (the physical limit); *reapd gRPC* — KillAndReap through the broker with the `reapd-client` async client over an already open connection; *reapd varlink* — the same call with `reapd_client::varlink` (blocking), target named by pid + start time, connection opened before the window.\n");
    let methods = methods_in(&r.memback);
    let cells = cells(&r.memback);
    let _ = write!(md, "| state | victim |");
    for mth in &methods {
        let _ = write!(md, " {} |", mth.short());
    }
    let _ = write!(md, "\n|---|---|");
    for _ in &methods {
        let _ = write!(md, "---|");
    }
    let _ = writeln!(md);
    for state in states_in(&r.memback) {
        for size in &r.sizes {
            let _ = write!(md, "| {} | {} |", state.name(), size);
            for mth in &methods {
                match cells.get(&(state, size.clone(), *mth)) {
                    Some(c) => {
                        let _ = write!(md, " {} |", fmt_cell(c, r.timeout_ms));
                    }
                    None => {
                        let _ = write!(md, " – |");
                    }
                }
            }
            let _ = writeln!(md);
        }
    }
    let _ = writeln!(
        md,
        "\nTime until the call returns (ms, median (p10–p90); kill+wait returns when waitpid does):\n"
    );
    let _ = write!(md, "| state | victim |");
    for mth in &methods {
        let _ = write!(md, " {} |", mth.short());
    }
    let _ = write!(md, "\n|---|---|");
    for _ in &methods {
        let _ = write!(md, "---|");
    }
    let _ = writeln!(md);
    for state in states_in(&r.memback) {
        for size in &r.sizes {
            let _ = write!(md, "| {} | {} |", state.name(), size);
            for mth in &methods {
                match cells.get(&(state, size.clone(), *mth)) {
                    Some(c) => {
                        let _ = write!(
                            md,
                            " {} ({}–{}) |",
                            fmt_ms(c.call.p50),
                            fmt_ms(c.call.p10),
                            fmt_ms(c.call.p90)
                        );
                    }
                    None => {
                        let _ = write!(md, " – |");
                    }
                }
            }
            let _ = writeln!(md);
        }
    }
    if plots {
        let _ = writeln!(md, "\n![memory-back time per method and state](memback.png)\n");
    }

    let _ = writeln!(md, "## 2. What the broker costs\n");
    let _ = writeln!(md, "Per call, microseconds. gRPC: the `reapd-client` async client over one open Unix-socket connection, sequential calls. In-process: the same work done by a privileged caller itself — for a kill, what the broker must do: pidfd_open, PIDFD_GET_INFO, one read() each of the target's status, stat, oom_score_adj and cgroup, then pidfd_send_signal(SIGKILL) + process_mrelease; for a check, pidfd_open + reading /proc/PID/status. Kill victims hold 1 MiB. The broker limits kills per caller uid (burst 64, 20/s), so gRPC and varlink kills come from unprivileged worker processes under distinct uids (61001… and 61101…), each within its burst. Varlink: `reapd_client::varlink` (blocking), target by pid + start time.\n");
    let _ = writeln!(
        md,
        "| call | n | p50 | p90 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|"
    );
    for (name, s) in [
        ("KillAndReap, reapd gRPC", &r.kill_grpc_us),
        ("kill + reap, in-process", &r.kill_inprocess_us),
        ("KillAndReap, reapd varlink", &r.kill_varlink_us),
        ("CheckPermission, reapd gRPC", &r.check_grpc_us),
        ("CheckPermission, reapd varlink", &r.check_varlink_us),
        ("check, in-process", &r.check_inprocess_us),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            s.n, s.p50, s.p90, s.p99, s.p999, s.max
        );
    }
    let _ = writeln!(md, "\nCheckPermission throughput: N connections, each calling in a closed loop; client and broker share the same {} CPUs.\n", m.cpus);
    let _ = writeln!(
        md,
        "| clients | calls/s | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|---|"
    );
    for p in &r.throughput {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            p.clients, p.calls_per_sec, p.latency_us.p50, p.latency_us.p99, p.latency_us.p999
        );
    }
    if plots {
        let _ = writeln!(
            md,
            "\n![CheckPermission throughput and latency against concurrency](throughput.png)\n"
        );
    }

    let f = &r.footprint;
    let _ = writeln!(md, "## 3. Footprint\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| idle RSS (fresh broker, after its first reply) | {:.1} MiB |",
        mib(f.idle_rss)
    );
    let _ = writeln!(
        md,
        "| RSS after {} CheckPermission calls (16 connections, then closed) | {:.1} MiB |",
        f.calls,
        mib(f.rss_after_calls)
    );
    let _ = writeln!(md, "| peak RSS (VmHWM) over those calls | {:.1} MiB |", mib(f.peak_rss));
    for (name, size) in &f.binaries {
        let _ = writeln!(md, "| binary size: {name} | {:.1} MiB |", mib(*size));
    }
    let _ = writeln!(
        md,
        "| start to first reply (spawn → first answered GetCapabilities; binary in page cache) | {} ms median ({}–{}, n={}) |",
        fmt_ms(f.cold_start_ms.p50),
        fmt_ms(f.cold_start_ms.p10),
        fmt_ms(f.cold_start_ms.p90),
        f.cold_start_ms.n
    );

    let _ = writeln!(md, "\n## 4. Scale\n");
    let _ = writeln!(md, "Decision cost against policy size: CheckPermission over gRPC (sequential, one connection) on a broker started with `--policy` holding N rules shaped like per-team grants (distinct caller uid, target uid range, cgroup each; see `policy_text` in bench/src/overhead.rs), plus the kill(2) rule that answers the benchmark's root caller.\n");
    let _ = writeln!(
        md,
        "| rules | CheckPermission p50 µs | p90 µs | p99 µs | broker start to first reply |\n|---|---|---|---|---|"
    );
    for p in &r.policy {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {} ms |",
            p.rules,
            p.check_us.p50,
            p.check_us.p90,
            p.check_us.p99,
            fmt_ms(p.start_ms)
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "Idle connections held (each a real gRPC connection that made one call) against the broker's RSS; broker started with `--max-connections 20000 --max-connections-per-uid 20000 --idle-timeout-secs 3600`; the steps stop below what RLIMIT_NOFILE allows (see the notes).\n");
    let _ = writeln!(md, "| idle connections | broker RSS | per connection |\n|---|---|---|");
    let base = r.scale.first().map(|p| p.rss_bytes).unwrap_or(0);
    let base_n = r.scale.first().map(|p| p.connections).unwrap_or(0);
    for p in &r.scale {
        let per = if p.connections > base_n {
            format!(
                "{:.1} KiB",
                (p.rss_bytes as f64 - base as f64) / 1024.0 / (p.connections - base_n) as f64
            )
        } else {
            "–".into()
        };
        let _ = writeln!(md, "| {} | {:.1} MiB | {} |", p.connections, mib(p.rss_bytes), per);
    }
    if plots {
        let _ = writeln!(md, "\n![broker RSS against idle connections](scale.png)\n");
    }

    if !r.notes.is_empty() {
        let _ = writeln!(md, "\n## Notes\n");
        if r.notes.iter().any(|n| n.starts_with('†')) {
            let _ = writeln!(
                md,
                "Notes marked † were written after reading this run's numbers (`reapd-bench report --note …`); a new run of bench/run.sh drops them.\n"
            );
        }
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    md
}

/// Axis labels without a pointless ".0".
fn axis_number(v: f64) -> String {
    if v >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

const COLORS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn method_color(m: Method) -> RGBColor {
    match m {
        Method::KillWait => COLORS[0],
        Method::InProcess => COLORS[1],
        Method::Grpc => COLORS[2],
        Method::Varlink => COLORS[3],
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// The series legend, boxed, where the data leaves room.
pub fn legend_box<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    at: SeriesLabelPosition,
) -> PlotResult {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The label of a category axis (categories at 0, 1, 2, ...): the name at
/// a whole-number tick, nothing between.
pub fn category_label(names: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 0.01 && i >= 0.0 {
        names.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

/// Memory-back time per method, one panel per state, log scale; timed-out
/// trials are drawn at the timeout line.
pub fn plot_memback(r: &Results, path: &Path) -> PlotResult {
    let states = states_in(&r.memback);
    let methods = methods_in(&r.memback);
    let root = BitMapBackend::new(path, (560 * states.len().max(1) as u32, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, states.len().max(1)));
    let cells = cells(&r.memback);
    let lo = r
        .memback
        .iter()
        .filter_map(|t| t.back_ms)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, 1.0)
        / 2.0;
    let hi = r.timeout_ms * 2.0;
    let n = r.sizes.len();
    for (panel, state) in panels.iter().zip(&states) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("memory back: {}", state.name()), ("sans-serif", 22))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())?;
        let sizes = r.sizes.clone();
        chart
            .configure_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| category_label(&sizes, *x))
            .y_desc("ms until 95% back (log)")
            .y_label_formatter(&|v| axis_number(*v))
            .disable_x_mesh()
            .draw()?;
        chart.draw_series(LineSeries::new(
            [(-0.5, r.timeout_ms), (n as f64 - 0.5, r.timeout_ms)],
            BLACK.mix(0.4),
        ))?;
        for (mi, &method) in methods.iter().enumerate() {
            let color = method_color(method);
            let off = (mi as f64 - (methods.len() as f64 - 1.0) / 2.0) * 0.18;
            let mut pts = Vec::new();
            let mut bars = Vec::new();
            for (si, size) in r.sizes.iter().enumerate() {
                let x = si as f64 + off;
                if let Some((med, _)) = median_with_timeouts(&r.memback, *state, size, method, r.timeout_ms) {
                    pts.push((x, med));
                    if let Some(c) = cells.get(&(*state, size.clone(), method)) {
                        if c.back.n > 0 {
                            let top = if c.timeouts > 0 { r.timeout_ms } else { c.back.p90 };
                            bars.push((x, c.back.p10.min(med), med, top.max(med)));
                        }
                    }
                }
            }
            chart.draw_series(
                bars.iter()
                    .map(|&(x, a, m, b)| ErrorBar::new_vertical(x, a, m, b, color.stroke_width(2), 8)),
            )?;
            chart
                .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 5, color.filled())))?
                .label(method.short())
                .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
        }
        // Lower right: the timed-out points sit on the timeout line at the top.
        legend_box(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    root.present()?;
    Ok(())
}

pub fn plot_throughput(r: &Results, path: &Path) -> PlotResult {
    if r.throughput.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let maxc = r.throughput.iter().map(|p| p.clients).max().unwrap_or(1) as f64 * 1.5;
    let maxt = r.throughput.iter().map(|p| p.calls_per_sec).fold(0.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&left)
        .caption("CheckPermission throughput", ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d((0.7f64..maxc).log_scale(), 0f64..maxt.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("concurrent clients")
        .y_desc("calls/s")
        .x_label_formatter(&|v| axis_number(*v))
        .y_label_formatter(&|v| axis_number(*v))
        .draw()?;
    let pts: Vec<(f64, f64)> = r
        .throughput
        .iter()
        .map(|p| (p.clients as f64, p.calls_per_sec))
        .collect();
    chart.draw_series(LineSeries::new(pts.clone(), COLORS[2].stroke_width(2)))?;
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, COLORS[2].filled())))?;

    let maxl = r.throughput.iter().map(|p| p.latency_us.p99).fold(0.0, f64::max) * 2.0;
    let minl = r
        .throughput
        .iter()
        .map(|p| p.latency_us.p50)
        .fold(f64::INFINITY, f64::min)
        / 2.0;
    let mut chart = ChartBuilder::on(&right)
        .caption("CheckPermission latency", ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d((0.7f64..maxc).log_scale(), (minl.max(1.0)..maxl.max(10.0)).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("concurrent clients")
        .y_desc("µs (log)")
        .x_label_formatter(&|v| axis_number(*v))
        .y_label_formatter(&|v| axis_number(*v))
        .draw()?;
    for (name, color, f) in [
        (
            "p50",
            COLORS[2],
            (|p: &ConcurrencyPoint| p.latency_us.p50) as fn(&ConcurrencyPoint) -> f64,
        ),
        ("p99", COLORS[0], |p: &ConcurrencyPoint| p.latency_us.p99),
    ] {
        let pts: Vec<(f64, f64)> = r.throughput.iter().map(|p| (p.clients as f64, f(p))).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    legend_box(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

pub fn plot_scale(r: &Results, path: &Path) -> PlotResult {
    if r.scale.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (700, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let maxc = r.scale.iter().map(|p| p.connections).max().unwrap_or(1) as f64 * 1.5;
    let maxr = r.scale.iter().map(|p| mib(p.rss_bytes)).fold(0.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("broker RSS against idle connections", ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d((0.7f64..maxc).log_scale(), 0f64..maxr.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("idle connections")
        .y_desc("RSS MiB")
        .x_label_formatter(&|v| axis_number(*v))
        .y_label_formatter(&|v| axis_number(*v))
        .draw()?;
    let pts: Vec<(f64, f64)> = r
        .scale
        .iter()
        .map(|p| (p.connections as f64, mib(p.rss_bytes)))
        .collect();
    chart.draw_series(LineSeries::new(pts.clone(), COLORS[1].stroke_width(2)))?;
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, COLORS[1].filled())))?;
    root.present()?;
    Ok(())
}

/// Registers a TrueType font for plot text; plotters' ab_glyph backend
/// needs one given as bytes. DejaVu Sans is looked for where Debian and
/// Fedora put it; without one, the plots are skipped and the report says so.
pub fn load_font() -> Option<String> {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    for path in candidates {
        if let Ok(bytes) = std::fs::read(path) {
            // Leaked once: plotters keeps a 'static reference for the
            // process's life.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Some(path.to_string());
            }
        }
    }
    None
}
