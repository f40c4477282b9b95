// SPDX-License-Identifier: MIT OR Apache-2.0
//! A blocking varlink client for the broker's `io.reapd.Reaper` interface,
//! including passing a pidfd with a call (SCM_RIGHTS) so the broker acts on
//! exactly the process the client holds.
//!
//! ```no_run
//! # fn demo() -> Result<(), reapd_client::varlink::Error> {
//! use reapd_client::{varlink::Client, Target};
//! let mut client = Client::connect(reapd_client::varlink::DEFAULT_SOCKET)?;
//! let target = Target::pidfd_of(4242, None)?;
//! let report = client.kill_and_reap(target, None)?;
//! println!("{}", report.outcome);
//! # Ok(()) }
//! ```
//!
//! Calls are bounded as the gRPC client's are (the crate docs, "Timeouts"):
//! each read and write of a call waits at most what is left of the call's
//! bound. A connection whose call timed out is not used again (its late
//! reply would answer the next call): the next call reconnects.

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde_json::{json, Map, Value};

use crate::{Capabilities, KillReport, Permission, Target, DEFAULT_TIMEOUT};

/// The broker's default varlink socket.
pub const DEFAULT_SOCKET: &str = "/run/reapd/io.reapd.Reaper";

/// Largest reply the client reads (a group kill lists at most ~2 MiB of
/// members; most replies are a few hundred bytes).
const MAX_REPLY_BYTES: usize = 8 << 20;

/// What a varlink call can fail with, the broker's answer kept as sent
/// (`Reply`); `From<Error> for crate::Error` gives the transport-independent
/// form. New variants may come: match with a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket at `path` could not be connected to (no broker there, or
    /// no permission on the socket).
    #[error("cannot reach the broker at {path}: {source}")]
    Connect {
        /// The socket tried.
        path: PathBuf,
        /// What `connect(2)` failed with.
        source: std::io::Error,
    },
    /// The connection failed during the call (closed, reset).
    #[error("varlink connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The broker sent something that is not a varlink reply (or one above
    /// 8 MiB).
    #[error("unexpected reply from the broker: {0}")]
    Protocol(String),
    /// The broker answered with a varlink error: its name (e.g.
    /// `io.reapd.Reaper.PermissionDenied`) and parameters.
    #[error("{name}: {parameters}")]
    Reply {
        /// The error's fully qualified name.
        name: String,
        /// The error's parameters, as sent.
        parameters: Value,
    },
    /// The client could not name the target (`--pidfd-of`).
    #[error("cannot open a pidfd for pid {pid}: {source}")]
    Pidfd {
        /// The process asked for.
        pid: i32,
        /// Why its pidfd could not be opened (ESRCH: no such process).
        source: std::io::Error,
    },
    /// The process a pidfd pins did not start at the expected time.
    #[error("pid {pid} started at {actual}, not {expected}")]
    StartTimeMismatch {
        /// The process asked for.
        pid: i32,
        /// The start time given (clock ticks since boot).
        expected: u64,
        /// Its start time (clock ticks since boot).
        actual: u64,
    },
    /// No answer within the call's bound (`after`); the broker may still
    /// carry the call out.
    #[error("no answer from the broker within {after:?}")]
    Timeout {
        /// The bound that ran out.
        after: Duration,
    },
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
            Error::Timeout { after } => crate::Error::Timeout { after },
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
/// effect (not `KillAndReap`). Every call is bounded by [`Client::timeout`].
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buffer: Vec<u8>,
    path: PathBuf,
    reconnects: u64,
    timeout: Option<Duration>,
    /// A call on this connection timed out: its reply may still come, so
    /// the connection must not carry another call.
    stale: bool,
}

/// When a call must be done by: its bound and the instant it runs out.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    after: Duration,
    at: Instant,
}

impl Deadline {
    /// From now, for a call bounded by `limit` (`None`: unbounded, or so far
    /// away that `Instant` cannot hold it).
    fn start(limit: Option<Duration>) -> Option<Deadline> {
        limit.and_then(|after| {
            Some(Deadline {
                after,
                at: Instant::now().checked_add(after)?,
            })
        })
    }
}

/// One metric value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metric {
    /// E.g. `io.reapd.kills_total`.
    pub name: String,
    /// Its value (a count, or seconds for latencies).
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
        let reply = match self.client.receive(None) {
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
    /// Connects to the broker's varlink socket at `path` (usually
    /// [`DEFAULT_SOCKET`]), with calls bounded by [`DEFAULT_TIMEOUT`].
    /// Errors: [`Error::Connect`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::connect_with_timeout(path, Some(DEFAULT_TIMEOUT))
    }

    /// As [`Client::connect`], with `timeout` bounding every call (`None`:
    /// unbounded).
    pub fn connect_with_timeout(path: impl AsRef<Path>, timeout: Option<Duration>) -> Result<Self, Error> {
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
            timeout,
            stale: false,
        })
    }

    /// The same client with calls bounded by `timeout` from now on (`None`:
    /// unbounded); a kill gets its waits on top (see the crate docs).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The bound on each call ([`DEFAULT_TIMEOUT`] unless set).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
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
        self.stale = false;
        self.reconnects += 1;
        Ok(())
    }

    /// Before a call: a new connection if the broker hung up on this one or
    /// a timed-out call left it stale. Whether it reconnected.
    fn ready_connection(&mut self) -> Result<bool, Error> {
        if self.stale || self.broker_hung_up() {
            self.reconnect()?;
            return Ok(true);
        }
        Ok(false)
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

    /// Makes one call (`method`, e.g. `io.reapd.Reaper.GetCapabilities`),
    /// passing `fds` with it, and returns the reply's parameters, or the
    /// broker's error as [`Error::Reply`]; [`Error::Timeout`] after
    /// [`Client::timeout`].
    pub fn call(&mut self, method: &str, parameters: Value, fds: &[&OwnedFd]) -> Result<Value, Error> {
        self.call_within(self.timeout, method, parameters, fds)
    }

    /// As [`Client::call`], bounded by `limit`.
    pub(crate) fn call_within(
        &mut self,
        limit: Option<Duration>,
        method: &str,
        parameters: Value,
        fds: &[&OwnedFd],
    ) -> Result<Value, Error> {
        let deadline = Deadline::start(limit);
        let mut message = serde_json::to_vec(&json!({ "method": method, "parameters": parameters }))
            .expect("a serde_json::Value always serializes");
        message.push(0);
        let mut retried = self.ready_connection()?;
        let reply = match self.send(&message, fds, deadline) {
            Err(err) if !retried && is_disconnect(&err) => {
                // Not delivered: safe to send again, whatever the method.
                self.reconnect()?;
                retried = true;
                self.send(&message, fds, deadline)?;
                self.receive(deadline)
            }
            Err(err) => return Err(err),
            Ok(()) => self.receive(deadline),
        };
        let reply = match reply {
            Err(err) if !retried && is_disconnect(&err) && method != "io.reapd.Reaper.KillAndReap" => {
                self.reconnect()?;
                self.send(&message, fds, deadline)?;
                self.receive(deadline)?
            }
            other => other?,
        };
        reply_parameters(reply)
    }

    /// Makes one call with `more` and returns every reply's parameters, up
    /// to the one without `continues` (for methods that end, such as
    /// `io.systemd.Metrics.List`); all of them within [`Client::timeout`].
    pub fn call_more(&mut self, method: &str, parameters: Value) -> Result<Vec<Value>, Error> {
        let deadline = Deadline::start(self.timeout);
        let mut message = serde_json::to_vec(&json!({ "method": method, "parameters": parameters, "more": true }))
            .expect("a serde_json::Value always serializes");
        message.push(0);
        self.ready_connection()?;
        self.send(&message, &[], deadline)?;
        let mut replies = Vec::new();
        loop {
            let reply = self.receive(deadline)?;
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
    /// afterwards and that the caller may see is delivered. Bounded by
    /// [`Client::timeout`] until then; events may be any time apart.
    pub fn watch_kills(mut self) -> Result<KillEvents, Error> {
        let deadline = Deadline::start(self.timeout);
        let mut message = serde_json::to_vec(&json!({ "method": "io.reapd.Reaper.WatchKills", "more": true }))
            .expect("a serde_json::Value always serializes");
        message.push(0);
        self.ready_connection()?;
        self.send(&message, &[], deadline)?;
        let first = reply_parameters(self.receive(deadline)?)?;
        if first.get("ready").and_then(Value::as_bool) != Some(true) {
            return Err(Error::Protocol(format!("expected the ready reply, got {first}")));
        }
        Ok(KillEvents { client: self })
    }

    /// Bounds the next read (or, `write`, the next write) by what is left
    /// until `deadline` (SO_RCVTIMEO, SO_SNDTIMEO; `None`: block). Once it
    /// has passed, the call is over: [`Error::Timeout`], and the connection
    /// is stale.
    fn arm(&mut self, deadline: Option<Deadline>, write: bool) -> Result<(), Error> {
        let left = match deadline {
            None => None,
            Some(d) => match d
                .at
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
            {
                Some(left) => Some(left),
                None => return Err(self.timed_out(d)),
            },
        };
        if write {
            self.stream.set_write_timeout(left)?;
        } else {
            self.stream.set_read_timeout(left)?;
        }
        Ok(())
    }

    /// The call ran out of time: the connection may still get its reply, so
    /// the next call takes a new one.
    fn timed_out(&mut self, deadline: Deadline) -> Error {
        self.stale = true;
        Error::Timeout { after: deadline.after }
    }

    fn send(&mut self, message: &[u8], fds: &[&OwnedFd], deadline: Option<Deadline>) -> Result<(), Error> {
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let mut sent = 0;
        while sent < message.len() {
            self.arm(deadline, true)?;
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
                // SO_SNDTIMEO ran out; `arm` tells whether the deadline did.
                Err(rustix::io::Errno::AGAIN) if deadline.is_some() => continue,
                Err(err) => return Err(Error::Io(err.into())),
            }
        }
        Ok(())
    }

    /// The next reply, read by `deadline` (`None`: however long it takes).
    fn receive(&mut self, deadline: Option<Deadline>) -> Result<Value, Error> {
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
            self.arm(deadline, false)?;
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                // SO_RCVTIMEO ran out (or a signal): `arm` tells whether the
                // deadline did.
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(err) => return Err(err.into()),
            };
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
        limit: Option<Duration>,
        method: &str,
        target: &Target,
        mut extra: Map<String, Value>,
    ) -> Result<Value, Error> {
        // A pidfd names the process exactly: it is passed alone (a pid or
        // start time beside it would be a second name the broker refuses).
        match target.pidfd() {
            Some(fd) => {
                extra.insert("pidfd".into(), json!(0));
                self.call_within(limit, method, Value::Object(extra), &[fd])
            }
            None => {
                extra.insert("pid".into(), json!(target.pid));
                if let Some(start) = target.start_time {
                    extra.insert("startTime".into(), json!(start));
                }
                self.call_within(limit, method, Value::Object(extra), &[])
            }
        }
    }

    /// As [`crate::Client::kill_and_reap`], naming the target by pid or by
    /// a pidfd passed with the call. Not retried once sent. Errors: the
    /// broker's as [`Error::Reply`], [`Error::Timeout`] (the kill may have
    /// happened), [`Error::Io`].
    pub fn kill_and_reap(&mut self, target: Target, wait_for_exit: Option<Duration>) -> Result<KillReport, Error> {
        let options = crate::KillOptions {
            wait_for_exit,
            ..Default::default()
        };
        self.kill_and_reap_with(target, options)
    }

    /// Kills `target` paced by `options` (SIGTERM grace, reap delay),
    /// bounded by [`Client::timeout`] plus those waits (see the crate docs).
    pub fn kill_and_reap_with(&mut self, target: Target, options: crate::KillOptions) -> Result<KillReport, Error> {
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
        let limit = crate::kill_timeout(self.timeout, &options);
        decode(self.target_call(limit, "io.reapd.Reaper.KillAndReap", &target, extra)?)
    }

    /// As [`crate::Client::check_permission`], naming the target by pid or
    /// by a pidfd passed with the call.
    pub fn check_permission(&mut self, target: Target) -> Result<Permission, Error> {
        let limit = self.timeout;
        decode(self.target_call(limit, "io.reapd.Reaper.CheckPermission", &target, Map::new())?)
    }

    /// As [`crate::Client::capabilities`].
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
