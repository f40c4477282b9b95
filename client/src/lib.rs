// SPDX-License-Identifier: MIT OR Apache-2.0
//! Client for the reapd broker.
//!
//! ```no_run
//! # async fn demo() -> Result<(), reapd_client::Error> {
//! let mut client = reapd_client::Client::connect("/run/reapd/grpc.sock").await?;
//! let caps = client.capabilities().await?;
//! println!("kill path: {}", caps.kill_path);
//! let target = reapd_client::Target::pid(4242);
//! if client.check_permission(target).await?.allowed {
//!     let report = client.kill_and_reap(target, None).await?;
//!     println!("{} bytes released", report.bytes_released);
//! }
//! # Ok(()) }
//! ```
//!
//! [`blocking::Client`] wraps the same calls for code without an async
//! runtime.
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

pub mod events;
pub mod manager;
pub mod varlink;

pub use events::{KillEvent, KillEvents, Requester, Victim};
pub use manager::{Candidates, CandidatesQuery, Group, GroupReport, KillOptions, SortKey};

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use reapd_proto::v1 as pb;
use reapd_proto::v1::reaper_client::ReaperClient;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Uri};

/// The broker's default gRPC socket.
pub const DEFAULT_SOCKET: &str = "/run/reapd/grpc.sock";

/// Errors, one per refusal the API documents (the same whichever
/// transport answered), plus failures to reach the broker. Transport types
/// stay inside: a source error is only reachable through
/// `std::error::Error::source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection could be made to the socket at `path`.
    #[error("cannot reach the broker at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The request was malformed; `parameter` names the API parameter to
    /// blame when the broker said (varlink name, e.g. `pid`, `pidns`).
    #[error("invalid argument: {message}")]
    InvalidArgument { message: String, parameter: Option<String> },
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
        message: String,
        retry_after: Option<Duration>,
    },
    /// The broker did not understand the call (an older broker, or the
    /// wrong socket).
    #[error("not understood by the broker: {0}")]
    Unsupported(String),
    /// The connection failed or broke, or the reply was not the API's
    /// (e.g. a gRPC client pointed at the varlink socket).
    #[error("transport failed: {message}")]
    Transport {
        message: String,
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
    pub reason: String,
    /// `Unspecified` when the broker sent none (an older broker).
    pub kind: DecisionKind,
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

/// A process, by pid, optionally guarded by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`; see [`start_time_of`].
    pub start_time: Option<u64>,
}

impl Target {
    pub fn pid(pid: i32) -> Self {
        Target { pid, start_time: None }
    }

    /// The target, guarded by the start time read now from `/proc`.
    pub fn pinned(pid: i32) -> std::io::Result<Self> {
        Ok(Target {
            pid,
            start_time: Some(start_time_of(pid)?),
        })
    }
}

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

/// An async connection to the broker. Reconnects once, transparently, when
/// the connection is gone (see the crate docs).
#[derive(Debug, Clone)]
pub struct Client {
    inner: ReaperClient<Channel>,
    path: PathBuf,
    reconnects: u64,
}

impl Client {
    /// Connects to the broker's gRPC socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        Ok(Client {
            inner: ReaperClient::new(Self::channel(&path).await?),
            path,
            reconnects: 0,
        })
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
        let path = path.to_path_buf();
        let socket = path.clone();
        // The URI is required by the API but unused: the connector below
        // always dials the Unix socket. Its authority is what grpcio clients
        // must also set (`grpc.default_authority`).
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
            .await
            .map_err(|source| Error::Connect {
                path,
                source: Box::new(source),
            })?;
        Ok(channel)
    }

    /// Kills `target` and reaps its memory. `wait_for_exit`: also wait up to
    /// this long for the process to be gone.
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

    /// Whether the broker would kill `target` for this caller, and why.
    pub async fn check_permission(&mut self, target: Target) -> Result<Permission, Error> {
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

    pub async fn capabilities(&mut self) -> Result<Capabilities, Error> {
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
/// call reconnects once, transparently, as [`Client`] does.
pub mod blocking {
    use super::*;

    pub struct Client {
        runtime: tokio::runtime::Runtime,
        inner: super::Client,
    }

    impl Client {
        pub fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime needs no resources that can run out");
            let inner = runtime.block_on(super::Client::connect(path))?;
            Ok(Client { runtime, inner })
        }

        pub fn kill_and_reap(&mut self, target: Target, wait_for_exit: Option<Duration>) -> Result<KillReport, Error> {
            self.runtime.block_on(self.inner.kill_and_reap(target, wait_for_exit))
        }

        pub fn check_permission(&mut self, target: Target) -> Result<Permission, Error> {
            self.runtime.block_on(self.inner.check_permission(target))
        }

        /// The runtime and the async client, for the calls other modules
        /// add (`manager`).
        pub(crate) fn parts(&mut self) -> (&tokio::runtime::Runtime, &mut super::Client) {
            (&self.runtime, &mut self.inner)
        }

        pub fn capabilities(&mut self) -> Result<Capabilities, Error> {
            self.runtime.block_on(self.inner.capabilities())
        }

        /// How many times this client reconnected after a lost connection.
        pub fn reconnects(&self) -> u64 {
            self.inner.reconnects()
        }
    }
}
