// SPDX-License-Identifier: MIT OR Apache-2.0
//! The `reapd` daemon.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use reapd::os::systemd::Activation;
use reapd::server::{self, Config};
use reapd_docgen::{Block, Manual, Section};

/// reapd(8) beyond what clap knows: how it runs, what it logs, its files.
const MANUAL: Manual<'static> = Manual {
    section: "8",
    extra: &[
        Section {
            title: "OVERVIEW",
            body: &[
                Block::Para("reapd is a broker: a caller asks it, over gRPC (/run/reapd/grpc.sock) or varlink (/run/reapd/io.reapd.Reaper), to kill a process; the broker checks its policy against the caller's kernel-given credentials, sends SIGKILL through a pidfd and releases the victim's memory at once with process_mrelease(2). reapctl(1) is the client."),
            ],
        },
        Section {
            title: "SYSTEMD",
            body: &[
                Block::Para("Installed from the package, reapd.socket and reapd-varlink.socket listen and start reapd.service on the first connection. The service runs as user reapd with CAP_KILL as its only capability, under a seccomp allow-list and full sandboxing (systemd-analyze security reapd). It reports readiness and status to systemd, pings the watchdog, logs to the journal with structured fields, and exits after --idle-exit-secs without connections; the sockets stay with systemd, so no client is lost."),
                Block::Para("systemctl reload reapd sends SIGHUP: the policy file is read again and replaces the running one if it is valid; an invalid file is logged and the old policy stays."),
            ],
        },
        Section {
            title: "PRIVILEGES",
            body: &[
                Block::Para("Started by hand as root, the broker binds its sockets, then drops every capability except CAP_KILL (bounding set included); --user also switches to that user, keeping CAP_KILL. After start-up it installs its own seccomp filter (calls outside the list fail with EPERM)."),
                Block::Para("Without CAP_KILL the broker runs in degraded mode: the kernel lets it kill only processes of its own uid. It says so in the log and in GetCapabilities (has_cap_kill=false), and refuses a kill of another user's process that the policy allows with a reason naming degraded mode."),
            ],
        },
        Section {
            title: "AUDIT LOG",
            body: &[
                Block::Para("Every decision and every kill is an audit record: a tracing event with target reapd::audit. Under systemd each is a structured journal entry whose fields are upper-cased and prefixed REAPD_ (journalctl -u reapd REAPD_EVENT=outcome); otherwise one line per event on stderr (--log-format json: one JSON object per line)."),
                Block::Item("decision", "Once per KillAndReap or CheckPermission request: caller pid, uid and comm, target pid, uid, comm and start time, allowed, the deciding rule and the reason."),
                Block::Item("outcome", "Once per allowed kill, after the kill, the reap (at most 2 s of it) and the wait, whether or not the client is still connected: outcome (reaped, exited_before_reap, killed_not_reaped, already_dying, reap_pending or failed), kill path, bytes released, kill-to-reap time."),
                Block::Item("reap_ended, reap_pending_at_shutdown", "The end of a reap whose kill was recorded reap_pending (process_mrelease waited on the victim's mmap lock past 2 s), or, at shutdown, a reap still waiting."),
                Block::Item("check_suppressed", "At most once a second per caller uid over the CheckPermission record limit (20 a second): how many checks went unrecorded. Kill records are never limited or dropped."),
                Block::Para("The fields and guarantees are documented in /usr/share/doc/reapd/audit.md."),
            ],
        },
        Section {
            title: "SIGNALS",
            body: &[
                Block::Item("SIGHUP", "Reload the policy file (see SYSTEMD)."),
                Block::Item("SIGTERM, SIGINT", "Stop accepting calls, wait up to 12 s for the kills in flight and their outcome records (a reap at most 2 s: then reap_pending), then exit."),
            ],
        },
        Section {
            title: "FILES",
            body: &[
                Block::Item("/etc/reapd/policy.toml", "The delegation policy (/usr/share/doc/reapd/policy.md); without it, the built-in kill(2) rule. reapd check-policy validates a file."),
                Block::Item("/run/reapd/", "The sockets."),
            ],
        },
        Section {
            title: "ENVIRONMENT",
            body: &[Block::Item("REAPD_LOG", "Log filter (tracing EnvFilter syntax), default info.")],
        },
        Section {
            title: "EXIT STATUS",
            body: &[
                Block::Item("0", "Stopped cleanly, or check-policy found no problem."),
                Block::Item("1", "Could not start (bad socket activation, invalid policy, cannot listen), or check-policy found a problem."),
                Block::Item("2", "Usage error."),
            ],
        },
    ],
    see_also: &["reapctl(1)", "process_mrelease(2)", "systemd.socket(5)", "systemd.exec(5)"],
};

#[derive(Debug, Parser)]
#[command(
    name = "reapd",
    version,
    about = "Kill a process and reap its memory at once, for unprivileged callers"
)]
struct Args {
    /// Where to listen for gRPC.
    #[arg(long, default_value = "/run/reapd/grpc.sock")]
    grpc_socket: PathBuf,
    /// Where to listen for varlink (io.reapd.Reaper). Default: io.reapd.Reaper
    /// beside the gRPC socket, i.e. /run/reapd/io.reapd.Reaper.
    #[arg(long)]
    varlink_socket: Option<PathBuf>,
    /// Most connections open at once, all callers together.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most connections open at once from one uid.
    #[arg(long, default_value_t = 256)]
    max_connections_per_uid: usize,
    /// Of --max-connections, how many only root and callers that a policy
    /// rule grants kill-and-reap by uid or group may use.
    #[arg(long, default_value_t = 64)]
    reserved_connections: usize,
    /// Slow-loris timer: close a connection that has not completed its
    /// first call, or a call it started, within this many seconds. A
    /// connection idle between calls is never closed by the broker.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
    /// The same in milliseconds (wins over --idle-timeout-secs; for tests).
    #[arg(long, value_name = "MS")]
    idle_timeout_ms: Option<u64>,
    /// Log format: "text", or "json" (one object per line).
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Policy file (TOML, see docs/policy.md). Default
    /// /etc/reapd/policy.toml; if that does not exist, the built-in default.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Started as root: switch to this user after binding the sockets,
    /// keeping only CAP_KILL. Without it, root keeps uid 0 but still drops
    /// every capability except CAP_KILL.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// When socket-activated, exit after this many seconds with no open
    /// connection (0: never). The sockets stay with systemd, so the next
    /// client starts the broker again. A client holding a connection (an
    /// OOM manager) keeps the broker running: it never pays a cold start.
    #[arg(long, default_value_t = 30)]
    idle_exit_secs: u64,
    /// Do not install the broker's own seccomp filter (for debugging).
    #[arg(long)]
    no_seccomp: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Validate a policy file: prints file:line:col: message per problem and
    /// exits non-zero if there is any.
    CheckPolicy {
        /// The policy file to validate (TOML, see docs/policy.md).
        file: PathBuf,
    },
}

fn init_logging(format: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_env("REAPD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // REAPD_LOG filters the output only (a per-layer filter), so that the
    // :authority watch sees h2's debug event whatever the log level.
    let registry = tracing_subscriber::registry().with(reapd::transport::authority::layer());
    // Under systemd with stderr connected to the journal: structured
    // entries (every tracing field becomes a journal field).
    if reapd::os::systemd::journal_stream_is_stderr() {
        if let Ok(layer) = tracing_journald::layer() {
            registry
                .with(
                    // Fields become REAPD_TARGET_PID etc.: namespaced, and
                    // never mistaken for journald's own MESSAGE/PRIORITY.
                    layer
                        .with_syslog_identifier("reapd".into())
                        .with_field_prefix(Some("REAPD".into()))
                        .with_filter(filter),
                )
                .init();
            return;
        }
    }
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if format == "json" {
        registry
            .with(output.json().flatten_event(true).with_filter(filter))
            .init();
    } else {
        registry.with(output.with_ansi(false).with_filter(filter)).init();
    }
}

fn main() -> ExitCode {
    // `reapd generate-docs DIR`: the man pages and completions (packaging).
    if let Some(dir) = reapd_docgen::requested_dir() {
        return reapd_docgen::generate_command(<Args as clap::CommandFactory>::command(), &MANUAL, &dir);
    }
    let args = Args::parse();
    if let Some(Command::CheckPolicy { file }) = &args.command {
        return reapd::engine::reload::check_policy_command(file);
    }
    // Before anything else (and long before the runtime's threads): take
    // the sockets systemd passed and clear LISTEN_* from the environment.
    let activation = Activation::take();
    init_logging(&args.log_format);
    let activation = match activation {
        Ok(activation) => activation,
        Err(err) => {
            tracing::error!(error = %err, "bad socket activation");
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        grpc_socket: args.grpc_socket,
        varlink_socket: args.varlink_socket,
        max_connections: args.max_connections,
        max_connections_per_uid: args.max_connections_per_uid,
        reserved_connections: args.reserved_connections,
        idle_timeout: match args.idle_timeout_ms {
            Some(ms) => Duration::from_millis(ms.max(10)),
            None => Duration::from_secs(args.idle_timeout_secs.max(1)),
        },
        policy: args.policy,
        user: args.user,
        idle_exit: (args.idle_exit_secs > 0).then(|| Duration::from_secs(args.idle_exit_secs)),
        seccomp: !args.no_seccomp,
    };
    match server::run(config, activation) {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}
