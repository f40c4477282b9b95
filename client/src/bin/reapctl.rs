//! `reapctl`: kill-and-reap, check and inspect through the reapd broker.
//!
//! Exit codes:
//! - 0: success (for `check`: the kill would be allowed)
//! - 1: `check` only: the kill would be refused
//! - 2: usage error
//! - 3: cannot reach the broker
//! - 4: invalid argument
//! - 5: no such process
//! - 6: permission denied
//! - 7: the process changed (start time mismatch)
//! - 8: rate limited
//! - 10: any other broker error

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use reapd_client::{blocking::Client, Error, Target, DEFAULT_SOCKET};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "reapctl",
    version,
    about = "Kill a process and reap its memory through the reapd broker"
)]
struct Args {
    /// The broker's gRPC socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print results as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Kill PID with SIGKILL and reap its memory at once.
    Kill {
        pid: i32,
        /// Refuse unless PID still started at this time (field 22 of /proc/PID/stat).
        #[arg(long)]
        start_time: Option<u64>,
        /// Also wait up to MS milliseconds for the process to be gone.
        #[arg(long, value_name = "MS")]
        wait: Option<u64>,
    },
    /// Would the broker kill PID for me? No side effect.
    Check {
        pid: i32,
        #[arg(long)]
        start_time: Option<u64>,
    },
    /// What the broker and the running kernel can do.
    Caps,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn exit_code_of(err: &Error) -> u8 {
    match err {
        Error::Connect { .. } => 3,
        Error::InvalidArgument(_) => 4,
        Error::NotFound(_) => 5,
        Error::PermissionDenied(_) => 6,
        Error::ProcessChanged(_) => 7,
        Error::RateLimited { .. } => 8,
        Error::Other { .. } => 10,
    }
}

fn error_kind(err: &Error) -> &'static str {
    match err {
        Error::Connect { .. } => "connect",
        Error::InvalidArgument(_) => "invalid_argument",
        Error::NotFound(_) => "not_found",
        Error::PermissionDenied(_) => "permission_denied",
        Error::ProcessChanged(_) => "process_changed",
        Error::RateLimited { .. } => "rate_limited",
        Error::Other { .. } => "other",
    }
}

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("reports serialize"));
}

fn run(args: Args) -> Result<u8, Error> {
    let mut client = Client::connect(&args.socket)?;
    match args.command {
        Command::Kill { pid, start_time, wait } => {
            let report = client.kill_and_reap(Target { pid, start_time }, wait.map(Duration::from_millis))?;
            if args.json {
                print_json(&report);
            } else {
                let who = report
                    .target
                    .as_ref()
                    .map(|t| format!("pid {} ({}, uid {})", t.pid, t.comm, t.uid))
                    .unwrap_or_else(|| format!("pid {pid}"));
                let m = &report.memory_before;
                println!(
                    "{who}: {} via {} in {:.3} ms (rule: {})",
                    report.outcome.replace('_', " "),
                    report.kill_path,
                    report.kill_to_reap_ns as f64 / 1e6,
                    report.rule
                );
                println!(
                    "  held: {} anon, {} file, {} shmem, {} swap",
                    mib(m.anon_bytes),
                    mib(m.file_bytes),
                    mib(m.shmem_bytes),
                    mib(m.swap_bytes)
                );
                println!("  released: {}", mib(report.bytes_released));
                if !report.not_reaped_reason.is_empty() {
                    println!("  note: {}", report.not_reaped_reason);
                }
                if wait.is_some() {
                    println!("  exited: {}", if report.exited { "yes" } else { "not yet" });
                }
            }
            Ok(0)
        }
        Command::Check { pid, start_time } => {
            let permission = client.check_permission(Target { pid, start_time })?;
            if args.json {
                print_json(&permission);
            } else {
                let verdict = if permission.allowed { "allowed" } else { "refused" };
                println!("pid {pid}: {verdict}: {}", permission.reason);
            }
            Ok(if permission.allowed { 0 } else { 1 })
        }
        Command::Caps => {
            let caps = client.capabilities()?;
            if args.json {
                print_json(&caps);
            } else {
                let yes = |b: bool| if b { "yes" } else { "no" };
                println!("reapd {} on Linux {}", caps.broker_version, caps.kernel_release);
                println!("  kill path:                  {}", caps.kill_path);
                println!("  process_mrelease:           {}", yes(caps.process_mrelease));
                println!("  PROCESS_MRELEASE_REAP_KILL: {}", yes(caps.reap_kill_flag));
                println!("  PIDFD_GET_INFO:             {}", yes(caps.pidfd_get_info));
                println!("  SO_PEERPIDFD:               {}", yes(caps.so_peerpidfd));
                println!("  cgroup.kill:                {}", yes(caps.cgroup_kill));
                println!("  CAP_KILL held:              {}", yes(caps.has_cap_kill));
                for note in &caps.notes {
                    println!("  note: {note}");
                }
            }
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            if json {
                #[derive(Serialize)]
                struct ErrorReply<'a> {
                    error: &'a str,
                    message: String,
                }
                print_json(&ErrorReply {
                    error: error_kind(&err),
                    message: err.to_string(),
                });
            }
            eprintln!("reapctl: {err}");
            ExitCode::from(exit_code_of(&err))
        }
    }
}
