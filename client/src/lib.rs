// SPDX-License-Identifier: MIT OR Apache-2.0
//! Client for the reapd broker.
//!
//! ```no_run
//! # #[cfg(feature = "grpc")]
//! # async fn demo() -> Result<(), reapd_client::Error> {
//! let mut client = reapd_client::Client::connect("/run/reapd/grpc.sock").await?;
//! let caps = client.capabilities().await?;
//! println!("kill path: {}", caps.kill_path);
//! let target = reapd_client::Target::pid(4242);
//! if client.check_permission(target.clone()).await?.allowed {
//!     let report = client.kill_and_reap(target, None).await?;
//!     println!("{} bytes released", report.bytes_released);
//! }
//! # Ok(()) }
//! ```
//!
//! [`blocking::Client`] wraps the same calls for code without an async
//! runtime; [`varlink::Client`] makes them over varlink (blocking, and it
//! can pass a pidfd to name the target).
//!
//! # Features
//!
//! - `grpc` (default): [`Client`], [`blocking::Client`] and the gRPC kill
//!   events, on tonic, hyper and a tokio runtime.
//! - `varlink` (default): the [`varlink`] module, on `serde_json` and
//!   `rustix` only.
//!
//! Either one alone builds (`--no-default-features --features varlink`
//! compiles no tonic, hyper or tokio, and runs no protoc). The result
//! types, [`Target`] and [`Error`] are the same whichever transport
//! answered.
//!
//! # Timeouts
//!
//! Every call is bounded: [`DEFAULT_TIMEOUT`] (30 s) unless the client was
//! given another ([`Client::with_timeout`], [`Client::connect_with_timeout`],
//! and the same on [`blocking::Client`] and [`varlink::Client`]; `None`:
//! unbounded). The bound covers the whole call, including one transparent
//! reconnect and retry. A kill is given longer: on top of the timeout, the
//! waits the broker may make for it, each at most 10 s as the broker caps
//! them: the SIGTERM `grace` and `wait_for_exit` asked for, and the reap
//! delay asked for (10 s when not given: the policy's `reap-delay-ms` may
//! apply). So a plain `kill_and_reap` is bounded at 40 s by default. A call
//! that runs out fails with [`Error::Timeout`]; the broker may still carry
//! it out (a kill may have happened), so check before retrying a kill.
//! Kill-event streams are bounded until the subscription exists, not while
//! waiting for events.
//!
//! # Long-lived connections
//!
//! Hold one client for as long as you like: the broker never closes a
//! connection that has completed a call, however long it then stays idle.
//! When the connection is gone anyway (the broker restarted, was stopped by
//! socket-activation idle exit, or dropped the connection), the next call
//! reconnects and is retried **once**, transparently. A retried
//! `kill_and_reap` never hits a recycled pid: a target given without a start
//! time is pinned to the start time read before the first attempt, and is
//! not retried if that could not be read. Every client here (async and
//! [`blocking`] gRPC, and the [`varlink`] client) behaves this way.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod events;
pub mod manager;
#[cfg(feature = "varlink")]
pub mod varlink;

#[cfg(feature = "grpc")]
pub use events::KillEvents;
pub use events::{KillEvent, Requester, Victim};
pub use manager::{Candidates, CandidatesQuery, Group, GroupReport, KillOptions, SortKey};

#[cfg(feature = "grpc")]
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

#[cfg(feature = "grpc")]
use hyper_util::rt::TokioIo;
#[cfg(feature = "grpc")]
use reapd_proto::v1 as pb;
#[cfg(feature = "grpc")]
use reapd_proto::v1::reaper_client::ReaperClient;
use serde::Serialize;
#[cfg(feature = "grpc")]
use tonic::transport::{Channel, Endpoint, Uri};

/// The broker's default gRPC socket.
pub const DEFAULT_SOCKET: &str = "/run/reapd/grpc.sock";

/// How long a call may take, unless the client was given another bound (see
/// the crate docs, "Timeouts"): 30 s. A kill gets its waits on top.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The broker's cap on each wait it makes within one kill (SIGTERM grace,
/// reap delay, wait for exit).
const BROKER_WAIT_CAP: Duration = Duration::from_secs(10);

/// The bound on one kill: `timeout` plus the waits the broker may make for
/// it (each capped as the broker caps it; an unset reap delay counts the cap,
/// since the policy's default may apply). `None` stays unbounded.
pub(crate) fn kill_timeout(timeout: Option<Duration>, options: &KillOptions) -> Option<Duration> {
    let capped = |wait: Option<Duration>| wait.map_or(Duration::ZERO, |w| w.min(BROKER_WAIT_CAP));
    let reap_delay = options.reap_delay.map_or(BROKER_WAIT_CAP, |w| w.min(BROKER_WAIT_CAP));
    timeout.map(|t| t.saturating_add(capped(options.grace) + capped(options.wait_for_exit) + reap_delay))
}

/// Runs `call` within `limit` (`None`: unbounded), as [`Error::Timeout`]
/// when it runs out.
#[cfg(feature = "grpc")]
async fn within<T>(
    limit: Option<Duration>,
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match limit {
        None => call.await,
        Some(after) => tokio::time::timeout(after, call)
            .await
            .unwrap_or(Err(Error::Timeout { after })),
    }
}

/// Errors, one per refusal the API documents (the same whichever
/// transport answered), plus failures to reach the broker. Transport types
/// stay inside: a source error is only reachable through
/// `std::error::Error::source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection could be made to the socket at `path` (no broker
    /// there, or no permission on the socket).
    #[error("cannot reach the broker at {path}: {source}")]
    Connect {
        /// The socket tried.
        path: PathBuf,
        /// What the connection attempt failed with (for varlink a
        /// `std::io::Error`).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The request was malformed; `parameter` names the API parameter to
    /// blame when the broker said (varlink name, e.g. `pid`, `pidns`).
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// The broker's sentence.
        message: String,
        /// The parameter blamed, if the broker said.
        parameter: Option<String>,
    },
    /// No such process, as far as the caller can see.
    #[error("not found: {0}")]
    NotFound(String),
    /// Refused: by the policy, a protection, degraded mode, or an
    /// unverifiable fact; [`Refusal::kind`] says which.
    #[error("permission denied: {0}")]
    PermissionDenied(Refusal),
    /// The pid no longer names the process meant (start time differs).
    #[error("process changed: {0}")]
    ProcessChanged(String),
    /// Over a rate or in-flight limit; try again after `retry_after`.
    #[error("rate limited: {message}")]
    RateLimited {
        /// The broker's sentence.
        message: String,
        /// When a retry may succeed, if the broker said (`retry-after-ms`).
        retry_after: Option<Duration>,
    },
    /// No answer within the call's bound (`after`; see the crate docs,
    /// "Timeouts"). The broker may still carry the call out: a kill may
    /// have happened.
    #[error("no answer from the broker within {after:?}")]
    Timeout {
        /// The bound that ran out.
        after: Duration,
    },
    /// The broker did not understand the call (an older broker, or the
    /// wrong socket).
    #[error("not understood by the broker: {0}")]
    Unsupported(String),
    /// The connection failed or broke, or the reply was not the API's
    /// (e.g. a gRPC client pointed at the varlink socket).
    #[error("transport failed: {message}")]
    Transport {
        /// What failed.
        message: String,
        /// The transport's own error, if there was one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A broker bug (INTERNAL / `InternalError`).
    #[error("broker error: {0}")]
    Internal(String),
}

/// Why the broker refused: its sentence, the verdict's kind and the rule
/// or protection that decided. Displays as the sentence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The broker's sentence, for people.
    pub reason: String,
    /// The verdict's kind, for programs; `Unspecified` when the broker sent
    /// none (an older broker).
    pub kind: DecisionKind,
    /// The policy rule or built-in protection that decided; empty when none
    /// did (e.g. `NoRule`).
    pub rule: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The one mapping of the API's errors to the client's, whichever
/// transport carried them.
impl From<reapd_proto::model::ApiError> for Error {
    fn from(err: reapd_proto::model::ApiError) -> Self {
        use reapd_proto::model::ErrorKind;
        match err.kind {
            ErrorKind::InvalidArgument => Error::InvalidArgument {
                message: err.message,
                parameter: err.parameter,
            },
            ErrorKind::NotFound => Error::NotFound(err.message),
            ErrorKind::PermissionDenied => Error::PermissionDenied(Refusal {
                reason: err.message,
                kind: err.decision.unwrap_or_default(),
                rule: err.rule,
            }),
            ErrorKind::ProcessChanged => Error::ProcessChanged(err.message),
            ErrorKind::RateLimited => Error::RateLimited {
                message: err.message,
                retry_after: err.retry_after,
            },
            ErrorKind::InvalidMessage => Error::Unsupported(err.message),
            ErrorKind::Internal => Error::Internal(err.message),
        }
    }
}

#[cfg(feature = "grpc")]
impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        use std::error::Error as _;
        // A status made from a transport failure carries its source error;
        // one the broker sent does not.
        match reapd_proto::model::ApiError::from_status(&status) {
            Some(err) if status.source().is_none() => err.into(),
            // The code of a status made here says nothing about the broker
            // (an HTTP/2 protocol error is INTERNAL to tonic), so it is not
            // shown; a protocol error is most likely the varlink socket.
            _ if status.message().contains("h2 protocol error") => Error::Transport {
                message: format!(
                    "not a gRPC server ({}); is this the varlink socket? (give --varlink)",
                    status.message()
                ),
                source: Some(Box::new(status)),
            },
            _ => Error::Transport {
                message: format!("{:?}: {}", status.code(), status.message()),
                source: Some(Box::new(status)),
            },
        }
    }
}

/// A process to act on: a pid, optionally guarded by its start time, and
/// optionally pinned by a pidfd ([`Target::pidfd_of`]). The one target type
/// of both transports: varlink passes the pidfd with the call (the broker
/// then needs no pid at all), gRPC, which carries no fds, sends the pid and
/// the start time read through the pidfd.
#[derive(Debug, Clone)]
pub struct Target {
    /// The process id, in the caller's pid namespace (at least 1).
    pub pid: i32,
    /// When the process started, in clock ticks since boot (field 22 of
    /// `/proc/PID/stat`; see [`start_time_of`]). Given, the broker refuses
    /// with [`Error::ProcessChanged`] unless `pid` still started then (the
    /// pid was not reused).
    pub start_time: Option<u64>,
    /// The pidfd that pins the process, shared by clones of the target.
    pidfd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// Targets are equal when they name the same pid and start time and the
/// same pidfd (or none).
impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        let same_fd = match (&self.pidfd, &other.pidfd) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.pid == other.pid && self.start_time == other.start_time && same_fd
    }
}

impl Eq for Target {}

impl Target {
    /// The process `pid`, unguarded: whichever process has that pid when
    /// the broker looks (a retried kill pins it first; see the crate docs).
    pub fn pid(pid: i32) -> Self {
        Target {
            pid,
            start_time: None,
            pidfd: None,
        }
    }

    /// `pid` guarded by `start_time` (clock ticks since boot).
    pub fn with_start_time(pid: i32, start_time: u64) -> Self {
        Target {
            pid,
            start_time: Some(start_time),
            pidfd: None,
        }
    }

    /// The same target guarded by `start_time` (or unguarded: `None`).
    pub fn start_time(mut self, start_time: Option<u64>) -> Self {
        self.start_time = start_time;
        self
    }

    /// The target, guarded by the start time read now from `/proc`.
    pub fn pinned(pid: i32) -> std::io::Result<Self> {
        Ok(Target::with_start_time(pid, start_time_of(pid)?))
    }

    /// The process `pid` pinned by a pidfd opened now, checked against
    /// `expected_start` if given (see [`varlink::pidfd_of`]); its start time
    /// is read through the pinned process. Errors: as `pidfd_of`.
    #[cfg(feature = "varlink")]
    pub fn pidfd_of(pid: i32, expected_start: Option<u64>) -> Result<Self, varlink::Error> {
        let pidfd = varlink::pidfd_of(pid, expected_start)?;
        // pidfd_of read the start time after pinning and checked the
        // process still ran: this read names the same process.
        let start_time = start_time_of(pid).map_err(|source| varlink::Error::Pidfd { pid, source })?;
        Ok(Target {
            pid,
            start_time: Some(start_time),
            pidfd: Some(std::sync::Arc::new(pidfd)),
        })
    }

    /// The pidfd pinning the process, if the target was made with one.
    pub fn pidfd(&self) -> Option<&std::os::fd::OwnedFd> {
        self.pidfd.as_deref()
    }
}

#[cfg(feature = "grpc")]
impl From<Target> for pb::Target {
    fn from(t: Target) -> Self {
        pb::Target {
            pid: t.pid,
            start_time: t.start_time,
        }
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks.
pub fn start_time_of(pid: i32) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = text.rfind(')').map(|i| &text[i + 1..]).unwrap_or_default();
    after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))
}

/// The replies' types: the API's one data model, shared with the broker
/// (field names and units documented there).
pub use reapd_proto::model::{
    Capabilities, DecisionKind, KillKind, KillPath, KillReport, MemoryUsage, Outcome, Permission, ProcessInfo,
};

/// The call failed in the client's transport (no connection, connection
/// closed or reset), not with a status the broker sent: worth one retry on a
/// new connection. A status from the broker carries no source error; one
/// made from a transport failure does.
#[cfg(feature = "grpc")]
fn is_transport_failure(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    status.source().is_some()
        && !matches!(
            status.code(),
            tonic::Code::InvalidArgument
                | tonic::Code::NotFound
                | tonic::Code::PermissionDenied
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted
        )
}

/// An async gRPC connection to the broker. Reconnects once, transparently,
/// when the connection is gone (see the crate docs); every call is bounded
/// by [`Client::timeout`].
#[cfg(feature = "grpc")]
#[derive(Debug, Clone)]
pub struct Client {
    inner: ReaperClient<Channel>,
    path: PathBuf,
    reconnects: u64,
    timeout: Option<Duration>,
}

#[cfg(feature = "grpc")]
impl Client {
    /// Connects to the broker's gRPC socket at `path` (usually
    /// [`DEFAULT_SOCKET`]), with calls bounded by [`DEFAULT_TIMEOUT`].
    /// Errors: [`Error::Connect`], or [`Error::Timeout`] if the connection
    /// is not made within that bound.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::connect_with_timeout(path, Some(DEFAULT_TIMEOUT)).await
    }

    /// As [`Client::connect`], with `timeout` bounding the connection and
    /// every call (`None`: unbounded).
    pub async fn connect_with_timeout(path: impl AsRef<Path>, timeout: Option<Duration>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let channel = within(timeout, Self::channel(&path)).await?;
        Ok(Client {
            inner: ReaperClient::new(channel),
            path,
            reconnects: 0,
            timeout,
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

    /// Replaces the channel with a new connection.
    async fn reconnect(&mut self) -> Result<(), Error> {
        self.inner = ReaperClient::new(Self::channel(&self.path).await?);
        self.reconnects += 1;
        Ok(())
    }

    async fn channel(path: &Path) -> Result<Channel, Error> {
        let socket = path.to_path_buf();
        // The URI is required by the API but unused: the connector below
        // always dials the Unix socket. Its authority is what grpcio clients
        // must also set (`grpc.default_authority`).
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
            .await
            .map_err(|source| Error::Connect {
                path: path.to_path_buf(),
                source: Box::new(source),
            })
    }

    /// Kills `target` with SIGKILL and reaps its memory. `wait_for_exit`:
    /// also wait up to this long (at most 10 s) for the process to be gone.
    /// Retried once after a lost connection, pinned to the start time (see
    /// the crate docs). Errors: [`Error::NotFound`],
    /// [`Error::PermissionDenied`], [`Error::ProcessChanged`],
    /// [`Error::RateLimited`], [`Error::Timeout`] (the kill may have
    /// happened), [`Error::Transport`].
    pub async fn kill_and_reap(
        &mut self,
        target: Target,
        wait_for_exit: Option<Duration>,
    ) -> Result<KillReport, Error> {
        let options = KillOptions {
            wait_for_exit,
            ..KillOptions::default()
        };
        self.kill_and_reap_with(target, options).await
    }

    /// Whether the broker would kill `target` for this caller, and why (no
    /// side effect). A refusal is an answer (`allowed: false`), not an
    /// error. Errors: [`Error::NotFound`], [`Error::ProcessChanged`],
    /// [`Error::InvalidArgument`], [`Error::Timeout`], [`Error::Transport`].
    pub async fn check_permission(&mut self, target: Target) -> Result<Permission, Error> {
        within(self.timeout, self.check_permission_unbounded(target)).await
    }

    async fn check_permission_unbounded(&mut self, target: Target) -> Result<Permission, Error> {
        let request = pb::CheckPermissionRequest {
            target: Some(target.into()),
        };
        let reply = match self.inner.check_permission(request).await {
            Err(status) if is_transport_failure(&status) => {
                self.reconnect().await?;
                self.inner.check_permission(request).await?
            }
            other => other?,
        }
        .into_inner();
        Ok(reply.into())
    }

    /// What the broker and the kernel under it can do (any caller).
    /// Errors: [`Error::Timeout`], [`Error::Transport`].
    pub async fn capabilities(&mut self) -> Result<Capabilities, Error> {
        within(self.timeout, self.capabilities_unbounded()).await
    }

    async fn capabilities_unbounded(&mut self) -> Result<Capabilities, Error> {
        let reply = match self.inner.get_capabilities(pb::GetCapabilitiesRequest {}).await {
            Err(status) if is_transport_failure(&status) => {
                self.reconnect().await?;
                self.inner.get_capabilities(pb::GetCapabilitiesRequest {}).await?
            }
            other => other?,
        }
        .into_inner();
        Ok(reply.into())
    }
}

/// A blocking wrapper around [`Client`], with its own small runtime. The
/// runtime runs only during calls, so between calls nothing answers the
/// broker's HTTP/2 pings; if the broker then drops the connection, the next
/// call reconnects once, transparently, as [`Client`] does. Calls are
/// bounded as [`Client`]'s are.
#[cfg(feature = "grpc")]
pub mod blocking {
    use super::*;

    /// A blocking gRPC connection to the broker: [`super::Client`]'s calls,
    /// each run to completion on a runtime of its own.
    pub struct Client {
        runtime: tokio::runtime::Runtime,
        inner: super::Client,
    }

    impl Client {
        /// As [`super::Client::connect`].
        pub fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
            Self::connect_with_timeout(path, Some(DEFAULT_TIMEOUT))
        }

        /// As [`super::Client::connect_with_timeout`].
        pub fn connect_with_timeout(path: impl AsRef<Path>, timeout: Option<Duration>) -> Result<Self, Error> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime needs no resources that can run out");
            let inner = runtime.block_on(super::Client::connect_with_timeout(path, timeout))?;
            Ok(Client { runtime, inner })
        }

        /// As [`super::Client::with_timeout`].
        pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
            self.inner = self.inner.with_timeout(timeout);
            self
        }

        /// As [`super::Client::timeout`].
        pub fn timeout(&self) -> Option<Duration> {
            self.inner.timeout()
        }

        /// As [`super::Client::kill_and_reap`].
        pub fn kill_and_reap(&mut self, target: Target, wait_for_exit: Option<Duration>) -> Result<KillReport, Error> {
            self.runtime.block_on(self.inner.kill_and_reap(target, wait_for_exit))
        }

        /// As [`super::Client::check_permission`].
        pub fn check_permission(&mut self, target: Target) -> Result<Permission, Error> {
            self.runtime.block_on(self.inner.check_permission(target))
        }

        /// The runtime and the async client, for the calls other modules
        /// add (`manager`).
        pub(crate) fn parts(&mut self) -> (&tokio::runtime::Runtime, &mut super::Client) {
            (&self.runtime, &mut self.inner)
        }

        /// As [`super::Client::capabilities`].
        pub fn capabilities(&mut self) -> Result<Capabilities, Error> {
            self.runtime.block_on(self.inner.capabilities())
        }

        /// How many times this client reconnected after a lost connection.
        pub fn reconnects(&self) -> u64 {
            self.inner.reconnects()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_kill_is_bounded_by_the_timeout_plus_the_waits_the_broker_may_make() {
        // No options: the policy's reap delay may apply (at most 10 s).
        assert_eq!(kill_timeout(Some(S(30)), &KillOptions::default()), Some(S(40)));
        let asked = KillOptions {
            wait_for_exit: Some(S(2)),
            grace: Some(S(60)),
            reap_delay: Some(Duration::ZERO),
        };
        // Each wait as the broker caps it: grace 60 s counts 10 s.
        assert_eq!(kill_timeout(Some(S(5)), &asked), Some(S(17)));
        assert_eq!(kill_timeout(None, &asked), None);
        assert_eq!(kill_timeout(Some(Duration::MAX), &asked), Some(Duration::MAX));
    }
}
