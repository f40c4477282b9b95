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

/// Errors, one per status the broker documents, plus transport failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the broker at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("permission denied: {0}")]
    /// Refused: by the policy, a protection, degraded mode, or an
    /// unverifiable fact; [`Refusal::kind`] says which.
    PermissionDenied(Refusal),
    #[error("process changed: {0}")]
    ProcessChanged(String),
    #[error("rate limited: {message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("broker error ({code:?}): {message}")]
    Other { code: tonic::Code, message: String },
}

/// Why the broker refused: its sentence, the verdict's kind ("protected",
/// "no_rule", "denied_by_rule", "degraded", "not_visible", "unverified")
/// and the rule or protection that decided. Displays as the sentence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub reason: String,
    /// Empty when the broker sent none (an older broker).
    pub kind: String,
    pub rule: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The kind and rule of a refusal, from the status's `google.rpc.ErrorInfo`.
fn refusal_of(status: &tonic::Status) -> Refusal {
    use tonic_types::StatusExt;
    let info = status.get_details_error_info();
    let field = |k: &str| {
        info.as_ref()
            .and_then(|i| i.metadata.get(k).cloned())
            .unwrap_or_default()
    };
    Refusal {
        reason: status.message().to_string(),
        kind: field("kind"),
        rule: field("rule"),
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            tonic::Code::InvalidArgument => Error::InvalidArgument(message),
            tonic::Code::NotFound => Error::NotFound(message),
            tonic::Code::PermissionDenied => Error::PermissionDenied(refusal_of(&status)),
            tonic::Code::FailedPrecondition => Error::ProcessChanged(message),
            tonic::Code::ResourceExhausted => {
                let retry_after = status
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis);
                Error::RateLimited { message, retry_after }
            }
            code => Error::Other { code, message },
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

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: i32,
    pub uid: u32,
    pub euid: u32,
    pub suid: u32,
    pub gid: u32,
    pub comm: String,
    pub start_time: u64,
    pub cgroup: String,
}

impl From<pb::ProcessInfo> for ProcessInfo {
    fn from(p: pb::ProcessInfo) -> Self {
        ProcessInfo {
            pid: p.pid,
            uid: p.uid,
            euid: p.euid,
            suid: p.suid,
            gid: p.gid,
            comm: p.comm,
            start_time: p.start_time,
            cgroup: p.cgroup,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct MemoryUsage {
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
    pub swap_bytes: u64,
    /// hugetlbfs pages mapped: never reaped.
    pub hugetlb_bytes: u64,
}

impl From<pb::MemoryUsage> for MemoryUsage {
    fn from(m: pb::MemoryUsage) -> Self {
        MemoryUsage {
            anon_bytes: m.anon_bytes,
            file_bytes: m.file_bytes,
            shmem_bytes: m.shmem_bytes,
            swap_bytes: m.swap_bytes,
            hugetlb_bytes: m.hugetlb_bytes,
        }
    }
}

/// What KillAndReap did.
#[derive(Debug, Clone, Serialize)]
pub struct KillReport {
    /// "reaped", "exited_before_reap", "killed_not_reaped" or
    /// "already_dying" (another request is killing it; 0 counted here).
    pub outcome: String,
    pub not_reaped_reason: String,
    /// "reap_kill", "kill_then_mrelease" or "kill_only".
    pub kill_path: String,
    pub target: Option<ProcessInfo>,
    pub memory_before: MemoryUsage,
    /// What this kill gave back to the system, in bytes (the drop of the
    /// system's anon + swap use across the kill and reap, at most the
    /// target's own); copy-on-write pages a survivor maps do not count.
    pub bytes_released: u64,
    pub kill_to_reap_ns: u64,
    pub exited: bool,
    pub rule: String,
    pub reap_retries: u32,
}

/// The answer to CheckPermission.
#[derive(Debug, Clone, Serialize)]
pub struct Permission {
    pub allowed: bool,
    pub reason: String,
    pub target: Option<ProcessInfo>,
    /// The verdict's kind ("allowed", "protected", "no_rule",
    /// "denied_by_rule", "degraded").
    pub kind: String,
    /// The rule or protection that decided.
    pub rule: String,
}

/// What the broker and its kernel can do.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub broker_version: String,
    pub kernel_release: String,
    pub process_mrelease: bool,
    pub reap_kill_flag: bool,
    pub pidfd_get_info: bool,
    pub so_peerpidfd: bool,
    pub cgroup_kill: bool,
    pub has_cap_kill: bool,
    /// "reap_kill", "kill_then_mrelease" or "kill_only".
    pub kill_path: String,
    pub notes: Vec<String>,
}

fn outcome_name(value: i32) -> String {
    match pb::Outcome::try_from(value) {
        Ok(pb::Outcome::Reaped) => "reaped",
        Ok(pb::Outcome::ExitedBeforeReap) => "exited_before_reap",
        Ok(pb::Outcome::KilledNotReaped) => "killed_not_reaped",
        Ok(pb::Outcome::AlreadyDying) => "already_dying",
        _ => "unspecified",
    }
    .to_string()
}

fn decision_kind_name(value: i32) -> &'static str {
    match pb::DecisionKind::try_from(value) {
        Ok(pb::DecisionKind::Allowed) => "allowed",
        Ok(pb::DecisionKind::Protected) => "protected",
        Ok(pb::DecisionKind::NoRule) => "no_rule",
        Ok(pb::DecisionKind::DeniedByRule) => "denied_by_rule",
        Ok(pb::DecisionKind::Degraded) => "degraded",
        Ok(pb::DecisionKind::NotVisible) => "not_visible",
        Ok(pb::DecisionKind::RateLimited) => "rate_limited",
        Ok(pb::DecisionKind::Unverified) => "unverified",
        _ => "",
    }
}

fn kill_path_name(value: i32) -> String {
    match pb::KillPath::try_from(value) {
        Ok(pb::KillPath::ReapKill) => "reap_kill",
        Ok(pb::KillPath::KillThenMrelease) => "kill_then_mrelease",
        Ok(pb::KillPath::KillOnly) => "kill_only",
        _ => "unspecified",
    }
    .to_string()
}

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
            .map_err(|source| Error::Connect { path, source })?;
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
        Ok(Permission {
            allowed: reply.allowed,
            reason: reply.reason,
            target: reply.target.map(Into::into),
            kind: decision_kind_name(reply.kind).to_string(),
            rule: reply.rule,
        })
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
        Ok(Capabilities {
            broker_version: reply.broker_version,
            kernel_release: reply.kernel_release,
            process_mrelease: reply.process_mrelease,
            reap_kill_flag: reply.reap_kill_flag,
            pidfd_get_info: reply.pidfd_get_info,
            so_peerpidfd: reply.so_peerpidfd,
            cgroup_kill: reply.cgroup_kill,
            has_cap_kill: reply.has_cap_kill,
            kill_path: kill_path_name(reply.kill_path),
            notes: reply.notes,
        })
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
