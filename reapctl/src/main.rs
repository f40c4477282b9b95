// SPDX-License-Identifier: MIT OR Apache-2.0
//! `reapctl`: kill-and-reap, check and inspect through the reapd broker.
//!
//! Exit codes: [`EXIT_STATUS`] (also the man page's EXIT STATUS section).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use reapd_client::varlink;
use reapd_client::{
    blocking::Client, Candidates, CandidatesQuery, Capabilities, Error, Group, GroupReport, KillEvent, KillOptions,
    KillReport, Permission, Target, DEFAULT_SOCKET,
};
use reapd_docgen::{Block, Manual, Section};
use serde::Serialize;

/// The exit codes, as reapctl(1) documents them; `exit_code_of` maps errors
/// onto them.
const EXIT_STATUS: Section = Section {
    title: "EXIT STATUS",
    body: &[
        Block::Item("0", "Success (for check: the kill would be allowed)."),
        Block::Item("1", "check only: the kill would be refused."),
        Block::Item("2", "Usage error (including --pidfd-of without --varlink)."),
        Block::Item("3", "Cannot reach the broker."),
        Block::Item("4", "Invalid argument."),
        Block::Item("5", "No such process."),
        Block::Item(
            "6",
            "Permission denied: the broker's policy refused (with --json, the decision kind and rule are printed).",
        ),
        Block::Item(
            "7",
            "The process changed: its start time is not --start-time (the pid was reused).",
        ),
        Block::Item("8", "Rate limited."),
        Block::Item(
            "9",
            "No answer within --timeout (the broker may still have acted: a kill may have happened).",
        ),
        Block::Item("10", "Any other broker error."),
    ],
};

const MANUAL: Manual<'static> = Manual {
    section: "1",
    extra: &[
        Section {
            title: "TRANSPORTS",
            body: &[
                Block::Para("reapctl speaks gRPC to /run/reapd/grpc.sock by default and varlink (io.reapd.Reaper) to /run/reapd/io.reapd.Reaper with --varlink. Both give the same typed results; only varlink carries file descriptors, so --pidfd-of needs --varlink."),
                Block::Para("The broker identifies the caller from the kernel (SO_PEERCRED, the caller's pidfd), never from anything the caller sends; run reapctl as the user whose rights apply."),
            ],
        },
        EXIT_STATUS,
    ],
    see_also: &["reapd(8)", "process_mrelease(2)", "pidfd_open(2)"],
};

#[derive(Debug, Parser)]
#[command(
    name = "reapctl",
    version,
    about = "Kill a process and reap its memory through the reapd broker"
)]
struct Args {
    /// The broker's socket [default: /run/reapd/grpc.sock, or
    /// /run/reapd/io.reapd.Reaper with --varlink].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Speak varlink (io.reapd.Reaper) instead of gRPC.
    #[arg(long, global = true)]
    varlink: bool,
    /// Print results as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Give up on a call after SECONDS (0: wait however long it takes); a
    /// kill also waits for its --grace, --reap-delay and --wait.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Kill PID (or a whole cgroup) with SIGKILL and reap its memory at once.
    Kill {
        #[arg(
            required_unless_present_any = ["pidfd_of", "cgroup", "unit"],
            conflicts_with_all = ["pidfd_of", "cgroup", "unit"]
        )]
        /// The process to kill (or --pidfd-of, --cgroup, --unit).
        pid: Option<i32>,
        /// Kill every process of this cgroup (an absolute path as the broker
        /// sees it), all or nothing, and reap them.
        #[arg(long, value_name = "PATH", conflicts_with_all = ["pidfd_of", "unit", "start_time", "grace"])]
        cgroup: Option<String>,
        /// Kill every process of this systemd unit's cgroup (looked up only
        /// where root names cgroups), all or nothing.
        #[arg(long, value_name = "UNIT", conflicts_with_all = ["pidfd_of", "start_time", "grace"])]
        unit: Option<String>,
        /// SIGTERM first; SIGKILL and reap only if still alive after MS
        /// milliseconds (at most 10000).
        #[arg(long, value_name = "MS")]
        grace: Option<u64>,
        /// After SIGKILL, let the process run its exit path for MS
        /// milliseconds (robust futexes reach their waiters), then reap
        /// whatever is left [default: the policy's reap-delay-ms].
        #[arg(long, value_name = "MS")]
        reap_delay: Option<u64>,
        /// Name the target by a pidfd: open it here, check --start-time
        /// against the pinned process, and pass it with the call (varlink
        /// only). The broker then acts on exactly that process.
        #[arg(long, value_name = "PID")]
        pidfd_of: Option<i32>,
        /// Refuse unless PID still started at this time (field 22 of /proc/PID/stat).
        #[arg(long)]
        start_time: Option<u64>,
        /// Also wait up to MS milliseconds for the process to be gone.
        #[arg(long, value_name = "MS")]
        wait: Option<u64>,
    },
    /// Would the broker kill PID for me? No side effect.
    Check {
        /// The process to ask about.
        pid: i32,
        /// Answer only if PID still started at this time (field 22 of
        /// /proc/PID/stat, clock ticks since boot); a reused pid fails with
        /// exit status 7 instead of answering for another process.
        #[arg(long)]
        start_time: Option<u64>,
    },
    /// What the broker and the running kernel can do.
    Caps,
    /// The processes (and whole cgroups) I may kill now, largest first.
    Candidates {
        /// Rank by: unique (anon + swap), anon, rss, swap, oom_score, start_time.
        #[arg(long, default_value = "unique")]
        sort: reapd_client::SortKey,
        /// Entries per page (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Entries to skip (the previous page's next offset).
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Print kills as they happen: those of my own processes, or all that a
    /// `watch` grant (or root) lets me see. One line per kill (with --json,
    /// one JSON object per line). Runs until the broker stops, or N events.
    Watch {
        /// Exit after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// The broker's counters and latency histograms (root, or a `watch`
    /// grant). Always over varlink (io.systemd.Metrics): with --socket,
    /// also give --varlink.
    Stats {
        /// Print the Prometheus text format (for node_exporter's textfile
        /// collector) instead of a table.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
    },
}

/// `println!` that ends the program quietly when stdout is closed early
/// (`reapctl caps | head -1`) instead of panicking on EPIPE.
macro_rules! outln {
    ($($arg:tt)*) => {
        emit(&format!($($arg)*))
    };
}

fn emit(line: &str) {
    use std::io::Write;
    if let Err(err) = writeln!(std::io::stdout().lock(), "{line}") {
        if err.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("reapctl: cannot write to stdout: {err}");
        }
        std::process::exit(if err.kind() == std::io::ErrorKind::BrokenPipe {
            0
        } else {
            10
        });
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn exit_code_of(err: &Error) -> u8 {
    match err {
        Error::Connect { .. } => 3,
        Error::InvalidArgument { .. } => 4,
        Error::NotFound(_) => 5,
        Error::PermissionDenied(_) => 6,
        Error::ProcessChanged(_) => 7,
        Error::RateLimited { .. } => 8,
        Error::Timeout { .. } => 9,
        // Unsupported, Transport, Internal, and what later versions add.
        _ => 10,
    }
}

fn error_kind(err: &Error) -> &'static str {
    match err {
        Error::Connect { .. } => "connect",
        Error::InvalidArgument { .. } => "invalid_argument",
        Error::NotFound(_) => "not_found",
        Error::PermissionDenied(_) => "permission_denied",
        Error::ProcessChanged(_) => "process_changed",
        Error::RateLimited { .. } => "rate_limited",
        Error::Timeout { .. } => "timeout",
        _ => "other",
    }
}

/// `--json`: reapctl's documented output keeps snake_case keys, while the
/// API's types serialize with the varlink IDL's camelCase names.
fn print_json(value: &impl Serialize) {
    let value = snake_keys(serde_json::to_value(value).expect("reports serialize"));
    outln!("{}", serde_json::to_string_pretty(&value).expect("reports serialize"));
}

/// `killToReapNs` -> `kill_to_reap_ns`, in every object at any depth.
fn snake_keys(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, value)| {
                    let mut snake = String::with_capacity(key.len() + 4);
                    for c in key.chars() {
                        if c.is_ascii_uppercase() {
                            snake.push('_');
                            snake.push(c.to_ascii_lowercase());
                        } else {
                            snake.push(c);
                        }
                    }
                    (snake, snake_keys(value))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(snake_keys).collect()),
        other => other,
    }
}

/// The transport a run speaks; both give the same typed results.
enum Backend {
    Grpc(Box<Client>),
    Varlink(varlink::Client),
}

impl Backend {
    fn kill(&mut self, target: Target, options: KillOptions) -> Result<KillReport, Error> {
        match self {
            Backend::Grpc(c) => c.kill_and_reap_with(target, options),
            Backend::Varlink(c) => Ok(c.kill_and_reap_with(target, options)?),
        }
    }

    fn check(&mut self, target: Target) -> Result<Permission, Error> {
        match self {
            Backend::Grpc(c) => c.check_permission(target),
            Backend::Varlink(c) => Ok(c.check_permission(target)?),
        }
    }

    fn kill_cgroup(&mut self, group: Group, reap_delay: Option<Duration>) -> Result<GroupReport, Error> {
        match self {
            Backend::Grpc(c) => c.kill_cgroup(group, reap_delay),
            Backend::Varlink(c) => Ok(c.kill_cgroup(group, reap_delay)?),
        }
    }

    fn candidates(&mut self, query: CandidatesQuery) -> Result<Candidates, Error> {
        match self {
            Backend::Grpc(c) => c.list_candidates(query),
            Backend::Varlink(c) => Ok(c.list_candidates(query)?),
        }
    }

    fn caps(&mut self) -> Result<Capabilities, Error> {
        match self {
            Backend::Grpc(c) => c.capabilities(),
            Backend::Varlink(c) => Ok(c.capabilities()?),
        }
    }
}

fn run(args: Args) -> Result<u8, Error> {
    let timeout = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    if let Command::Stats { prometheus } = args.command {
        let socket = match (&args.socket, args.varlink) {
            (Some(socket), true) => socket.clone(),
            _ => PathBuf::from(varlink::DEFAULT_SOCKET),
        };
        return stats(&socket, timeout, prometheus, args.json);
    }
    let mut client = if args.varlink {
        let socket = args.socket.as_deref().unwrap_or(Path::new(varlink::DEFAULT_SOCKET));
        match varlink::Client::connect_with_timeout(socket, timeout) {
            Ok(client) => Backend::Varlink(client),
            Err(err) => {
                report_error(args.json, "connect", &err.to_string());
                return Ok(3);
            }
        }
    } else {
        if matches!(args.command, Command::Kill { pidfd_of: Some(_), .. }) {
            eprintln!("reapctl: --pidfd-of needs --varlink: a pidfd can be passed over varlink only");
            return Ok(2);
        }
        Backend::Grpc(Box::new(Client::connect_with_timeout(
            args.socket.as_deref().unwrap_or(Path::new(DEFAULT_SOCKET)),
            timeout,
        )?))
    };
    if let Command::Watch { count } = args.command {
        return watch(client, count, args.json);
    }
    match args.command {
        Command::Watch { .. } | Command::Stats { .. } => unreachable!("handled above"),
        Command::Kill { cgroup: Some(_), .. } | Command::Kill { unit: Some(_), .. } => {
            let Command::Kill {
                cgroup,
                unit,
                reap_delay,
                ..
            } = args.command
            else {
                unreachable!("matched above")
            };
            let group = match (cgroup, unit) {
                (Some(path), _) => Group::Cgroup(path),
                (None, Some(unit)) => Group::Unit(unit),
                (None, None) => unreachable!("matched above"),
            };
            let report = client.kill_cgroup(group, reap_delay.map(Duration::from_millis))?;
            if args.json {
                print_json(&report);
            } else {
                outln!(
                    "{}: {} processes killed in {:.3} ms ({} pass{}), released {}",
                    report.cgroup,
                    report.members.len(),
                    report.kill_to_reap_ns as f64 / 1e6,
                    report.passes,
                    if report.passes == 1 { "" } else { "es" },
                    mib(report.bytes_released)
                );
                for m in &report.members {
                    if let Some(p) = Some(&m.process) {
                        outln!(
                            "  pid {} ({}, uid {}): {}, held {} anon",
                            p.pid,
                            p.comm,
                            p.uid,
                            m.outcome.as_str().replace('_', " "),
                            mib(m.memory_before.anon_bytes)
                        );
                    }
                }
                for p in &report.refused_newcomers {
                    outln!(
                        "  left alive (joined during the kill, not yours to kill): pid {} ({})",
                        p.pid,
                        p.comm
                    );
                }
            }
            Ok(0)
        }
        Command::Kill {
            pid,
            pidfd_of,
            start_time,
            wait,
            grace,
            reap_delay,
            ..
        } => {
            let target = match (pid, pidfd_of) {
                (_, Some(of)) => Target::pidfd_of(of, start_time)?,
                (Some(pid), None) => Target::pid(pid).start_time(start_time),
                (None, None) => unreachable!("clap requires a pid or --pidfd-of"),
            };
            let pid = pid.or(pidfd_of).unwrap_or_default();
            let options = KillOptions {
                wait_for_exit: wait.map(Duration::from_millis),
                grace: grace.map(Duration::from_millis),
                reap_delay: reap_delay.map(Duration::from_millis),
            };
            let report = client.kill(target, options)?;
            if args.json {
                print_json(&report);
            } else {
                let t = &report.target;
                let who = if t.pid == 0 {
                    format!("pid {pid}")
                } else {
                    format!("pid {} ({}, uid {})", t.pid, t.comm, t.uid)
                };
                let m = &report.memory_before;
                outln!(
                    "{who}: {} via {} in {:.3} ms (rule: {})",
                    report.outcome.as_str().replace('_', " "),
                    report.kill_path,
                    report.kill_to_reap_ns as f64 / 1e6,
                    report.rule
                );
                outln!(
                    "  held: {} anon, {} file, {} shmem, {} swap",
                    mib(m.anon_bytes),
                    mib(m.file_bytes),
                    mib(m.shmem_bytes),
                    mib(m.swap_bytes)
                );
                if m.hugetlb_bytes > 0 {
                    outln!("  hugetlb (not reaped): {}", mib(m.hugetlb_bytes));
                }
                outln!("  released: {}", mib(report.bytes_released));
                if !report.not_reaped_reason.is_empty() {
                    outln!("  note: {}", report.not_reaped_reason);
                }
                if wait.is_some() {
                    outln!("  exited: {}", if report.exited { "yes" } else { "not yet" });
                }
            }
            Ok(0)
        }
        Command::Check { pid, start_time } => {
            let permission = client.check(Target::pid(pid).start_time(start_time))?;
            if args.json {
                print_json(&permission);
            } else {
                let verdict = if permission.allowed { "allowed" } else { "refused" };
                outln!("pid {pid}: {verdict}: {}", permission.reason);
            }
            Ok(if permission.allowed { 0 } else { 1 })
        }
        Command::Candidates { sort, limit, offset } => {
            let page = client.candidates(CandidatesQuery {
                sort_by: sort,
                limit,
                offset,
            })?;
            if args.json {
                print_json(&page);
            } else {
                outln!(
                    "{} processes you may kill ({} shown), by {}:",
                    page.total,
                    page.processes.len(),
                    sort.as_str()
                );
                for c in &page.processes {
                    if let Some(p) = Some(&c.process) {
                        outln!(
                            "  {:>8} {:>10} anon+swap {:>5} oom_score  {} (uid {}, {})  rule {}",
                            p.pid,
                            mib(c.unique_bytes),
                            c.oom_score,
                            p.comm,
                            p.uid,
                            p.cgroup,
                            c.rule
                        );
                    }
                }
                if !page.cgroups.is_empty() {
                    outln!("whole cgroups you may kill:");
                    for g in &page.cgroups {
                        outln!(
                            "  {} ({} processes, {} anon+swap)",
                            g.cgroup,
                            g.processes,
                            mib(g.memory.anon_bytes + g.memory.swap_bytes)
                        );
                    }
                }
                if let Some(next) = page.next_offset {
                    outln!("more: --offset {next}");
                }
            }
            Ok(0)
        }
        Command::Caps => {
            let caps = client.caps()?;
            if args.json {
                print_json(&caps);
            } else {
                let yes = |b: bool| if b { "yes" } else { "no" };
                outln!("reapd {} on Linux {}", caps.broker_version, caps.kernel_release);
                outln!("  kill path:                  {}", caps.kill_path);
                outln!("  process_mrelease:           {}", yes(caps.process_mrelease));
                outln!("  PROCESS_MRELEASE_REAP_KILL: {}", yes(caps.reap_kill_flag));
                outln!("  PIDFD_GET_INFO:             {}", yes(caps.pidfd_get_info));
                outln!("  SO_PEERPIDFD:               {}", yes(caps.so_peerpidfd));
                outln!("  cgroup.kill:                {}", yes(caps.cgroup_kill));
                outln!("  CAP_KILL held:              {}", yes(caps.has_cap_kill));
                for note in &caps.notes {
                    outln!("  note: {note}");
                }
            }
            Ok(0)
        }
    }
}

/// `reapctl stats`: the broker's metrics as a table, JSON or Prometheus text.
fn stats(socket: &Path, timeout: Option<Duration>, prometheus: bool, json: bool) -> Result<u8, Error> {
    let mut client = match varlink::Client::connect_with_timeout(socket, timeout) {
        Ok(client) => client,
        Err(err) => {
            report_error(json, "connect", &err.to_string());
            return Ok(3);
        }
    };
    let metrics = client.metrics()?;
    if json {
        // Metric names and their field labels are the broker's own keys.
        outln!("{}", serde_json::to_string_pretty(&metrics).expect("metrics serialize"));
        return Ok(0);
    }
    let labels = |m: &varlink::Metric| {
        m.fields
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect::<Vec<_>>()
            .join(",")
    };
    if prometheus {
        // Families, in the order the broker lists them; histograms are the
        // families with _bucket/_count/_sum members.
        let families = client.describe_metrics()?;
        for (name, kind, description) in &families {
            let family = name.replace("io.reapd.", "reapd_").replace('.', "_");
            let histogram = description.contains("_bucket");
            let kind = if histogram { "histogram" } else { kind.as_str() };
            outln!("# HELP {family} {description}");
            outln!("# TYPE {family} {kind}");
            for m in &metrics {
                let base = m.name.replace("io.reapd.", "reapd_").replace('.', "_");
                let member = base == family
                    || (histogram
                        && ["_bucket", "_count", "_sum"]
                            .iter()
                            .any(|s| base == format!("{family}{s}")));
                if member {
                    let labels = labels(m);
                    if labels.is_empty() {
                        outln!("{base} {}", m.value);
                    } else {
                        outln!("{base}{{{labels}}} {}", m.value);
                    }
                }
            }
        }
        return Ok(0);
    }
    for m in &metrics {
        let labels = labels(m);
        let name = m.name.trim_start_matches("io.reapd.");
        if labels.is_empty() {
            outln!("{name:<40} {}", m.value);
        } else {
            outln!("{:<40} {}", format!("{name}{{{labels}}}"), m.value);
        }
    }
    Ok(0)
}

/// `reapctl watch`: prints events until the stream ends or `count` came.
fn watch(client: Backend, count: Option<u64>, json: bool) -> Result<u8, Error> {
    let print = |event: &KillEvent| {
        if json {
            let event = snake_keys(serde_json::to_value(event).expect("events serialize"));
            outln!("{}", serde_json::to_string(&event).expect("events serialize"));
            return;
        }
        if event.dropped > 0 {
            outln!("({} events dropped: this watcher read too slowly)", event.dropped);
        }
        let what = if event.kind == reapd_client::KillKind::Cgroup {
            format!("cgroup {}", event.cgroup)
        } else {
            "process".to_string()
        };
        let partial = if event.complete {
            ""
        } else {
            " (partial: not all victims shown)"
        };
        outln!(
            "#{} {what} killed by uid {} ({}, pid {}) under rule {}: {} released in {:.1} ms{partial}",
            event.sequence,
            event.requester.uid,
            event.requester.comm,
            event.requester.pid,
            event.rule,
            mib(event.bytes_released),
            event.kill_to_reap_ns as f64 / 1e6,
        );
        for v in &event.victims {
            if let Some(p) = Some(&v.process) {
                outln!(
                    "  pid {} {} (uid {}, {}): {}, {} anon before",
                    p.pid,
                    p.comm,
                    p.uid,
                    p.cgroup,
                    v.outcome,
                    mib(v.memory_before.anon_bytes)
                );
            }
        }
    };
    let mut seen = 0u64;
    let done = |seen: u64| count.is_some_and(|n| seen >= n);
    if done(0) {
        return Ok(0);
    }
    // Both transports give the same typed events; the varlink client gives
    // its connection to the stream.
    let mut grpc_client;
    let events: Box<dyn Iterator<Item = Result<KillEvent, Error>>> = match client {
        Backend::Grpc(c) => {
            grpc_client = c;
            Box::new(grpc_client.watch_kills()?)
        }
        Backend::Varlink(c) => Box::new(c.watch_kills()?.map(|e| e.map_err(Error::from))),
    };
    eprintln!("reapctl: watching kill events");
    for event in events {
        print(&event?);
        seen += 1;
        if done(seen) {
            break;
        }
    }
    Ok(0)
}

fn main() -> ExitCode {
    // `reapctl generate-docs DIR`: the man pages and completions (packaging).
    if let Some(dir) = reapd_docgen::requested_dir() {
        return reapd_docgen::generate_command(<Args as clap::CommandFactory>::command(), &MANUAL, &dir);
    }
    let args = Args::parse();
    let json = args.json;
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let refusal = match &err {
                Error::PermissionDenied(refusal) => Some(refusal),
                _ => None,
            };
            report_refusal(json, error_kind(&err), &err.to_string(), refusal);
            ExitCode::from(exit_code_of(&err))
        }
    }
}

fn report_error(json: bool, kind: &str, message: &str) {
    report_refusal(json, kind, message, None);
}

/// An error, with the broker's typed verdict when it refused.
fn report_refusal(json: bool, kind: &str, message: &str, refusal: Option<&reapd_client::Refusal>) {
    if json {
        #[derive(Serialize)]
        struct ErrorReply<'a> {
            error: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            decision: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            rule: Option<&'a str>,
        }
        print_json(&ErrorReply {
            error: kind,
            message,
            decision: refusal.map(|r| r.kind.as_str()),
            rule: refusal.map(|r| r.rule.as_str()),
        });
    }
    eprintln!("reapctl: {message}");
}
