//! Unix-socket listening shared by every transport: binding, identifying each
//! peer at accept, connection caps (in total and per uid) and an idle
//! timeout per connection.
//!
//! A peer over its caps is closed at once, before it costs a task; a peer
//! that stops sending is dropped when its idle timer fires. Neither affects
//! any other connection.

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

use crate::caller::Caller;
use crate::features::KernelFeatures;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_total: usize,
    pub max_per_uid: usize,
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_total: 4096,
            max_per_uid: 256,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counts open connections, in total and per caller uid.
#[derive(Debug, Default)]
pub struct ConnectionCounter {
    inner: Mutex<(usize, HashMap<u32, usize>)>,
}

/// One counted connection; uncounted on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    counter: Arc<ConnectionCounter>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut inner = self.counter.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0 = inner.0.saturating_sub(1);
        if let Some(count) = inner.1.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                inner.1.remove(&self.uid);
            }
        }
    }
}

impl ConnectionCounter {
    fn try_acquire(self: &Arc<Self>, uid: u32, limits: &ConnectionLimits) -> Option<ConnectionSlot> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let per_uid = inner.1.get(&uid).copied().unwrap_or(0);
        if inner.0 >= limits.max_total || per_uid >= limits.max_per_uid {
            return None;
        }
        inner.0 += 1;
        *inner.1.entry(uid).or_insert(0) += 1;
        Some(ConnectionSlot {
            counter: Arc::clone(self),
            uid,
        })
    }

    pub fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

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
}

/// Accepts connections until `deliver` returns false (the transport is
/// shutting down), identifying each peer and enforcing the connection caps;
/// `deliver` receives the accepted ones.
///
/// Identification reads /proc, which can block, so it runs on the blocking
/// pool, one task per new connection: a peer that is slow to identify never
/// holds up the accept of the next one.
pub async fn accept_loop(
    listener: UnixListener,
    features: Arc<KernelFeatures>,
    limits: ConnectionLimits,
    counter: Arc<ConnectionCounter>,
    deliver: impl Fn(Accepted) -> bool + Send + Sync + 'static,
) {
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
        let (features, counter, deliver, stopped) = (
            Arc::clone(&features),
            Arc::clone(&counter),
            Arc::clone(&deliver),
            Arc::clone(&stopped),
        );
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
                    return;
                }
            };
            let Some(slot) = counter.try_acquire(caller.uid, &limits) else {
                tracing::warn!(
                    caller_uid = caller.uid,
                    caller_pid = caller.pid,
                    open = counter.open(),
                    "connection limit reached; closing the new connection"
                );
                return;
            };
            if !deliver(Accepted {
                stream,
                caller: Arc::new(caller),
                slot,
            }) {
                stopped.store(true, Ordering::Relaxed);
            }
        });
    }
}

pin_project! {
    /// A connection with its caller and an idle timer: reads reset it, and
    /// when it fires the next read fails, which closes the connection.
    pub struct PeerStream {
        #[pin]
        stream: UnixStream,
        idle: Pin<Box<Sleep>>,
        idle_timeout: Duration,
        caller: Arc<Caller>,
        _slot: ConnectionSlot,
    }
}

impl PeerStream {
    pub fn new(accepted: Accepted, idle_timeout: Duration) -> Self {
        PeerStream {
            stream: accepted.stream,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_timeout,
            caller: accepted.caller,
            _slot: accepted.slot,
        }
    }

    pub fn caller(&self) -> &Arc<Caller> {
        &self.caller
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
