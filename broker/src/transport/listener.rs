// SPDX-License-Identifier: MIT OR Apache-2.0
//! Unix-socket listening shared by every transport: binding, connection caps
//! (in total, per uid, and in file descriptors, with a reserve for
//! privileged callers), identifying each peer, and the slow-loris timer.
//!
//! Caps are checked first, from SO_PEERCRED alone (one getsockopt on the
//! accepting thread); the peer's /proc identification runs only for a
//! connection that got a slot. A peer over its caps is closed at once,
//! before it costs a task. A connection that has not completed a request is
//! closed when its timer fires; one that has is served for as long as it
//! stays open (an OOM manager holds one connection for days).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{Instant, Sleep};

use crate::engine::caller::Caller;
use crate::os::features::KernelFeatures;
use crate::transport::closer::Closer;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once, all callers together.
    pub max_total: usize,
    /// Connections open at once from one uid.
    pub max_per_uid: usize,
    /// File descriptors connections may hold, all together: the socket
    /// itself plus, on varlink, the fds of a call being received.
    pub max_fds: usize,
    /// Of `max_total` (and of `max_fds`, times the largest weight), the part
    /// only root and callers holding a kill grant may use, so they are served
    /// while ordinary uids are at their caps.
    pub reserved: usize,
    /// How long a connection may take to complete its first request, or a
    /// request it has started; an idle connection that completed one has no
    /// timer.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_total: 4096,
            max_per_uid: 256,
            max_fds: 4096 * 6,
            reserved: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counts open connections and the fds they may hold, in total and per
/// caller uid.
#[derive(Debug, Default)]
pub struct ConnectionCounter {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    connections: usize,
    fds: usize,
    by_uid: HashMap<u32, usize>,
}

/// One counted connection; uncounted on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    counter: Arc<ConnectionCounter>,
    uid: u32,
    weight: usize,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        crate::engine::metrics::get().connection_open(false);
        let mut inner = self.counter.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.connections = inner.connections.saturating_sub(1);
        inner.fds = inner.fds.saturating_sub(self.weight);
        if let Some(count) = inner.by_uid.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                inner.by_uid.remove(&self.uid);
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    PerUid,
    Total,
    Fds,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::PerUid => "per-uid connection limit",
            Refused::Total => "connection limit",
            Refused::Fds => "file descriptor budget",
        }
    }
}

impl ConnectionCounter {
    /// Takes a slot for a connection of `uid` that may hold `weight` fds.
    /// `privileged` is asked only when the ordinary capacity is used up, so
    /// the common case costs one lock.
    pub fn try_acquire(
        self: &Arc<Self>,
        uid: u32,
        weight: usize,
        limits: &ConnectionLimits,
        privileged: impl FnOnce() -> bool,
    ) -> Result<ConnectionSlot, Refused> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let per_uid = inner.by_uid.get(&uid).copied().unwrap_or(0);
        let reserved = limits.reserved.min(limits.max_total);
        let reserved_fds = (reserved * weight).min(limits.max_fds);
        // The per-uid cap applies to everyone: a caller at its own cap did
        // it to itself. The reserve is about what other uids can take.
        if per_uid >= limits.max_per_uid {
            return Err(Refused::PerUid);
        }
        let ordinary_room =
            inner.connections < limits.max_total - reserved && inner.fds + weight <= limits.max_fds - reserved_fds;
        let refused = if ordinary_room {
            None
        } else if inner.connections >= limits.max_total {
            Some(Refused::Total)
        } else if inner.fds + weight > limits.max_fds {
            Some(Refused::Fds)
        } else if privileged() {
            // Within the reserve: root and kill grantees only.
            None
        } else if inner.connections >= limits.max_total - reserved {
            Some(Refused::Total)
        } else {
            Some(Refused::Fds)
        };
        if let Some(why) = refused {
            return Err(why);
        }
        inner.connections += 1;
        inner.fds += weight;
        *inner.by_uid.entry(uid).or_insert(0) += 1;
        crate::engine::metrics::get().connection_open(true);
        Ok(ConnectionSlot {
            counter: Arc::clone(self),
            uid,
            weight,
        })
    }

    pub fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).connections
    }

    /// Fds the open connections may hold (their budgeted weight).
    pub fn fds(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).fds
    }
}

/// Decides whether a peer, known by its SO_PEERCRED uid and gid and its
/// SO_PEERGROUPS, may use the reserve (see [`crate::engine::Engine::holds_kill_grant`]).
pub type PrivilegedCheck = Arc<dyn Fn(u32, u32, &[u32]) -> bool + Send + Sync>;

/// Binds a Unix socket at `path` with `mode`, creating the directory if
/// missing and replacing a stale socket file (one nobody listens on).
pub fn bind(path: &Path, mode: u32) -> io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another broker is listening on {}", path.display()),
                ))
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    // The policy lives in the daemon, so everyone may connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// An accepted, identified connection.
pub struct Accepted {
    pub stream: UnixStream,
    pub caller: Arc<Caller>,
    pub slot: ConnectionSlot,
    /// Root or a kill grantee (see [`PrivilegedCheck`]).
    pub privileged: bool,
    /// When it was accepted: the slow-loris timer starts here.
    pub accepted_at: Instant,
}

/// What the accept loop needs from its transport.
#[derive(Clone)]
pub struct AcceptConfig {
    pub limits: ConnectionLimits,
    /// Fds one connection of this transport may hold (socket included).
    pub weight: usize,
    pub privileged: PrivilegedCheck,
    /// Closes refused sockets whose queue holds passed fds (see
    /// [`close_socket`]).
    pub closer: Arc<Closer>,
}

fn peer_ids(stream: &UnixStream) -> Option<(u32, u32, Vec<u32>)> {
    // Our own SO_PEERCRED wrapper: rustix's `UCred` holds a non-zero pid,
    // and a peer outside our pid namespace has pid 0.
    let (_, uid, gid) = crate::os::sys::peer_cred(stream.as_fd()).ok()?;
    let groups = crate::os::sys::peer_groups(stream.as_fd()).unwrap_or_default();
    Some((uid, gid, groups))
}

/// How much of a closing socket's queue [`close_socket`] peeks at; a longer
/// queue is assumed to hold fds.
const PEEK_LIMIT: usize = 64 * 1024 + 1;

/// Closes a connection's socket. Closing it releases whatever fds are still
/// queued on it, on the closing thread, and such a release can block (see
/// `crate::transport::varlink::Receiver::take`). So the peer is cut off first (no more bytes can
/// come), then a peek says whether fds wait in the queue: if not, the
/// socket is closed here; if so, on a closer thread, which holds the
/// connection's slot (and one unit of the sender's fd budget, charged
/// whatever the budget: the connection is going either way) until the
/// close returns, so the cost stays with the sender's caps.
pub fn close_socket<S: Send + 'static>(stream: UnixStream, uid: u32, closer: &Arc<Closer>, slot: S) {
    if !may_hold_fds(&stream) {
        return;
    }
    match stream.into_std() {
        Ok(stream) => {
            tracing::debug!(
                caller_uid = uid,
                "fds queued on a closed connection; closing it off the executor"
            );
            let unit = closer.charge(uid, 1);
            crate::transport::closer::drop_off_executor((stream, slot, unit));
        }
        Err(err) => tracing::warn!(error = %err, "cannot take a socket off the runtime; closing it here"),
    }
}

/// Whether `stream`'s receive queue may hold passed fds. Shuts the read
/// side down first, so the answer cannot change afterwards.
fn may_hold_fds(stream: &UnixStream) -> bool {
    let _ = rustix::net::shutdown(stream, rustix::net::Shutdown::Read);
    let queued = match rustix::io::ioctl_fionread(stream) {
        Ok(0) => return false,
        Ok(queued) => queued as usize,
        Err(_) => return true,
    };
    let mut buf = vec![0u8; queued.min(PEEK_LIMIT)];
    match crate::os::sys::peek_for_fds(stream.as_fd(), &mut buf) {
        // Everything queued was seen and none of it carries fds.
        Ok((n, false)) => n < queued,
        _ => true,
    }
}

/// Accepts connections until `deliver` returns false (the transport is
/// shutting down), enforcing the connection caps and identifying each peer;
/// `deliver` receives the accepted ones.
///
/// The caps are checked on the accepting task from SO_PEERCRED alone, so a
/// flood over its caps costs two getsockopt calls and a close per
/// connection. Identification reads /proc, which can block, so it runs on
/// the blocking pool, one task per counted connection: a peer that is slow
/// to identify never holds up the accept of the next one.
pub async fn accept_loop(
    listener: UnixListener,
    features: Arc<KernelFeatures>,
    config: AcceptConfig,
    counter: Arc<ConnectionCounter>,
    deliver: impl Fn(Accepted) -> bool + Send + Sync + 'static,
) {
    let limits = config.limits;
    let deliver = Arc::new(deliver);
    let stopped = Arc::new(AtomicBool::new(false));
    while !stopped.load(Ordering::Relaxed) {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted_at = Instant::now();
        let Some((uid, gid, groups)) = peer_ids(&stream) else {
            tracing::debug!("no SO_PEERCRED for a new connection; closing it");
            crate::engine::metrics::get().connection(false);
            continue;
        };
        let mut privileged = None;
        let mut is_privileged = || *privileged.get_or_insert_with(|| (config.privileged)(uid, gid, &groups));
        let slot = match counter.try_acquire(uid, config.weight, &limits, &mut is_privileged) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::warn!(
                    caller_uid = uid,
                    limit = why.as_str(),
                    open = counter.open(),
                    fds = counter.fds(),
                    "connection refused: over the {}",
                    why.as_str()
                );
                crate::engine::metrics::get().connection(false);
                close_socket(stream, uid, &config.closer, ());
                continue;
            }
        };
        let privileged = is_privileged();
        let (features, deliver, stopped) = (Arc::clone(&features), Arc::clone(&deliver), Arc::clone(&stopped));
        let closer = Arc::clone(&config.closer);
        tokio::spawn(async move {
            let identified = tokio::task::spawn_blocking(move || {
                let caller = Caller::from_socket(stream.as_fd(), &features);
                (stream, caller)
            })
            .await;
            let Ok((stream, identified)) = identified else {
                return;
            };
            let caller = match identified {
                Ok(caller) => caller,
                Err(err) => {
                    tracing::warn!(error = %err, "could not identify a peer; closing its connection");
                    crate::engine::metrics::get().connection(false);
                    close_socket(stream, uid, &closer, slot);
                    return;
                }
            };
            crate::engine::metrics::get().connection(true);
            if !deliver(Accepted {
                stream,
                caller: Arc::new(caller),
                slot,
                privileged,
                accepted_at,
            }) {
                stopped.store(true, Ordering::Relaxed);
            }
        });
    }
}

/// What a gRPC request learns about its connection: who is calling, and a
/// flag the request sets to say the connection has carried a request.
#[derive(Clone)]
pub struct PeerInfo {
    pub caller: Arc<Caller>,
    pub served: Arc<AtomicBool>,
}

pin_project! {
    /// A connection with its caller and a slow-loris timer: until the
    /// connection has carried a request, reads reset the timer, and when it
    /// fires the next read fails, which closes the connection. Once a
    /// request arrived (`served`), the timer is off: HTTP/2 keepalive pings
    /// find dead peers, and the per-uid cap bounds live ones.
    pub struct PeerStream {
        #[pin]
        stream: UnixStream,
        idle: Pin<Box<Sleep>>,
        idle_timeout: Duration,
        info: PeerInfo,
        _slot: ConnectionSlot,
    }
}

impl PeerStream {
    pub fn new(accepted: Accepted, idle_timeout: Duration) -> Self {
        PeerStream {
            stream: accepted.stream,
            idle: Box::pin(tokio::time::sleep_until(accepted.accepted_at + idle_timeout)),
            idle_timeout,
            info: PeerInfo {
                caller: accepted.caller,
                served: Arc::new(AtomicBool::new(false)),
            },
            _slot: accepted.slot,
        }
    }

    pub fn info(&self) -> &PeerInfo {
        &self.info
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        match this.stream.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + *this.idle_timeout;
                    this.idle.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending if this.info.served.load(Ordering::Relaxed) => Poll::Pending,
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle"))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
