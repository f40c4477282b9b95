// SPDX-License-Identifier: MIT OR Apache-2.0
//! Start-up, serving, and the one shutdown path.
//!
//! [`run`] is the daemon after argument parsing and logging: it binds (or
//! takes from systemd) both sockets, loads the policy, drops to CAP_KILL,
//! installs the seccomp filter, serves both transports over one [`Engine`],
//! and stops within the unit's stop timeout (`TimeoutStopSec=20s`):
//!
//! 1. a stop request (SIGTERM/SIGINT, or idle exit when socket-activated)
//!    makes both transports stop accepting and finish the calls they have;
//! 2. the kills in flight finish and write their outcome records
//!    ([`SHUTDOWN_GRACE`], 12 s at most), then the kill-event streams end
//!    (so subscribers hear every kill);
//! 3. gRPC connections get [`GRPC_LINGER`] more to close after GOAWAY, then
//!    are dropped; the blocking pool gets one second.
//!
//! Worst case 12 + 1 + 1 s, inside the unit's 20 s.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::engine::reload::{spawn_reloader, PolicySource};
use crate::engine::Engine;
use crate::os::features::KernelFeatures;
use crate::os::systemd::{self, Activation};
use crate::os::{privilege, seccomp, sys};
use crate::transport::closer::{self, Closer};
use crate::transport::listener::{self, AcceptConfig, ConnectionCounter, ConnectionLimits, PrivilegedCheck};
use crate::transport::{grpc, varlink};

pub use crate::transport::varlink::SHUTDOWN_GRACE;

/// After the kills in flight, how long gRPC connections may take to close
/// after GOAWAY. A blocking client idle between calls never answers (its
/// runtime is not running), so this bounds the stop.
pub const GRPC_LINGER: Duration = Duration::from_secs(1);

/// Descriptors the broker keeps for itself (listeners, journal, /proc reads
/// on the blocking pool, pidfds of targets).
const OWN_FDS: usize = 128;

/// What the daemon was asked to do (the `reapd` command line, parsed).
#[derive(Debug, Clone)]
pub struct Config {
    /// The gRPC socket's path (bound unless systemd passed it).
    pub grpc_socket: PathBuf,
    /// The varlink socket's path; `None`: `io.reapd.Reaper` beside the gRPC
    /// socket, or none at all when socket-activated without one.
    pub varlink_socket: Option<PathBuf>,
    /// Most connections at once (lowered to what the open-file limit allows).
    pub max_connections: usize,
    /// Most connections at once from one uid.
    pub max_connections_per_uid: usize,
    /// Of `max_connections`, how many only privileged callers may use.
    pub reserved_connections: usize,
    /// Slow-loris timer for a first call or a call in progress.
    pub idle_timeout: Duration,
    /// `--policy`; `None`: `/etc/reapd/policy.toml` or the built-in default.
    pub policy: Option<PathBuf>,
    /// Switch to this user after binding (keeping CAP_KILL).
    pub user: Option<String>,
    /// When socket-activated, exit after this long without a connection.
    pub idle_exit: Option<Duration>,
    /// Install the broker's own seccomp filter.
    pub seccomp: bool,
}

/// Why the daemon could not start or serve. Each is logged once by the
/// caller; the process then exits 1.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid policy; refusing to start: {0}")]
    Policy(String),
    #[error("cannot listen on {}: {source}", socket.display())]
    Listen { socket: PathBuf, source: std::io::Error },
    #[error("cannot drop privileges; refusing to run with more than CAP_KILL: {0}")]
    Privileges(#[from] privilege::PrivilegeError),
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
}

/// The sockets, bound or passed: varlink may be absent.
struct Sockets {
    grpc: UnixListener,
    varlink: Option<(UnixListener, PathBuf)>,
}

/// Runs the daemon until it is asked to stop. `activation` must have been
/// taken before any thread started (see [`Activation::take`]).
///
/// Errors: [`ServerError`], after which nothing is being served.
pub fn run(config: Config, mut activation: Activation) -> Result<(), ServerError> {
    let policy_source = PolicySource::new(config.policy.clone());
    let (policy, kill_limits) = match policy_source.load() {
        Ok((policy, kill_limits, origin)) => {
            tracing::info!(path = %policy_source.path.display(), origin, rules = policy.rules().len(), "policy loaded");
            (policy, kill_limits)
        }
        Err(err) => return Err(ServerError::Policy(err.to_string().replace('\n', "; "))),
    };
    let activated = activation.activated();
    let sockets = take_or_bind(&config, &mut activation)?;

    // Sockets are bound: nothing below needs root. Lock memory first (root
    // may raise RLIMIT_MEMLOCK), then keep only CAP_KILL.
    let memory_lock = privilege::lock_memory();
    // Before the seccomp filter, which allows no setrlimit.
    let open_files = privilege::raise_open_file_limit();
    let privileges = privilege::restrict(config.user.as_deref())?;
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

    if config.seccomp {
        seccomp::apply()?;
        tracing::info!("seccomp allow-list installed");
    }

    // Before the runtime's threads exist, so none has an arena of its own.
    sys::limit_malloc_arenas();
    // Start-up's transient allocations (arguments, the policy's TOML, the
    // kernel probes, the seccomp program) are free now but still resident
    // (~0.05 MiB measured); the quiet-time release below runs only after a
    // first spell of calls.
    sys::release_free_memory();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        // Blocking threads (caller identification at accept, group kills)
        // come in bursts; one idle this long exits and gives back its stack.
        .thread_keep_alive(QUIET_TICK)
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;

    let limits = connection_limits(&config, open_files);
    let engine = Arc::new(Engine::new(features, policy, kill_limits));
    spawn_reloader(&runtime, Arc::clone(&engine), policy_source);
    runtime.spawn(release_memory_when_quiet());
    if let Some(interval) = systemd::watchdog_interval() {
        runtime.spawn(systemd::watchdog_loop(interval));
    }
    let idle_exit = config.idle_exit.filter(|_| activated);
    let status = format!(
        "serving; CAP_KILL {}; kill path {}",
        if privileges.cap_kill {
            "held"
        } else {
            "missing (degraded: own-uid kills only)"
        },
        engine.features().kill_path().as_str()
    );
    let result = runtime.block_on(serve(sockets, engine, limits, idle_exit, status));
    // Blocking-pool threads still running (a /proc read, a reap) are not
    // waited for beyond this.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result.map_err(ServerError::Serve)
}

/// How often the broker looks for a quiet spell to give memory back, and
/// how long a blocking thread may sit idle.
const QUIET_TICK: Duration = Duration::from_secs(2);

/// Gives the allocator's free memory back to the kernel once after each
/// spell of activity, when a whole [`QUIET_TICK`] passed with no
/// connection, check or kill: a burst of connections leaves their buffers
/// free but resident otherwise (0.4 MiB of 1.7 MiB anonymous after 100k
/// checks over 16 connections, measured). Never per request, never while
/// busy.
async fn release_memory_when_quiet() {
    let mut ticks = tokio::time::interval(QUIET_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = crate::engine::metrics::get().activity();
    let mut dirty = false;
    loop {
        ticks.tick().await;
        let now = crate::engine::metrics::get().activity();
        if now != seen {
            (seen, dirty) = (now, true);
        } else if dirty {
            crate::os::sys::release_free_memory();
            dirty = false;
        }
    }
}

/// The sockets systemd passed (by name, else by path), or bound here. The
/// gRPC socket is bound last: a client that can connect to it (tests,
/// scripts waiting for the broker) finds the varlink one listening too.
fn take_or_bind(config: &Config, activation: &mut Activation) -> Result<Sockets, ServerError> {
    let bind = |path: &Path| {
        listener::bind(path, 0o666).map_err(|source| ServerError::Listen {
            socket: path.to_owned(),
            source,
        })
    };
    let varlink_path = config.varlink_socket.clone().unwrap_or_else(|| {
        let dir = config.grpc_socket.parent().unwrap_or(Path::new("/run/reapd"));
        dir.join(varlink::INTERFACE)
    });
    // Socket-activated without a varlink socket (e.g. systemd-socket-activate
    // with one -l): serve gRPC only, unless --varlink-socket asks for one.
    let passed_varlink = activation
        .take_named(systemd::VARLINK_FD_NAME)
        .or_else(|| activation.take_path(&varlink_path));
    let varlink = match passed_varlink {
        Some(socket) => Some(socket),
        None if activation.activated() && config.varlink_socket.is_none() => None,
        None => Some(bind(&varlink_path)?),
    };
    let passed_grpc = activation
        .take_named(systemd::GRPC_FD_NAME)
        .or_else(|| activation.take_path(&config.grpc_socket));
    let grpc = match passed_grpc {
        Some(socket) => {
            tracing::info!("gRPC socket passed by the service manager");
            socket
        }
        None => bind(&config.grpc_socket)?,
    };
    // gRPC never carries fds: have the kernel refuse them (EPERM to the
    // sender), so none is ever queued for, or released on, the broker.
    match sys::refuse_passed_fds(grpc.as_fd()) {
        Ok(()) => tracing::info!("gRPC socket refuses passed fds (SO_PASSRIGHTS off)"),
        Err(err) => tracing::info!(
            error = %err,
            "kernel cannot refuse passed fds on the gRPC socket (SO_PASSRIGHTS, Linux 6.16); fds sent there are dropped unread"
        ),
    }
    for name in activation.leftover_names() {
        tracing::warn!(name = %name, "ignoring a passed socket with an unknown FileDescriptorName");
    }
    Ok(Sockets {
        grpc,
        varlink: varlink.map(|socket| (socket, varlink_path)),
    })
}

/// The connection limits, with `max_connections` lowered to what the
/// open-file limit leaves after the broker's own fds and the closer's cap.
fn connection_limits(config: &Config, open_files: u64) -> ConnectionLimits {
    let max_fds = usize::try_from(open_files)
        .unwrap_or(usize::MAX)
        .saturating_sub(OWN_FDS + closer::TOTAL + closer::OVERSHOOT);
    let max_total = config.max_connections.min(max_fds);
    if max_total < config.max_connections {
        tracing::warn!(
            open_files,
            requested = config.max_connections,
            max_connections = max_total,
            "open-file limit too low for --max-connections; lowering it"
        );
    }
    let limits = ConnectionLimits {
        max_total,
        max_per_uid: config.max_connections_per_uid,
        max_fds,
        reserved: config.reserved_connections.min(max_total / 2),
        idle_timeout: config.idle_timeout,
    };
    tracing::info!(
        max_connections = limits.max_total,
        max_per_uid = limits.max_per_uid,
        max_fds = limits.max_fds,
        reserved = limits.reserved,
        idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
        "connection limits"
    );
    limits
}

/// Serves both transports until a stop request, then runs the shutdown
/// sequence described in the module docs.
async fn serve(
    sockets: Sockets,
    engine: Arc<Engine>,
    limits: ConnectionLimits,
    idle_exit: Option<Duration>,
    status: String,
) -> std::io::Result<()> {
    let privileged: PrivilegedCheck = {
        let engine = Arc::clone(&engine);
        Arc::new(move |uid, gid, groups: &[u32]| engine.holds_kill_grant(uid, gid, groups))
    };
    let closer = Arc::new(Closer::default());
    let counter = Arc::new(ConnectionCounter::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (drained_tx, drained_rx) = watch::channel(false);
    let stop_requested = stop_rx.clone();

    // Step 1: the stop request.
    let idle_counter = Arc::clone(&counter);
    tokio::spawn(async move {
        match idle_exit {
            Some(idle) => tokio::select! {
                _ = shutdown_signal() => {}
                _ = systemd::idle_exit(idle_counter, idle) => {}
            },
            None => shutdown_signal().await,
        }
        systemd::notify_stopping("stopping: finishing calls in flight");
        let _ = stop_tx.send(true);
    });
    // Step 2, once: kills in flight finish, then event streams end.
    let sequence = {
        let engine = Arc::clone(&engine);
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            if !engine.drain_kills(SHUTDOWN_GRACE).await {
                tracing::warn!(
                    in_flight = engine.kills_in_flight(),
                    "kills still running after the grace period; exiting without their outcome records"
                );
            }
            engine.close_event_streams();
            let _ = drained_tx.send(true);
        })
    };
    let summaries = Arc::clone(&engine);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            summaries.flush_audit_summaries();
        }
    });

    let varlink = {
        let engine = Arc::clone(&engine);
        let config = AcceptConfig {
            limits,
            weight: varlink::FDS_PER_CONNECTION,
            privileged: Arc::clone(&privileged),
            closer: Arc::clone(&closer),
        };
        let counter = Arc::clone(&counter);
        let closer = Arc::clone(&closer);
        let stopped = flag_set(stop_rx.clone());
        async move {
            let Some((socket, path)) = sockets.varlink else {
                return Ok(());
            };
            let socket = tokio::net::UnixListener::from_std(socket)?;
            tracing::info!(socket = %path.display(), "serving varlink");
            varlink::serve(socket, engine, config, counter, closer, stopped).await
        }
    };
    let grpc = {
        let config = AcceptConfig {
            limits,
            // The socket and the caller's pidfd: gRPC never receives fds (the
            // kernel refuses them; before Linux 6.16 it drops them unread, on
            // the reading thread: see docs/threats.md).
            weight: 2,
            privileged,
            closer: Arc::clone(&closer),
        };
        let socket = tokio::net::UnixListener::from_std(sockets.grpc)?;
        tracing::info!("serving gRPC");
        let serving = grpc::serve(
            socket,
            Arc::clone(&engine),
            config,
            Arc::clone(&counter),
            flag_set(stop_rx),
        );
        // Step 3: a client that never closes after GOAWAY (a blocking
        // client between calls) must not hold up the stop.
        async move {
            tokio::select! {
                result = serving => result.map_err(std::io::Error::other),
                _ = async {
                    flag_set(drained_rx).await;
                    tokio::time::sleep(GRPC_LINGER).await;
                } => {
                    tracing::warn!("gRPC connections still open after the grace period; stopping anyway");
                    Ok(())
                }
            }
        }
    };
    systemd::notify_ready(&status);
    let (grpc, varlink) = tokio::join!(grpc, varlink);
    // The transports have stopped; the kills they started may not have.
    // A requested stop goes through the one sequence above, which ends by
    // itself within SHUTDOWN_GRACE; a transport that failed on its own
    // still lets the kills in flight write their outcome records.
    if *stop_requested.borrow() {
        let _ = sequence.await;
    } else {
        sequence.abort();
        engine.drain_kills(SHUTDOWN_GRACE).await;
    }
    grpc.and(varlink)
}

/// Resolves once `flag` is true (or its sender is gone).
async fn flag_set(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
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
