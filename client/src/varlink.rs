// SPDX-License-Identifier: MIT OR Apache-2.0
//! A blocking varlink client for the broker's `io.reapd.Reaper` interface,
//! including passing a pidfd with a call (SCM_RIGHTS) so the broker acts on
//! exactly the process the client holds.
//!
//! ```no_run
//! # fn demo() -> Result<(), reapd_client::varlink::Error> {
//! use reapd_client::varlink::{pidfd_of, Client, VarlinkTarget};
//! let mut client = Client::connect(reapd_client::varlink::DEFAULT_SOCKET)?;
//! let pidfd = pidfd_of(4242, None)?;
//! let report = client.kill_and_reap(VarlinkTarget::Pidfd(pidfd), None)?;
//! println!("{}", report.outcome);
//! # Ok(()) }
//! ```

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde_json::{json, Map, Value};

use crate::{Capabilities, KillReport, Permission, Target};

/// The broker's default varlink socket.
pub const DEFAULT_SOCKET: &str = "/run/reapd/io.reapd.Reaper";

/// Largest reply the client reads (a group kill lists at most ~2 MiB of
/// members; most replies are a few hundred bytes).
const MAX_REPLY_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the broker at {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("varlink connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected reply from the broker: {0}")]
    Protocol(String),
    /// The broker answered with a varlink error.
    #[error("{name}: {parameters}")]
    Reply { name: String, parameters: Value },
    /// The client could not name the target (`--pidfd-of`).
    #[error("cannot open a pidfd for pid {pid}: {source}")]
    Pidfd { pid: i32, source: std::io::Error },
    #[error("pid {pid} started at {actual}, not {expected}")]
    StartTimeMismatch { pid: i32, expected: u64, actual: u64 },
}

impl Error {
    /// The varlink error name, if the broker answered with one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Error::Reply { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// The same typed errors the gRPC client gives, so callers (and reapctl's
/// exit codes) do not care which transport answered.
impl From<Error> for crate::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Reply {
                ref name,
                ref parameters,
            } => match reapd_proto::model::ApiError::from_varlink(name, parameters) {
                Some(api) => api.into(),
                None => crate::Error::Unsupported(format!("{name}: {parameters}")),
            },
            Error::StartTimeMismatch { .. } => crate::Error::ProcessChanged(err.to_string()),
            Error::Pidfd { ref source, .. } if source.raw_os_error() == Some(libc_esrch()) => {
                crate::Error::NotFound(err.to_string())
            }
            Error::Connect { path, source } => crate::Error::Connect {
                path,
                source: Box::new(source),
            },
            other => crate::Error::Transport {
                message: other.to_string(),
                source: Some(Box::new(other)),
            },
        }
    }
}

fn libc_esrch() -> i32 {
    rustix::io::Errno::SRCH.raw_os_error()
}

/// How a varlink call names its target.
#[derive(Debug)]
pub enum VarlinkTarget {
    Pid(Target),
    /// A pidfd, passed with the call.
    Pidfd(OwnedFd),
}

/// Opens a pidfd for `pid` and, if `expected_start` is given, checks the
/// process it pins started then. The check is race-free: the start time is
/// read after the pidfd pins the process, and trusted only if the process is
/// still running afterwards (a pid is not reused while its process lives).
pub fn pidfd_of(pid: i32, expected_start: Option<u64>) -> Result<OwnedFd, Error> {
    let raw = rustix::process::Pid::from_raw(pid).ok_or_else(|| Error::Pidfd {
        pid,
        source: std::io::Error::from_raw_os_error(libc_esrch()),
    })?;
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        .map_err(|e| Error::Pidfd { pid, source: e.into() })?;
    let start = crate::start_time_of(pid).map_err(|source| Error::Pidfd { pid, source })?;
    let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    if rustix::event::poll(&mut fds, Some(&zero)).map_err(|e| Error::Pidfd { pid, source: e.into() })? != 0 {
        return Err(Error::Pidfd {
            pid,
            source: std::io::Error::from_raw_os_error(libc_esrch()),
        });
    }
    if let Some(expected) = expected_start {
        if expected != start {
            return Err(Error::StartTimeMismatch {
                pid,
                expected,
                actual: start,
            });
        }
    }
    Ok(pidfd)
}

/// A blocking connection to the broker's varlink socket. Calls on one
/// connection are answered in order.
///
/// Long-lived: the broker never closes a connection that completed a call.
/// If the connection is gone anyway (broker restarted or stopped), the next
/// call notices before sending (the socket shows the broker's hang-up) or
/// when its send fails, reconnects and sends it once more. A call whose
/// reply never came after it was sent is retried only if it has no side
/// effect (not `KillAndReap`).
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buffer: Vec<u8>,
    path: PathBuf,
    reconnects: u64,
}

/// One metric value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metric {
    /// E.g. `io.reapd.kills_total`.
    pub name: String,
    pub value: f64,
    /// What tells it from others of its family (e.g. `outcome`, `le`).
    pub fields: Vec<(String, String)>,
}

/// A reply's parameters, or the broker's error.
fn reply_parameters(reply: Value) -> Result<Value, Error> {
    let mut reply = match reply {
        Value::Object(reply) => reply,
        other => return Err(Error::Protocol(format!("reply is not an object: {other}"))),
    };
    let parameters = reply.remove("parameters").unwrap_or_else(|| Value::Object(Map::new()));
    match reply.remove("error") {
        Some(Value::String(name)) => Err(Error::Reply { name, parameters }),
        Some(other) => Err(Error::Protocol(format!("error name is not a string: {other}"))),
        None => Ok(parameters),
    }
}

/// A varlink kill-event subscription ([`Client::watch_kills`]); it owns the
/// connection.
#[derive(Debug)]
pub struct KillEvents {
    client: Client,
}

/// Yields each event as it comes (blocking) and ends when the broker closes
/// the stream (it is shutting down).
impl Iterator for KillEvents {
    type Item = Result<crate::events::KillEvent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let reply = match self.client.receive() {
            Ok(reply) => reply,
            Err(err) if is_disconnect(&err) => return None,
            Err(err) => return Some(Err(err)),
        };
        Some(
            reply_parameters(reply).and_then(|parameters| match parameters.get("event") {
                Some(event) => decode(event.clone()),
                None => Err(Error::Protocol(format!("expected an event, got {parameters}"))),
            }),
        )
    }
}

impl KillEvents {
    /// The connection's fd, to wait for readiness (poll) before `next`.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.client.stream.as_fd()
    }
}

/// The transport failed (not a reply from the broker).
fn is_disconnect(err: &Error) -> bool {
    match err {
        Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::NotConnected
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

impl Client {
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Client {
            stream,
            buffer: Vec::new(),
            path: path.to_path_buf(),
            reconnects: 0,
        })
    }

    /// How many times this client reconnected after a lost connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    fn reconnect(&mut self) -> Result<(), Error> {
        self.stream = UnixStream::connect(&self.path).map_err(|source| Error::Connect {
            path: self.path.clone(),
            source,
        })?;
        self.buffer.clear();
        self.reconnects += 1;
        Ok(())
    }

    /// The broker hung up on this connection (nothing is in flight between
    /// calls, so a readable hang-up means the connection is dead).
    fn broker_hung_up(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            &self.stream,
            rustix::event::PollFlags::RDHUP,
        )];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
    }

    /// Makes one call, passing `fds` with it, and returns the reply's
    /// parameters (or the broker's error).
    pub fn call(&mut self, method: &str, parameters: Value, fds: &[&OwnedFd]) -> Result<Value, Error> {
        let mut message = serde_json::to_vec(&json!({ "method": method, "parameters": parameters }))
            .expect("a serde_json::Value always serializes");
        message.push(0);
        let mut retried = false;
        if self.broker_hung_up() {
            self.reconnect()?;
            retried = true;
        }
        let reply = match self.send(&message, fds) {
            Err(err) if !retried && is_disconnect(&err) => {
                // Not delivered: safe to send again, whatever the method.
                self.reconnect()?;
                retried = true;
                self.send(&message, fds)?;
                self.receive()
            }
            Err(err) => return Err(err),
            Ok(()) => self.receive(),
        };
        let reply = match reply {
            Err(err) if !retried && is_disconnect(&err) && method != "io.reapd.Reaper.KillAndReap" => {
                self.reconnect()?;
                self.send(&message, fds)?;
                self.receive()?
            }
            other => other?,
        };
        reply_parameters(reply)
    }

    /// Makes one call with `more` and returns every reply's parameters, up
    /// to the one without `continues` (for methods that end, such as
    /// `io.systemd.Metrics.List`).
    pub fn call_more(&mut self, method: &str, parameters: Value) -> Result<Vec<Value>, Error> {
        let mut message = serde_json::to_vec(&json!({ "method": method, "parameters": parameters, "more": true }))
            .expect("a serde_json::Value always serializes");
        message.push(0);
        if self.broker_hung_up() {
            self.reconnect()?;
        }
        self.send(&message, &[])?;
        let mut replies = Vec::new();
        loop {
            let reply = self.receive()?;
            let continues = reply.get("continues").and_then(Value::as_bool) == Some(true);
            replies.push(reply_parameters(reply)?);
            if !continues {
                return Ok(replies);
            }
        }
    }

    /// The broker's metrics (`io.systemd.Metrics.List`; root or a `watch`
    /// grant): one entry per value, names prefixed `io.reapd.`.
    pub fn metrics(&mut self) -> Result<Vec<Metric>, Error> {
        Ok(self
            .call_more("io.systemd.Metrics.List", json!({}))?
            .into_iter()
            .map(|m| Metric {
                name: m.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                value: m.get("value").and_then(Value::as_f64).unwrap_or(0.0),
                fields: m
                    .get("fields")
                    .and_then(Value::as_object)
                    .map(|f| {
                        f.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// What each metric family means (`io.systemd.Metrics.Describe`):
    /// (name, type, description).
    pub fn describe_metrics(&mut self) -> Result<Vec<(String, String, String)>, Error> {
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        Ok(self
            .call_more("io.systemd.Metrics.Describe", json!({}))?
            .iter()
            .map(|d| (s(d, "name"), s(d, "type"), s(d, "description")))
            .collect())
    }

    /// Subscribes to kill events (see [`crate::events`]), giving this
    /// connection to the stream: returns once the broker says the
    /// subscription exists (its `ready` reply), so every kill that completes
    /// afterwards and that the caller may see is delivered.
    pub fn watch_kills(mut self) -> Result<KillEvents, Error> {
        let mut message = serde_json::to_vec(&json!({ "method": "io.reapd.Reaper.WatchKills", "more": true }))
            .expect("a serde_json::Value always serializes");
        message.push(0);
        if self.broker_hung_up() {
            self.reconnect()?;
        }
        self.send(&message, &[])?;
        let first = reply_parameters(self.receive()?)?;
        if first.get("ready").and_then(Value::as_bool) != Some(true) {
            return Err(Error::Protocol(format!("expected the ready reply, got {first}")));
        }
        Ok(KillEvents { client: self })
    }

    fn send(&mut self, message: &[u8], fds: &[&OwnedFd]) -> Result<(), Error> {
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let mut sent = 0;
        while sent < message.len() {
            let mut space = vec![std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            // The fds ride with the first byte of the call, as the broker
            // expects; later chunks (if the kernel splits) carry none.
            if sent == 0 && !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
                return Err(Error::Protocol("too many fds for one call".into()));
            }
            match sendmsg(
                &self.stream,
                &[IoSlice::new(&message[sent..])],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(err) => return Err(Error::Io(err.into())),
            }
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<Value, Error> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == 0) {
                let message: Vec<u8> = self.buffer.drain(..=end).collect();
                // Binary bytes here are most likely an HTTP/2 server's
                // greeting: say which socket this probably is.
                return serde_json::from_slice(&message[..end]).map_err(|e| {
                    Error::Protocol(format!(
                        "not a varlink reply ({e}); is this the gRPC socket? (varlink is io.reapd.Reaper)"
                    ))
                });
            }
            if self.buffer.len() > MAX_REPLY_BYTES {
                return Err(Error::Protocol("reply too large".into()));
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the broker closed the connection",
                )));
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    fn target_call(
        &mut self,
        method: &str,
        target: &VarlinkTarget,
        mut extra: Map<String, Value>,
    ) -> Result<Value, Error> {
        match target {
            VarlinkTarget::Pid(t) => {
                extra.insert("pid".into(), json!(t.pid));
                if let Some(start) = t.start_time {
                    extra.insert("startTime".into(), json!(start));
                }
                self.call(method, Value::Object(extra), &[])
            }
            VarlinkTarget::Pidfd(fd) => {
                extra.insert("pidfd".into(), json!(0));
                self.call(method, Value::Object(extra), &[fd])
            }
        }
    }

    pub fn kill_and_reap(
        &mut self,
        target: VarlinkTarget,
        wait_for_exit: Option<Duration>,
    ) -> Result<KillReport, Error> {
        let options = crate::KillOptions {
            wait_for_exit,
            ..Default::default()
        };
        self.kill_and_reap_with(target, options)
    }

    /// Kills `target` paced by `options` (SIGTERM grace, reap delay).
    pub fn kill_and_reap_with(
        &mut self,
        target: VarlinkTarget,
        options: crate::KillOptions,
    ) -> Result<KillReport, Error> {
        let mut extra = Map::new();
        let ms = |d: Duration| json!(d.as_millis().min(u32::MAX as u128) as u64);
        for (name, value) in [
            ("waitForExitMs", options.wait_for_exit),
            ("graceMs", options.grace),
            ("reapDelayMs", options.reap_delay),
        ] {
            if let Some(value) = value {
                extra.insert(name.into(), ms(value));
            }
        }
        decode(self.target_call("io.reapd.Reaper.KillAndReap", &target, extra)?)
    }

    pub fn check_permission(&mut self, target: VarlinkTarget) -> Result<Permission, Error> {
        decode(self.target_call("io.reapd.Reaper.CheckPermission", &target, Map::new())?)
    }

    pub fn capabilities(&mut self) -> Result<Capabilities, Error> {
        decode(self.call("io.reapd.Reaper.GetCapabilities", json!({}), &[])?)
    }
}

/// A reply's parameters as the API's model (serde: the IDL's names).
/// Fields a broker leaves out take their defaults; a wrong type is a
/// protocol error.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(reply: Value) -> Result<T, Error> {
    serde_json::from_value(reply).map_err(|err| Error::Protocol(format!("reply does not match the API: {err}")))
}
