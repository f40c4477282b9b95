// SPDX-License-Identifier: MIT OR Apache-2.0
//! The `reapd` daemon.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use reapd::engine::Engine;
use reapd::features::KernelFeatures;
use reapd::listener::{self, AcceptConfig, ConnectionCounter, ConnectionLimits};
use reapd_docgen::{Block, Manual, Section};

/// Descriptors the broker keeps for itself (listeners, journal, /proc reads
/// on the blocking pool, pidfds of targets).
const OWN_FDS: usize = 128;

/// After SIGTERM and the kills in flight, how long gRPC connections may take
/// to close after GOAWAY. A blocking client idle between calls never
/// answers (its runtime is not running), so this bounds the stop.
const GRPC_LINGER: Duration = Duration::from_secs(1);

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
                Block::Item("outcome", "Once per allowed kill, after the kill, the reap and the wait, whether or not the client is still connected: outcome (reaped, exited_before_reap, killed_not_reaped or failed), kill path, bytes released, kill-to-reap time."),
                Block::Item("check_suppressed", "At most once a second per caller uid over the CheckPermission record limit (20 a second): how many checks went unrecorded. Kill records are never limited or dropped."),
                Block::Para("The fields and guarantees are documented in /usr/share/doc/reapd/audit.md."),
            ],
        },
        Section {
            title: "SIGNALS",
            body: &[
                Block::Item("SIGHUP", "Reload the policy file (see SYSTEMD)."),
                Block::Item("SIGTERM, SIGINT", "Stop accepting calls, wait up to 12 s for the kills in flight and their outcome records, then exit."),
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
    let registry = tracing_subscriber::registry().with(reapd::authority::layer());
    // Under systemd with stderr connected to the journal: structured
    // entries (every tracing field becomes a journal field).
    if reapd::systemd::journal_stream_is_stderr() {
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
        return reapd::reload::check_policy_command(file);
    }
    // Before anything else (and long before the runtime's threads): take
    // the sockets systemd passed and clear LISTEN_* from the environment.
    let activation = reapd::systemd::Activation::take();
    init_logging(&args.log_format);
    let mut activation = match activation {
        Ok(activation) => activation,
        Err(err) => {
            tracing::error!(error = %err, "bad socket activation");
            return ExitCode::FAILURE;
        }
    };
    let policy_source = reapd::reload::PolicySource::new(args.policy.clone());
    let (policy, kill_limits) = match policy_source.load() {
        Ok((policy, kill_limits, origin)) => {
            tracing::info!(path = %policy_source.path.display(), origin, rules = policy.rules().len(), "policy loaded");
            (policy, kill_limits)
        }
        Err(err) => {
            tracing::error!(error = %err.to_string().replace('\n', "; "), "invalid policy; refusing to start");
            return ExitCode::FAILURE;
        }
    };

    let activated = activation.activated();
    let varlink_socket = args.varlink_socket.clone().unwrap_or_else(|| {
        let dir = args.grpc_socket.parent().unwrap_or(std::path::Path::new("/run/reapd"));
        dir.join(reapd::varlink::INTERFACE)
    });
    // Socket-activated without a varlink socket (e.g. systemd-socket-activate
    // with one -l): serve gRPC only, unless --varlink-socket asks for one.
    let passed_varlink = activation
        .take_named(reapd::systemd::VARLINK_FD_NAME)
        .or_else(|| activation.take_path(&varlink_socket));
    let varlink_listener = match passed_varlink {
        Some(listener) => Some(listener),
        None if activated && args.varlink_socket.is_none() => None,
        None => match listener::bind(&varlink_socket, 0o666) {
            Ok(listener) => Some(listener),
            Err(err) => {
                tracing::error!(socket = %varlink_socket.display(), error = %err, "cannot listen");
                return ExitCode::FAILURE;
            }
        },
    };
    // The gRPC socket is bound last: a client that can connect to it (tests,
    // scripts waiting for the broker) finds the varlink one listening too.
    let passed_grpc = activation
        .take_named(reapd::systemd::GRPC_FD_NAME)
        .or_else(|| activation.take_path(&args.grpc_socket));
    let listener = match passed_grpc {
        Some(listener) => {
            tracing::info!("gRPC socket passed by the service manager");
            listener
        }
        None => match listener::bind(&args.grpc_socket, 0o666) {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!(socket = %args.grpc_socket.display(), error = %err, "cannot listen");
                return ExitCode::FAILURE;
            }
        },
    };

    // gRPC never carries fds: have the kernel refuse them (EPERM to the
    // sender), so none is ever queued for, or released on, the broker.
    match reapd::sys::refuse_passed_fds(std::os::fd::AsFd::as_fd(&listener)) {
        Ok(()) => tracing::info!("gRPC socket refuses passed fds (SO_PASSRIGHTS off)"),
        Err(err) => tracing::info!(
            error = %err,
            "kernel cannot refuse passed fds on the gRPC socket (SO_PASSRIGHTS, Linux 6.16); fds sent there are dropped unread"
        ),
    }

    for name in activation.leftover_names() {
        tracing::warn!(name = %name, "ignoring a passed socket with an unknown FileDescriptorName");
    }
    drop(activation);

    // Sockets are bound: nothing below needs root. Lock memory first (root
    // may raise RLIMIT_MEMLOCK), then keep only CAP_KILL.
    let memory_lock = reapd::privilege::lock_memory();
    // Before the seccomp filter, which allows no setrlimit.
    let open_files = reapd::privilege::raise_open_file_limit();
    let privileges = match reapd::privilege::restrict(args.user.as_deref()) {
        Ok(privileges) => privileges,
        Err(err) => {
            tracing::error!(error = %err, "cannot drop privileges; refusing to run with more than CAP_KILL");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        uid = privileges.uid,
        gid = privileges.gid,
        cap_kill = privileges.cap_kill,
        dropped = %privileges.dropped.join(","),
        memory_lock = ?memory_lock,
        "privileges restricted to CAP_KILL"
    );
    if !privileges.cap_kill {
        tracing::warn!(
            uid = privileges.uid,
            "DEGRADED MODE: no CAP_KILL; the kernel lets the broker kill only processes of uid {}, \
             so kills of other users' processes allowed by policy will be refused",
            privileges.uid
        );
    } else if privileges.uid == 0 {
        tracing::warn!("running as uid 0 (with CAP_KILL only); pass --user to leave uid 0");
    }

    let features = KernelFeatures::probe();
    for note in &features.notes {
        tracing::warn!(note = %note, "kernel feature degraded");
    }
    tracing::info!(
        kernel = %features.kernel_release,
        kill_path = features.kill_path().as_str(),
        process_mrelease = features.process_mrelease,
        reap_kill_flag = features.reap_kill_flag,
        pidfd_get_info = features.pidfd_get_info,
        so_peerpidfd = features.so_peerpidfd,
        cgroup_kill = features.cgroup_kill,
        has_cap_kill = features.has_cap_kill,
        "kernel features probed"
    );

    if !args.no_seccomp {
        if let Err(err) = reapd::seccomp::apply() {
            tracing::error!(error = %err, "cannot install the seccomp filter");
            return ExitCode::FAILURE;
        }
        tracing::info!("seccomp allow-list installed");
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };

    // The fd budget: the open-file limit, less what the broker itself uses
    // and what received fds being closed may hold (the closer's cap).
    let max_fds = usize::try_from(open_files)
        .unwrap_or(usize::MAX)
        .saturating_sub(OWN_FDS + reapd::closer::TOTAL);
    let max_total = args.max_connections.min(max_fds);
    if max_total < args.max_connections {
        tracing::warn!(
            open_files,
            requested = args.max_connections,
            max_connections = max_total,
            "open-file limit too low for --max-connections; lowering it"
        );
    }
    let limits = ConnectionLimits {
        max_total,
        max_per_uid: args.max_connections_per_uid,
        max_fds,
        reserved: args.reserved_connections.min(max_total / 2),
        idle_timeout: match args.idle_timeout_ms {
            Some(ms) => Duration::from_millis(ms.max(10)),
            None => Duration::from_secs(args.idle_timeout_secs.max(1)),
        },
    };
    tracing::info!(
        max_connections = limits.max_total,
        max_per_uid = limits.max_per_uid,
        max_fds = limits.max_fds,
        reserved = limits.reserved,
        idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
        "connection limits"
    );
    let engine = Arc::new(Engine::new(features, policy, kill_limits));
    let privileged: reapd::listener::PrivilegedCheck = {
        let engine = Arc::clone(&engine);
        Arc::new(move |uid, gid, groups: &[u32]| engine.holds_kill_grant(uid, gid, groups))
    };
    let grpc_config = AcceptConfig {
        limits,
        // The socket and the caller's pidfd: gRPC never receives fds (the
        // kernel refuses them, or drops them unread).
        weight: 2,
        privileged: Arc::clone(&privileged),
    };
    let varlink_config = AcceptConfig {
        limits,
        weight: reapd::varlink::FDS_PER_CONNECTION,
        privileged,
    };
    let closer = Arc::new(reapd::closer::Closer::default());
    reapd::reload::spawn_reloader(&runtime, Arc::clone(&engine), policy_source);
    if let Some(interval) = reapd::systemd::watchdog_interval() {
        runtime.spawn(reapd::systemd::watchdog_loop(interval));
    }
    let idle_exit = (activated && args.idle_exit_secs > 0).then(|| Duration::from_secs(args.idle_exit_secs));
    let status = format!(
        "serving; CAP_KILL {}; kill path {}",
        if privileges.cap_kill {
            "held"
        } else {
            "missing (degraded: own-uid kills only)"
        },
        engine.features().kill_path().as_str()
    );
    let result = runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        tracing::info!(socket = %args.grpc_socket.display(), "serving gRPC");
        let counter = Arc::new(ConnectionCounter::default());
        // One stop signal for both transports: SIGTERM/SIGINT, or idle exit.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_rx_for_grace = stop_rx.clone();
        let stop_rx_for_events = stop_rx.clone();
        let idle_counter = Arc::clone(&counter);
        tokio::spawn(async move {
            match idle_exit {
                Some(idle) => tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = reapd::systemd::idle_exit(idle_counter, idle) => {}
                },
                None => shutdown_signal().await,
            }
            reapd::systemd::notify_stopping("stopping: finishing calls in flight");
            let _ = stop_tx.send(true);
        });
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let varlink = async {
            match varlink_listener {
                Some(varlink_listener) => {
                    let varlink_listener = tokio::net::UnixListener::from_std(varlink_listener)?;
                    tracing::info!(socket = %varlink_socket.display(), "serving varlink");
                    reapd::varlink::serve(
                        varlink_listener,
                        Arc::clone(&engine),
                        varlink_config,
                        Arc::clone(&counter),
                        closer,
                        stopped(),
                    )
                    .await
                }
                None => Ok(()),
            }
        };
        let grpc = reapd::grpc::serve(
            listener,
            Arc::clone(&engine),
            grpc_config,
            Arc::clone(&counter),
            stopped(),
        );
        // gRPC waits for its clients to close after GOAWAY; one that never
        // does (a blocking client between calls) must not hold up the stop.
        let grace_rx = stop_rx_for_grace;
        let grace_engine = Arc::clone(&engine);
        let grpc = async move {
            tokio::select! {
                result = grpc => result.map_err(std::io::Error::other),
                _ = async {
                    let mut rx = grace_rx;
                    let _ = rx.wait_for(|stop| *stop).await;
                    // Kills are what must finish; other calls are short.
                    grace_engine.drain_kills(reapd::varlink::SHUTDOWN_GRACE).await;
                    tokio::time::sleep(GRPC_LINGER).await;
                } => {
                    tracing::warn!("gRPC connections still open after the grace period; stopping anyway");
                    Ok(())
                }
            }
        };
        // Kill-event streams never end by themselves: end them once the
        // kills in flight have finished (and published their events), so
        // subscribers hear every kill and the transports can stop.
        let events_engine = Arc::clone(&engine);
        let mut events_rx = stop_rx_for_events;
        tokio::spawn(async move {
            let _ = events_rx.wait_for(|stop| *stop).await;
            events_engine.drain_kills(reapd::varlink::SHUTDOWN_GRACE).await;
            events_engine.close_event_streams();
        });
        let summaries = Arc::clone(&engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                summaries.flush_audit_summaries();
            }
        });
        reapd::systemd::notify_ready(&status);
        let (grpc, varlink) = tokio::join!(grpc, varlink);
        // Kills run in their own tasks, which outlive their clients: wait
        // for each to write its outcome record before the process exits.
        let in_flight = engine.kills_in_flight();
        if in_flight > 0 {
            tracing::info!(in_flight, "waiting for kills in flight to finish");
        }
        if !engine.drain_kills(reapd::varlink::SHUTDOWN_GRACE).await {
            tracing::warn!(
                in_flight = engine.kills_in_flight(),
                "kills still running after the grace period; exiting without their outcome records"
            );
        }
        grpc.and(varlink)
    });
    // Blocking-pool threads still running (a /proc read, a reap) are not
    // waited for beyond this.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "serving failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the broker with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing calls in flight"),
        _ = int.recv() => tracing::info!("SIGINT: finishing calls in flight"),
    }
}
