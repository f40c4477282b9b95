//! The `reapd` daemon.

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
    init_logging(&args.log_format);
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

    let listener = match listener::bind(&args.grpc_socket, 0o666) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(socket = %args.grpc_socket.display(), error = %err, "cannot listen");
            return ExitCode::FAILURE;
        }
    };

    let varlink_socket = args.varlink_socket.clone().unwrap_or_else(|| {
        let dir = args.grpc_socket.parent().unwrap_or(std::path::Path::new("/run/reapd"));
        dir.join(reapd::varlink::INTERFACE)
    });
    let varlink_listener = match listener::bind(&varlink_socket, 0o666) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(socket = %varlink_socket.display(), error = %err, "cannot listen");
            return ExitCode::FAILURE;
        }
    };

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

    let limits = ConnectionLimits {
        max_total: args.max_connections,
        max_per_uid: args.max_connections_per_uid,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
    };
    let engine = Arc::new(Engine::new(features, policy, kill_limits));
    reapd::reload::spawn_reloader(&runtime, Arc::clone(&engine), policy_source);
    let result = runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        tracing::info!(socket = %args.grpc_socket.display(), "serving gRPC");
        let counter = Arc::new(ConnectionCounter::default());
        let varlink_listener = tokio::net::UnixListener::from_std(varlink_listener)?;
        tracing::info!(socket = %varlink_socket.display(), "serving varlink");
        let varlink = reapd::varlink::serve(
            varlink_listener,
            Arc::clone(&engine),
            limits,
            Arc::clone(&counter),
            shutdown_signal(),
        );
        let grpc = reapd::grpc::serve(listener, engine, limits, counter, shutdown_signal());
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
