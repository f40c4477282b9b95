//! `reapd-lmk`: the command line around [`reapd_lmk::Killer`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use reapd_lmk::config;

/// Exit codes (also in --help).
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 3;
const EXIT_SETUP: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "reapd-lmk",
    version,
    about = "Unprivileged low-memory killer: when memory runs low, has the reapd broker kill and reap a process it is granted",
    after_help = "\
Each kill is one JSON line on stdout (\"kill\", or \"would_kill\" with --dry-run); \
human-readable logs go to stderr (REAPD_LMK_LOG=debug for more).

Exit codes:
  0  stopped after --max-kills kills, or --check found the config valid
  1  a runtime error (the PSI trigger failed, memory figures unreadable)
  2  bad command line
  3  the config file is invalid (each problem as file:line:col: message)
  4  cannot start: broker unreachable, no memory figures for the scope

Without a PSI trigger (kernels before 6.5 refuse unprivileged ones; an
undelegated cgroup) it warns and decides on the memory thresholds alone.

The broker must grant this killer's uid kill-and-reap over its victims: see \
docs/policy.md, \"An unprivileged low-memory killer\"."
)]
struct Cli {
    /// TOML config file (docs/lmk.md); without it, the built-in defaults.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// The broker's gRPC socket (overrides the config's `socket`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Watch one cgroup subtree instead of the machine (overrides
    /// `scope.cgroup`), e.g. /user.slice.
    #[arg(long, value_name = "CGROUP")]
    cgroup: Option<String>,
    /// Decide and log, but kill nothing.
    #[arg(long)]
    dry_run: bool,
    /// Validate the config file and exit.
    #[arg(long)]
    check: bool,
    /// Exit after this many kills (or would-be kills).
    #[arg(long, value_name = "N")]
    max_kills: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // No colour codes in the journal or a log file.
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REAPD_LMK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = match &cli.config {
        Some(path) => match config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => config::Config::default(),
    };
    if cli.check {
        println!("config valid: {config:?}");
        return ExitCode::SUCCESS;
    }
    if let Some(socket) = cli.socket {
        config.socket = socket;
    }
    if let Some(cgroup) = cli.cgroup {
        // Validated as the file's scope.cgroup is.
        let text = format!("[scope]\ncgroup = {}\n", toml_string(&cgroup));
        if let Err(problems) = config::parse(&text) {
            eprintln!("--cgroup: {}", problems[0].message);
            return ExitCode::from(2);
        }
        config.scope = Some(cgroup);
    }
    let mut killer = match reapd_lmk::Killer::new(config, cli.dry_run, Box::new(std::io::stdout())) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("reapd-lmk: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    match killer.run(cli.max_kills) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reapd-lmk: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}
