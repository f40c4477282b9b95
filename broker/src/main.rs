//! The `reapd` daemon.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use reapd::engine::Engine;
use reapd::features::KernelFeatures;
use reapd::listener::{self, ConnectionCounter, ConnectionLimits};

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
    /// Close a connection after this many seconds without a byte from it.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
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
    /// client starts the broker again.
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
    CheckPolicy { file: PathBuf },
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("REAPD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd with stderr connected to the journal: structured
    // entries (every tracing field becomes a journal field).
    if reapd::systemd::journal_stream_is_stderr() {
        if let Ok(layer) = tracing_journald::layer() {
            use tracing_subscriber::layer::SubscriberExt;
            use tracing_subscriber::util::SubscriberInitExt;
            tracing_subscriber::registry()
                .with(filter)
                .with(
                    // Fields become REAPD_TARGET_PID etc.: namespaced, and
                    // never mistaken for journald's own MESSAGE/PRIORITY.
                    layer
                        .with_syslog_identifier("reapd".into())
                        .with_field_prefix(Some("REAPD".into())),
                )
                .init();
            return;
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(false).init();
    }
}

fn main() -> ExitCode {
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

    let max_total = args
        .max_connections
        .min(reapd::privilege::connections_within(open_files));
    if max_total < args.max_connections {
        tracing::warn!(
            open_files,
            requested = args.max_connections,
            max_connections = max_total,
            "open-file limit too low for --max-connections; lowering it (two descriptors per connection)"
        );
    }
    let limits = ConnectionLimits {
        max_total,
        max_per_uid: args.max_connections_per_uid,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
    };
    let engine = Arc::new(Engine::new(features, policy, kill_limits));
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
                        limits,
                        Arc::clone(&counter),
                        stopped(),
                    )
                    .await
                }
                None => Ok(()),
            }
        };
        let grpc = reapd::grpc::serve(listener, Arc::clone(&engine), limits, Arc::clone(&counter), stopped());
        reapd::systemd::notify_ready(&status);
        let (grpc, varlink) = tokio::join!(grpc, varlink);
        grpc.map_err(std::io::Error::other).and(varlink)
    });
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
