// SPDX-License-Identifier: MIT OR Apache-2.0
//! `reapd-bench`: measures what reaping through reapd buys (memory back
//! sooner for starved and frozen victims) and what it costs (per-call
//! overhead, footprint, scale), and writes docs/benchmarks.md and plots.
//!
//! Run through bench/run.sh; needs root (victims under other uids, the
//! cgroup v1 freezer, SCHED_IDLE, process_mrelease).

mod broker;
mod floor;
mod lmkplot;
mod memback;
mod overhead;
mod probe;
mod report;
mod stats;
mod sys;
mod victim;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use reapd_client::{Client, Target};

use crate::broker::{Broker, RunDir};
use crate::memback::{Method, State};
use crate::report::{Footprint, Machine, Results};
use crate::stats::summarize;
use crate::victim::{Memory, Victim, VICTIM_UID};

#[derive(Debug, Parser)]
#[command(name = "reapd-bench", about = "Benchmarks for reapd")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every benchmark and write the report and plots.
    Run {
        /// The broker binary to measure.
        #[arg(long, default_value = "target/release/reapd")]
        reapd: PathBuf,
        /// Where benchmarks.md and the PNGs go.
        #[arg(long, default_value = "docs")]
        out: PathBuf,
        /// Scratch space for the file-backed victim's file (on disk, not
        /// tmpfs, so its pages are ordinary page cache).
        #[arg(long, default_value = "target/reapd-bench")]
        scratch: PathBuf,
        /// Tiny sizes and few repetitions: a smoke run, not a measurement.
        #[arg(long)]
        quick: bool,
        /// Memory-back repetitions per method, state and size.
        #[arg(long)]
        reps: Option<usize>,
        /// The command line to print in the report.
        #[arg(long, default_value = "bench/run.sh")]
        command_line: String,
        /// Another broker binary for the floor section, as LABEL=PATH
        /// (repeatable), measured in the same run (e.g. before=/tmp/reapd).
        #[arg(long)]
        compare: Vec<String>,
    },
    /// Only the floor benchmark (section 0): bare tonic and JSON echoes,
    /// the in-process syscalls and each broker, interleaved; writes
    /// OUT/floor.md and OUT/floor.json.
    Floor {
        #[arg(long, default_value = "target/release/reapd")]
        reapd: PathBuf,
        #[arg(long, default_value = "target/reapd-bench")]
        out: PathBuf,
        /// As for `run --compare`.
        #[arg(long)]
        compare: Vec<String>,
        #[arg(long)]
        quick: bool,
        /// A reading of this run's numbers, added to the section marked †
        /// (repeatable).
        #[arg(long)]
        note: Vec<String>,
    },
    /// (internal) The bare tonic and JSON echo servers of the floor.
    FloorServer {
        #[arg(long)]
        grpc: PathBuf,
        #[arg(long)]
        varlink: PathBuf,
        /// Before answering a CheckPermission, make the in-process check's
        /// syscalls on its target (the joint floor).
        #[arg(long)]
        syscalls: bool,
    },
    /// (internal) The floor's in-process check, `count` times (for strace).
    InprocessCheck {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        count: usize,
    },
    /// Rewrite the report and plots from a run's raw results (results.json)
    /// without measuring again.
    Report {
        #[arg(long, default_value = "target/reapd-bench/results.json")]
        raw: PathBuf,
        #[arg(long, default_value = "docs")]
        out: PathBuf,
        /// Extra notes for the report (repeatable).
        #[arg(long)]
        note: Vec<String>,
    },
    /// Plot bench/lmk_side_by_side.py's --json output (reapd-lmk vs
    /// earlyoom vs the kernel OOM killer) as a PNG.
    LmkPlot {
        #[arg(long)]
        json: PathBuf,
        #[arg(long, default_value = "docs/lmk_side_by_side.png")]
        out: PathBuf,
    },
    /// (internal) A victim: touch memory, print "ready", wait.
    Victim {
        #[arg(long)]
        bytes: usize,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// (internal) Keep one core busy.
    Spin,
    /// (internal) KillAndReap the given victims as the current uid, printing µs.
    WorkerKill {
        #[arg(long)]
        socket: PathBuf,
        /// The victims, comma-separated pids of this uid.
        #[arg(long, value_delimiter = ',')]
        pids: Vec<i32>,
        /// Use varlink (the socket is then the varlink socket).
        #[arg(long)]
        varlink: bool,
    },
    /// (internal) CHECKS CheckPermission calls over CLIENTS gRPC
    /// connections against SOCKET, on the benchmark's own pid (a footprint
    /// soak against a broker started by hand).
    Soak {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        checks: usize,
        #[arg(long, default_value_t = 16)]
        clients: usize,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Victim { bytes, file } => victim::victim_main(bytes, file.as_deref()),
        Cmd::Spin => victim::spin_main(),
        Cmd::Report { raw, out, note } => rewrite_report(&raw, &out, note),
        Cmd::LmkPlot { json, out } => lmkplot::plot(&json, &out),
        Cmd::WorkerKill { socket, pids, varlink } => overhead::worker_kill_main(&socket, &pids, varlink),
        Cmd::Soak {
            socket,
            checks,
            clients,
        } => soak(&socket, checks, clients),
        Cmd::Run {
            reapd,
            out,
            scratch,
            quick,
            reps,
            command_line,
            compare,
        } => run(&reapd, &out, &scratch, quick, reps, command_line, &compare),
        Cmd::Floor {
            reapd,
            out,
            compare,
            quick,
            note,
        } => floor_only(&reapd, &out, &compare, quick, note),
        Cmd::FloorServer {
            grpc,
            varlink,
            syscalls,
        } => floor::server_main(&grpc, &varlink, syscalls),
        Cmd::InprocessCheck { pid, count } => floor::inprocess_main(pid, count),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("reapd-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn machine(kill_path: String) -> Machine {
    let cpuinfo = read_trim("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_total = read_trim("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let uname = rustix::system::uname();
    Machine {
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model,
        mem_total_gib: mem_total / 1024.0 / 1024.0,
        kernel: format!(
            "{} {}",
            uname.release().to_string_lossy(),
            uname.version().to_string_lossy()
        ),
        thp: read_trim("/sys/kernel/mm/transparent_hugepage/enabled"),
        kill_path,
    }
}

/// A file for the private-file-mapping victim, written once.
fn scratch_file(dir: &Path, bytes: usize) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("victim-{bytes}.bin"));
    if std::fs::metadata(&path)
        .map(|m| m.len() as usize == bytes)
        .unwrap_or(false)
    {
        return Ok(path);
    }
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_all()?;
    // The victim runs as an unprivileged uid and only needs to read it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok(path)
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn run(
    reapd: &Path,
    out: &Path,
    scratch: &Path,
    quick: bool,
    reps: Option<usize>,
    command: String,
    compare: &[String],
) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        anyhow::bail!("run as root: victims run under other uids, and the freezer and process_mrelease need privilege");
    }
    if !reapd.exists() {
        anyhow::bail!(
            "{} not found: build it first (cargo build --release -p reapd)",
            reapd.display()
        );
    }
    let started = Instant::now();
    let started_utc = utc_now();
    let mut notes = Vec::new();
    // Up to 10,000 idle connections plus their client ends live here and in
    // the broker (which inherits the limit).
    let want = 65536;
    if let Err(e) = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(want),
            maximum: Some(want),
        },
    ) {
        notes.push(format!("could not raise RLIMIT_NOFILE to {want}: {e}"));
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = RunDir::create("run")?;
    let big_caps: Vec<String> = [
        "--max-connections",
        "20000",
        "--max-connections-per-uid",
        "20000",
        "--idle-timeout-secs",
        "3600",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // 0. The floor, first: the machine is quietest at the start.
    eprintln!("floor");
    let floor = floor::run(&floor::Config::new(quick), &subjects(reapd, compare)?, &dir.0)?;

    // The broker for memory back, per-call overhead and throughput.
    let main_broker = rt.block_on(Broker::start(reapd, &dir.0, "main", &big_caps))?;
    let client = rt.block_on(Client::connect(&main_broker.socket))?;
    let caps = rt.block_on(client.clone().capabilities())?;
    if !caps.process_mrelease {
        notes.push("the kernel lacks process_mrelease: reapd can only kill, and the in-process method fails".into());
    }

    // 1. Memory back.
    let (sizes, reps, timeout) = if quick {
        (
            vec![("16 MiB".to_string(), Memory::Anon(16 << 20))],
            reps.unwrap_or(1),
            Duration::from_millis(1500),
        )
    } else {
        let file = scratch_file(scratch, 1 << 30)?;
        (
            vec![
                ("256 MiB".to_string(), Memory::Anon(256 << 20)),
                ("1 GiB".to_string(), Memory::Anon(1 << 30)),
                ("4 GiB".to_string(), Memory::Anon(4 << 30)),
                (
                    "1 GiB private file map".to_string(),
                    Memory::PrivateFile {
                        path: file,
                        bytes: 1 << 30,
                    },
                ),
            ],
            reps.unwrap_or(5),
            Duration::from_secs(5),
        )
    };
    let freezer = match probe::FreezerCgroup::create(&format!("reapd-bench-{}", std::process::id())) {
        Ok(f) => Some(f),
        Err(e) => {
            notes.push(format!("frozen state skipped: {e}"));
            None
        }
    };
    let cfg = memback::Config {
        sizes: sizes.clone(),
        states: vec![State::Running, State::Starved, State::Frozen],
        methods: vec![Method::KillWait, Method::InProcess, Method::Grpc, Method::Varlink],
        reps,
        timeout,
        cpus,
    };
    let mut ctx = memback::Ctx {
        rt: &rt,
        client: client.clone(),
        varlink: main_broker.varlink.clone(),
        sampler: probe::MemSampler::new()?,
        freezer,
    };
    let memback = memback::run(&cfg, &mut ctx)?;
    drop(ctx);

    // 2. Per-call overhead.
    let (n_check, kill_workers, kill_per_worker, conc, tput_dur) = if quick {
        (200, 2, 5, vec![1, 4], Duration::from_millis(300))
    } else {
        (20_000, 16, 62, vec![1, 4, 16, 64, 256], Duration::from_secs(3))
    };
    let target_victim = Victim::spawn(&Memory::Anon(overhead::TINY), Some(VICTIM_UID))?;
    let target = Target::pinned(target_victim.pid)?;
    eprintln!("overhead: CheckPermission");
    let check_grpc = rt.block_on(overhead::check_grpc(&main_broker.socket, target.clone(), n_check))?;
    let check_varlink = overhead::check_varlink(&main_broker.varlink, target.clone(), n_check)?;
    let check_inproc = overhead::check_inprocess(target_victim.pid, n_check)?;
    eprintln!("overhead: KillAndReap");
    let kill_grpc = overhead::kill_grpc(
        &main_broker.socket,
        kill_workers,
        kill_per_worker,
        false,
        VICTIM_UID + 1,
        None,
    )?;
    let kill_varlink = overhead::kill_grpc(
        &main_broker.varlink,
        kill_workers,
        kill_per_worker,
        true,
        VICTIM_UID + 101,
        None,
    )?;
    let kill_inproc = overhead::kill_inprocess(kill_workers * kill_per_worker, None)?;
    let mut throughput = Vec::new();
    for c in conc {
        let p = rt.block_on(overhead::throughput(&main_broker.socket, target.clone(), c, tput_dur))?;
        eprintln!(
            "throughput: {c} clients: {:.0} calls/s, p50 {:.0} µs, p99 {:.0} µs",
            p.calls_per_sec, p.latency_us.p50, p.latency_us.p99
        );
        throughput.push(p);
    }
    drop(main_broker);

    // Decision cost against policy size.
    let policy_sizes: Vec<usize> = if quick {
        vec![10, 100]
    } else {
        vec![10, 100, 1000, 10_000]
    };
    let policy = rt.block_on(overhead::policy_cost(
        reapd,
        &dir.0,
        target.clone(),
        &policy_sizes,
        if quick { 200 } else { 5000 },
    ))?;

    // 3. Footprint, on a fresh broker with the default caps.
    let calls = if quick { 1000 } else { 100_000 };
    let fresh = rt.block_on(Broker::start(reapd, &dir.0, "footprint", &[]))?;
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss = fresh.rss();
    eprintln!("footprint: {calls} calls");
    rt.block_on(overhead::many_calls(&fresh.socket, target, calls, 16))?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_calls = fresh.rss();
    let peak_rss = probe::status_bytes(fresh.pid(), "VmHWM").unwrap_or(0);
    drop(fresh);
    let mut cold = Vec::new();
    for i in 0..if quick { 2 } else { 15 } {
        let b = rt.block_on(Broker::start(reapd, &dir.0, &format!("cold{i}"), &[]))?;
        cold.push(b.start_to_first_reply.as_secs_f64() * 1e3);
    }
    let mut binaries = Vec::new();
    let bin_dir = reapd.parent().unwrap_or(Path::new("."));
    for name in ["reapd", "reapctl"] {
        if let Ok(m) = std::fs::metadata(bin_dir.join(name)) {
            binaries.push((name.to_string(), m.len()));
        }
    }
    target_victim.finish();

    // 4. Scale: idle connections against RSS.
    // The broker holds two descriptors per connection (the socket and the
    // peer's pidfd), and inherits our RLIMIT_NOFILE: stay below it.
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let fit = usize::try_from(nofile.saturating_sub(256) / 2).unwrap_or(usize::MAX);
    let mut steps: Vec<usize> = if quick {
        vec![1, 10]
    } else {
        vec![1, 10, 100, 1000, 3000, 10_000]
    };
    if steps.iter().any(|&s| s > fit) {
        steps.retain(|&s| s <= fit);
        steps.push(fit);
        notes.push(format!(
            "scale: RLIMIT_NOFILE is {nofile} here and could not be raised, and the broker holds two descriptors per connection, so the last step is {fit} connections"
        ));
    }
    let scale_broker = rt.block_on(Broker::start(reapd, &dir.0, "scale", &big_caps))?;
    let scale = rt.block_on(overhead::idle_connections(&scale_broker, &steps, &mut notes))?;
    drop(scale_broker);

    notes.push(
        "Start from socket activation is not measured separately: the spawn-to-first-reply figure is the same path plus bind(2).".into(),
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        notes.push(format!(
            "Load average at the end of the run: {} (other work on the machine shows up as spread).",
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ));
    }

    let results = Results {
        machine: machine(caps.kill_path.to_string()),
        command,
        quick,
        started_utc,
        total_secs: started.elapsed().as_secs_f64(),
        timeout_ms: timeout.as_secs_f64() * 1e3,
        sizes: sizes.iter().map(|(l, _)| l.clone()).collect(),
        memback,
        check_grpc_us: summarize(&check_grpc),
        check_inprocess_us: summarize(&check_inproc),
        check_varlink_us: summarize(&check_varlink),
        kill_varlink_us: summarize(&kill_varlink),
        policy,
        kill_grpc_us: summarize(&kill_grpc),
        kill_inprocess_us: summarize(&kill_inproc),
        throughput,
        footprint: Footprint {
            idle_rss,
            calls,
            rss_after_calls,
            peak_rss,
            binaries,
            cold_start_ms: summarize(&cold),
        },
        scale,
        notes,
        floor: Some(floor),
    };
    write_outputs(&results, out, scratch)
}

fn soak(socket: &Path, checks: usize, clients: usize) -> anyhow::Result<()> {
    let target = Target::pinned(std::process::id() as i32)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(overhead::many_calls(socket, target, checks, clients))
}

/// The brokers of the floor section: `reapd` itself, then each LABEL=PATH.
fn subjects(reapd: &Path, compare: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = vec![("reapd".to_string(), reapd.to_path_buf())];
    for c in compare {
        let (label, path) = c
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--compare wants LABEL=PATH, got {c:?}"))?;
        out.push((label.to_string(), PathBuf::from(path)));
    }
    Ok(out)
}

fn floor_only(reapd: &Path, out: &Path, compare: &[String], quick: bool, notes: Vec<String>) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        anyhow::bail!("run as root: the kill workers run under other uids");
    }
    let dir = RunDir::create("floor")?;
    let mut results = floor::run(&floor::Config::new(quick), &subjects(reapd, compare)?, &dir.0)?;
    // Marked: readings of the numbers, written before seeing this run's.
    results.notes.extend(notes.into_iter().map(|n| format!("† {n}")));
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("floor.json"), serde_json::to_string_pretty(&results)?)?;
    let section = floor::markdown(&results);
    std::fs::write(out.join("floor.md"), &section)?;
    eprintln!("wrote {}", out.join("floor.md").display());
    // A full report in OUT gets this section in place of its own, marked as
    // measured apart from the rest.
    let report = out.join("benchmarks.md");
    if let Ok(text) = std::fs::read_to_string(&report) {
        let section = format!(
            "{}\n_Section 0 measured on its own by `reapd-bench floor` on {}; the sections below are from the date above._\n\n",
            section.trim_end(),
            utc_now()
        );
        let start = text
            .find("## 0. Against the floor")
            .or_else(|| text.find("## Headline"));
        let end = text.find("## Headline");
        if let (Some(start), Some(end)) = (start, end) {
            std::fs::write(&report, format!("{}{section}{}", &text[..start], &text[end..]))?;
            eprintln!("updated section 0 of {}", report.display());
        }
    }
    Ok(())
}

fn rewrite_report(raw: &Path, out: &Path, notes: Vec<String>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(raw).map_err(|e| anyhow::anyhow!("reading {}: {e}", raw.display()))?;
    let mut results: Results = serde_json::from_str(&text)?;
    // Marked: these are readings of the numbers, written after the run.
    results.notes.extend(notes.into_iter().map(|n| format!("† {n}")));
    let scratch = raw.parent().unwrap_or(Path::new("."));
    write_outputs(&results, out, scratch)
}

fn write_outputs(results: &Results, out: &Path, scratch: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::create_dir_all(scratch)?;
    std::fs::write(scratch.join("results.json"), serde_json::to_string_pretty(results)?)?;
    let mut results = results.clone();
    let plots = match report::load_font() {
        Some(_) => {
            let mut ok = true;
            for (name, f) in [
                (
                    "memback.png",
                    report::plot_memback as fn(&Results, &Path) -> Result<(), Box<dyn std::error::Error>>,
                ),
                ("throughput.png", report::plot_throughput),
                ("scale.png", report::plot_scale),
            ] {
                if let Err(e) = f(&results, &out.join(name)) {
                    results.notes.push(format!("plot {name} failed: {e}"));
                    ok = false;
                }
            }
            ok
        }
        None => {
            results
                .notes
                .push("no TrueType font (DejaVu Sans) found: plots skipped".into());
            false
        }
    };
    let mut md = report::markdown(&results, plots);
    // bench/run.sh runs bench/lmk_side_by_side.py first; its fragment (the
    // table, the command, the plot) becomes a section before the notes.
    if let Ok(lmk) = std::fs::read_to_string(out.join("lmk_side_by_side.md")) {
        let at = md.find("\n## Notes").unwrap_or(md.len());
        md.insert_str(
            at,
            &format!("\n## 5. Low-memory killers side by side\n\n{}\n", lmk.trim_end()),
        );
    }
    std::fs::write(out.join("benchmarks.md"), md)?;
    eprintln!("wrote {}", out.join("benchmarks.md").display());
    for (state, size, text) in report::headline(&results) {
        eprintln!("headline: {} {size}: kill+wait / reapd = {text}", state.name());
    }
    Ok(())
}
