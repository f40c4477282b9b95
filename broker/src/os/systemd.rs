// SPDX-License-Identifier: MIT OR Apache-2.0
//! systemd integration: socket activation, `sd_notify`, the watchdog, idle
//! exit, and whether stderr is the journal.
//!
//! Everything that reads the environment ([`Activation::take`],
//! [`journal_stream_is_stderr`]) must run in `main` before the async
//! runtime starts: it removes `LISTEN_*` from the environment (so no child
//! could inherit them) and takes ownership of the inherited descriptors,
//! which is only sound while the process is single-threaded.
//! Outside systemd every function here is a harmless no-op.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::net::{sockopt, AddressFamily, SocketType};
use sd_notify::NotifyState;

use crate::os::sys;
use crate::transport::listener::ConnectionCounter;

/// The `FileDescriptorName=` of the gRPC socket in `reapd.socket`.
pub const GRPC_FD_NAME: &str = "grpc";
/// The `FileDescriptorName=` of the varlink socket in `reapd.socket`.
pub const VARLINK_FD_NAME: &str = "varlink";
/// systemd allows at most this many passed descriptors in practice; more
/// is a hostile or broken environment, not a configuration.
const MAX_LISTEN_FDS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("LISTEN_FDS: {0}")]
    ListenFds(String),
    #[error("passed descriptor {fd} (\"{name}\") is not a listening AF_UNIX stream socket: {why}")]
    NotAListener { fd: i32, name: String, why: String },
}

/// The listening sockets passed by the service manager, by name.
#[derive(Debug, Default)]
pub struct Activation {
    sockets: Vec<(String, UnixListener)>,
    activated: bool,
}

impl Activation {
    /// Takes `LISTEN_FDS`/`LISTEN_FDNAMES` (when `LISTEN_PID` is this
    /// process) and unsets them. Every passed fd must be a listening
    /// AF_UNIX stream socket. A single unnamed fd is taken as the gRPC
    /// socket, so `systemd-socket-activate -l PATH` without `--fdname`
    /// works too.
    pub fn take() -> Result<Self, SystemdError> {
        let passed: Vec<(i32, String)> = match sd_notify::listen_fds_with_names() {
            Ok(fds) => fds.collect(),
            Err(err) => {
                clear_listen_env();
                return Err(SystemdError::ListenFds(err.to_string()));
            }
        };
        clear_listen_env();
        if passed.is_empty() {
            return Ok(Activation::default());
        }
        if passed.len() > MAX_LISTEN_FDS {
            return Err(SystemdError::ListenFds(format!(
                "{} descriptors passed; at most {MAX_LISTEN_FDS}",
                passed.len()
            )));
        }
        let single = passed.len() == 1;
        if passed
            .iter()
            .enumerate()
            .any(|(i, (raw, _))| *raw != sys::LISTEN_FDS_START + i as i32)
        {
            return Err(SystemdError::ListenFds(
                "LISTEN_FDS descriptors are not consecutive from 3".into(),
            ));
        }
        let fds = match sys::take_listen_fds(passed.len()) {
            Some(Ok(fds)) => fds,
            Some(Err(raw)) => return Err(SystemdError::ListenFds(format!("descriptor {raw} is not open"))),
            None => {
                return Err(SystemdError::ListenFds(
                    "the passed descriptors were already taken".into(),
                ))
            }
        };
        let mut sockets = Vec::with_capacity(passed.len());
        for ((raw, name), fd) in passed.into_iter().zip(fds) {
            check_listener(&fd).map_err(|why| SystemdError::NotAListener {
                fd: raw,
                name: name.clone(),
                why,
            })?;
            let listener = UnixListener::from(fd);
            listener
                .set_nonblocking(true)
                .map_err(|err| SystemdError::ListenFds(err.to_string()))?;
            let name = if single && name != VARLINK_FD_NAME {
                GRPC_FD_NAME.to_string()
            } else {
                name
            };
            sockets.push((name, listener));
        }
        Ok(Activation {
            sockets,
            activated: true,
        })
    }

    /// Whether the service manager passed any socket: the broker was
    /// socket-activated and may exit when idle.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Removes and returns the socket named `name`.
    pub fn take_named(&mut self, name: &str) -> Option<UnixListener> {
        let index = self.sockets.iter().position(|(n, _)| n == name)?;
        Some(self.sockets.remove(index).1)
    }

    /// Removes and returns the socket bound at `path`: the fallback when
    /// the names do not tell the sockets apart (a socket unit with two
    /// ListenStream= gives both the same FileDescriptorName=).
    pub fn take_path(&mut self, path: &std::path::Path) -> Option<UnixListener> {
        let index = self.sockets.iter().position(|(_, listener)| {
            listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p == path))
                .unwrap_or(false)
        })?;
        Some(self.sockets.remove(index).1)
    }

    /// Names of the passed sockets nobody took (logged, then closed).
    pub fn leftover_names(&self) -> Vec<String> {
        self.sockets.iter().map(|(name, _)| name.clone()).collect()
    }
}

fn clear_listen_env() {
    // Single-threaded here (see the module doc), so mutating the
    // environment races with nothing.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
}

fn check_listener(fd: &OwnedFd) -> Result<(), String> {
    let kind = sockopt::socket_type(fd.as_fd()).map_err(|err| err.to_string())?;
    if kind != SocketType::STREAM {
        return Err(format!("socket type {kind:?}"));
    }
    if !sockopt::socket_acceptconn(fd.as_fd()).map_err(|err| err.to_string())? {
        return Err("not listening".into());
    }
    let family = sockopt::socket_domain(fd.as_fd()).map_err(|err| err.to_string())?;
    if family != AddressFamily::UNIX {
        return Err(format!("address family {family:?}"));
    }
    Ok(())
}

/// Whether stderr is the journal stream systemd set up
/// (`JOURNAL_STREAM=dev:ino` matching fd 2), so logs should go to journald
/// as structured entries instead of text.
pub fn journal_stream_is_stderr() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(stat) => stat.st_dev == dev && stat.st_ino == ino,
        Err(_) => false,
    }
}

/// Sends `state` to the service manager if there is one (`NOTIFY_SOCKET`).
/// A failure is logged, never fatal: the broker works without systemd.
fn notify(state: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(state) {
        tracing::warn!(error = %err, "sd_notify failed");
    }
}

/// `READY=1` with a status line.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new `STATUS=` line (shown by `systemctl status`).
pub fn notify_status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`: the broker is finishing calls in flight.
pub fn notify_stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, as
/// `sd_watchdog_enabled(3)` recommends; `None` without a watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2)
}

/// Pings the watchdog forever. It runs on the async runtime, so a wedged
/// runtime stops the pings and systemd restarts the broker.
pub async fn watchdog_loop(interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

/// Resolves once no connection has been open for `idle`. Used only when
/// socket-activated: the listening socket stays with systemd, so a client
/// that connects after this resolves queues in the backlog and starts a
/// new broker; no connection is lost.
pub async fn idle_exit(counter: Arc<ConnectionCounter>, idle: Duration) {
    let step = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(step).await;
        if counter.open() > 0 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= idle {
            tracing::info!(
                idle_secs = idle.as_secs_f64(),
                "idle with no connections; exiting (the socket stays with systemd)"
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_match_stderr() {
        // A made-up dev:ino never matches the real stderr.
        std::env::set_var("JOURNAL_STREAM", "1:1");
        assert!(!journal_stream_is_stderr());
        std::env::set_var("JOURNAL_STREAM", "garbage");
        assert!(!journal_stream_is_stderr());
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!journal_stream_is_stderr());
    }

    #[test]
    fn not_activated_without_listen_env() {
        std::env::remove_var("LISTEN_PID");
        let activation = Activation::take().expect("no LISTEN_FDS is fine");
        assert!(!activation.activated());
    }
}
