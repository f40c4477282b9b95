// SPDX-License-Identifier: MIT OR Apache-2.0
//! The API's one data model: a Rust type per reply (and per refusal) of
//! `reapd.v1` / `io.reapd.Reaper`, shared by everyone who speaks it.
//!
//! - The broker's engine builds these values; its transports only encode
//!   them: varlink with serde (field names are the IDL's camelCase, enums the
//!   IDL's snake_case strings), gRPC with the `From` conversions below.
//! - The client decodes replies into the same types: from varlink with
//!   serde, from gRPC with the conversions back.
//!
//! So a field is named, typed and converted in exactly one place; the tests
//! check the serde names against the varlink IDL and round-trip every type
//! through the protobuf messages.
//!
//! Enums carry an `Unspecified` variant, the protobuf zero value and what an
//! unknown name or number from a newer broker decodes to; the broker never
//! sends it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Defines a wire enum: variants, their snake_case wire names, and their
/// protobuf counterparts (when gRPC is built).
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident => $pb:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $wire)] $variant, )+
            /// Not set, or a value this build does not know (a newer
            /// broker). Last: serde's catch-all must be.
            #[default]
            #[serde(rename = "unspecified", other)]
            Unspecified,
        }

        impl $name {
            /// Every value the broker sends, in protobuf order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire name (snake_case), as in the proto and the varlink IDL.
            pub fn as_str(self) -> &'static str {
                match self {
                    $name::Unspecified => "unspecified",
                    $( $name::$variant => $wire, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownName;
            /// Parses a wire name; `Unspecified` is not a name one asks for.
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownName(s.to_string()))
            }
        }

        #[cfg(feature = "grpc")]
        impl From<$name> for crate::v1::$pb {
            fn from(value: $name) -> Self {
                match value {
                    $name::Unspecified => crate::v1::$pb::Unspecified,
                    $( $name::$variant => crate::v1::$pb::$variant, )+
                }
            }
        }

        #[cfg(feature = "grpc")]
        impl From<$name> for i32 {
            fn from(value: $name) -> i32 {
                crate::v1::$pb::from(value) as i32
            }
        }

        /// A protobuf enum value; unknown numbers are `Unspecified`.
        #[cfg(feature = "grpc")]
        impl From<i32> for $name {
            fn from(value: i32) -> Self {
                match crate::v1::$pb::try_from(value) {
                    $( Ok(crate::v1::$pb::$variant) => $name::$variant, )+
                    _ => $name::Unspecified,
                }
            }
        }
    };
}

/// A name that is not one of an enum's wire names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown name {0:?}")]
pub struct UnknownName(pub String);

wire_enum! {
    /// What a kill did to one process.
    pub enum Outcome => Outcome {
        /// Killed, and its memory released by `process_mrelease(2)`.
        Reaped = "reaped",
        /// Killed; it exited (and freed its memory itself) before the reap.
        ExitedBeforeReap = "exited_before_reap",
        /// Killed, but not reaped (see `not_reaped_reason`).
        KilledNotReaped = "killed_not_reaped",
        /// Another request of this broker is already killing it: nothing
        /// was sent, nothing counted as released by this call.
        AlreadyDying = "already_dying",
        /// Killed; its reap had not ended when the broker answered (see
        /// `not_reaped_reason`). The reap goes on; the audit log records
        /// its end.
        ReapPending = "reap_pending",
    }
}

wire_enum! {
    /// How the broker kills and reaps on this kernel, best first.
    pub enum KillPath => KillPath {
        /// `process_mrelease(pidfd, PROCESS_MRELEASE_REAP_KILL)`: one call.
        ReapKill = "reap_kill",
        /// `pidfd_send_signal(SIGKILL)` then `process_mrelease(pidfd, 0)`.
        KillThenMrelease = "kill_then_mrelease",
        /// `pidfd_send_signal(SIGKILL)` alone (no `process_mrelease`).
        KillOnly = "kill_only",
    }
}

wire_enum! {
    /// The kind of a verdict, for clients to branch on without parsing text.
    pub enum DecisionKind => DecisionKind {
        /// Allowed by the kill(2) rule or an allow rule.
        Allowed = "allowed",
        /// A protection holds (init, kernel thread, the broker, oom_score_adj
        /// -1000, the `protect` section).
        Protected = "protected",
        /// No rule allows it.
        NoRule = "no_rule",
        /// A deny rule refuses it.
        DeniedByRule = "denied_by_rule",
        /// The rules allow it but the broker lacks CAP_KILL (degraded mode).
        Degraded = "degraded",
        /// No such process, as far as the caller can see (never says which).
        NotVisible = "not_visible",
        /// The caller is over its kill rate or in-flight limit.
        RateLimited = "rate_limited",
        /// A fact the decision needs could not be verified, so the broker
        /// refuses rather than guess.
        Unverified = "unverified",
    }
}

wire_enum! {
    /// What a kill event is about.
    pub enum KillKind => KillKind {
        /// One process (`KillAndReap`).
        Process = "process",
        /// A whole cgroup (`KillCgroup`).
        Cgroup = "cgroup",
    }
}

wire_enum! {
    /// The order of `ListCandidates`' processes (largest or newest first).
    pub enum SortKey => SortKey {
        /// Anonymous + swap: what a kill gives back unless shared (default).
        Unique = "unique",
        /// Anonymous memory.
        Anon = "anon",
        /// Anonymous + file + shmem resident.
        Rss = "rss",
        /// Swap.
        Swap = "swap",
        /// The kernel's `oom_score`.
        OomScore = "oom_score",
        /// Newest first.
        StartTime = "start_time",
    }
}

/// A process, as the broker identified it. Ids are in the broker's pid
/// namespace unless a reply says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessInfo {
    pub pid: i32,
    /// Real uid (the one kill(2) compares).
    pub uid: u32,
    pub euid: u32,
    pub suid: u32,
    pub gid: u32,
    /// `/proc/PID/comm`, at most 15 bytes, lossily UTF-8.
    pub comm: String,
    /// Field 22 of `/proc/PID/stat`, in clock ticks since boot.
    pub start_time: u64,
    /// The cgroup v2 path (`/proc/PID/cgroup`), from the cgroup2 root.
    pub cgroup: String,
}

/// A process's address space, in bytes (`/proc/PID/status` and
/// `smaps_rollup`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MemoryUsage {
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
    pub swap_bytes: u64,
    /// hugetlbfs pages mapped: never reaped.
    pub hugetlb_bytes: u64,
}

/// What `KillAndReap` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KillReport {
    pub outcome: Outcome,
    /// Why it was not reaped (`KilledNotReaped`); empty otherwise.
    pub not_reaped_reason: String,
    pub kill_path: KillPath,
    pub target: ProcessInfo,
    pub memory_before: MemoryUsage,
    /// What this kill gave back to the system, in bytes (the drop of the
    /// system's anon + swap use across the kill and reap, at most the
    /// target's own); copy-on-write pages a survivor maps do not count.
    pub bytes_released: u64,
    /// From the SIGKILL to the end of the reap, in nanoseconds
    /// (`ReapPending`: to the answer).
    pub kill_to_reap_ns: u64,
    /// The process was seen gone (its pidfd readable) before the reply.
    pub exited: bool,
    /// The rule that allowed the kill.
    pub rule: String,
    /// `process_mrelease` retries (EAGAIN while the victim still held its mm).
    pub reap_retries: u32,
}

impl KillReport {
    /// [`kill_to_reap_ns`](Self::kill_to_reap_ns) as a duration.
    pub fn kill_to_reap(&self) -> Duration {
        Duration::from_nanos(self.kill_to_reap_ns)
    }
}

/// The answer to `CheckPermission`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Permission {
    pub allowed: bool,
    /// A sentence for people.
    pub reason: String,
    pub target: ProcessInfo,
    pub kind: DecisionKind,
    /// The rule or protection that decided.
    pub rule: String,
}

/// What the broker and its kernel can do (`GetCapabilities`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Capabilities {
    pub broker_version: String,
    /// `uname -r` of the broker's kernel.
    pub kernel_release: String,
    pub process_mrelease: bool,
    pub reap_kill_flag: bool,
    pub pidfd_get_info: bool,
    pub so_peerpidfd: bool,
    pub cgroup_kill: bool,
    pub kill_path: KillPath,
    /// Without CAP_KILL the broker can kill only its own uid's processes.
    pub has_cap_kill: bool,
    /// One line per degradation found at start.
    pub notes: Vec<String>,
}

/// One process a whole-cgroup kill hit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MemberReport {
    pub process: ProcessInfo,
    pub memory_before: MemoryUsage,
    pub outcome: Outcome,
    pub not_reaped_reason: String,
}

/// What `KillCgroup` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GroupReport {
    /// The cgroup's path from the cgroup2 root.
    pub cgroup: String,
    /// At most 10,000 members; [`members_total`](Self::members_total) counts all.
    pub members: Vec<MemberReport>,
    /// Processes that appeared during the kill and were refused (not the
    /// caller's to kill); the kill went ahead only for allowed ones.
    pub refused_newcomers: Vec<ProcessInfo>,
    pub bytes_released: u64,
    pub kill_to_reap_ns: u64,
    /// Kill passes until the cgroup stayed empty of new forks.
    pub passes: u32,
    pub members_total: u32,
}

/// One process `ListCandidates` offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Candidate {
    pub process: ProcessInfo,
    pub memory: MemoryUsage,
    /// Anonymous + swap bytes: an upper bound of what killing it frees
    /// (copy-on-write sharing makes the real figure smaller).
    pub unique_bytes: u64,
    /// `/proc/PID/oom_score` (0–2000).
    pub oom_score: u32,
    /// `/proc/PID/oom_score_adj` (-1000–1000).
    pub oom_score_adj: i32,
    /// The rule that would allow killing it.
    pub rule: String,
}

/// One cgroup `ListCandidates` offers (its killable members summed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CgroupCandidate {
    pub cgroup: String,
    pub processes: u32,
    pub memory: MemoryUsage,
}

/// `ListCandidates`' answer: one page of what the caller may kill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Candidates {
    pub processes: Vec<Candidate>,
    pub cgroups: Vec<CgroupCandidate>,
    /// Killable processes in all pages.
    pub total: u32,
    /// Where the next page starts; `None` on the last page.
    pub next_offset: Option<u32>,
}

/// Who asked for a kill (its connection's identity).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Requester {
    /// In the broker's pid namespace; 0 for a subscriber in another one.
    pub pid: i32,
    /// Effective uid (SO_PEERCRED).
    pub uid: u32,
    pub comm: String,
}

/// One process a kill hit, in a [`KillEvent`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Victim {
    /// `pid` 0 for a subscriber in another pid namespace.
    pub process: ProcessInfo,
    pub memory_before: MemoryUsage,
    pub outcome: Outcome,
    pub not_reaped_reason: String,
    /// The pid as the requester named it, when it differs.
    pub seen_as: String,
}

/// One finished kill, as `WatchKills` subscribers receive it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KillEvent {
    /// Increases by one per event the broker publishes.
    pub sequence: u64,
    /// When the outcome was known: nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
    pub kind: KillKind,
    pub requester: Requester,
    /// The rule that allowed it; empty for a partial group kill.
    pub rule: String,
    /// The cgroup of a group kill.
    pub cgroup: String,
    pub kill_path: KillPath,
    /// At most 256 per event.
    pub victims: Vec<Victim>,
    /// Every victim is listed.
    pub complete: bool,
    pub bytes_released: u64,
    pub kill_to_reap_ns: u64,
    /// From the request's arrival until its outcome, in nanoseconds.
    pub elapsed_ns: u64,
    /// Events this subscriber missed (its queue was full) before this one.
    pub dropped: u64,
}

/// What kind of error the broker answered with: one per gRPC status code
/// and varlink error the API documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Malformed request (gRPC INVALID_ARGUMENT, varlink
    /// `org.varlink.service.InvalidParameter`).
    InvalidArgument,
    /// No such process visible to the caller (NOT_FOUND, `NoSuchProcess`).
    NotFound,
    /// Refused by the policy, a protection, degraded mode or an unverifiable
    /// fact (PERMISSION_DENIED, `PermissionDenied`).
    PermissionDenied,
    /// The pid no longer names the process meant (FAILED_PRECONDITION,
    /// `ProcessChanged`).
    ProcessChanged,
    /// Over a rate or in-flight limit (RESOURCE_EXHAUSTED, `RateLimited`).
    RateLimited,
    /// The request could not be read as the API (varlink `InvalidMessage`,
    /// `MethodNotFound`; gRPC UNIMPLEMENTED).
    InvalidMessage,
    /// A broker bug (INTERNAL, `InternalError`).
    Internal,
}

/// An error the broker answered with, in the API's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    /// The broker's sentence, without a prefix.
    pub message: String,
    /// The verdict's kind, for refusals (`PermissionDenied`: its own;
    /// `NotFound`: `not_visible`; `RateLimited`: `rate_limited`).
    pub decision: Option<DecisionKind>,
    /// The rule or protection that decided, for refusals.
    pub rule: String,
    /// When to try again, for `RateLimited`.
    pub retry_after: Option<Duration>,
    /// The parameter an `InvalidArgument` is about (varlink names it; gRPC
    /// carries it as `BadRequest` field violation).
    pub parameter: Option<String>,
}

/// The domain of the broker's `google.rpc.ErrorInfo` details.
pub const ERROR_DOMAIN: &str = "reapd.v1";

/// The gRPC metadata key of a rate-limited call's retry hint, in ms.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

impl ApiError {
    /// The varlink error name of this error.
    pub fn varlink_name(&self) -> &'static str {
        match self.kind {
            ErrorKind::InvalidArgument => "org.varlink.service.InvalidParameter",
            ErrorKind::NotFound => "io.reapd.Reaper.NoSuchProcess",
            ErrorKind::PermissionDenied => "io.reapd.Reaper.PermissionDenied",
            ErrorKind::ProcessChanged => "io.reapd.Reaper.ProcessChanged",
            ErrorKind::RateLimited => "io.reapd.Reaper.RateLimited",
            ErrorKind::InvalidMessage => "io.reapd.Reaper.InvalidMessage",
            ErrorKind::Internal => "io.reapd.Reaper.InternalError",
        }
    }

    /// The varlink error's parameters, as the IDL declares them.
    pub fn varlink_parameters(&self) -> serde_json::Value {
        use serde_json::json;
        let kind = self.decision.unwrap_or_default().as_str();
        match self.kind {
            // The standard error: its one parameter, nothing else.
            ErrorKind::InvalidArgument => json!({ "parameter": self.parameter.as_deref().unwrap_or("") }),
            ErrorKind::NotFound => json!({ "reason": self.message, "kind": kind }),
            ErrorKind::PermissionDenied => json!({ "reason": self.message, "kind": kind, "rule": self.rule }),
            ErrorKind::RateLimited => json!({
                "reason": self.message,
                "kind": kind,
                "retryAfterMs": self.retry_after.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            }),
            ErrorKind::ProcessChanged | ErrorKind::InvalidMessage | ErrorKind::Internal => {
                json!({ "reason": self.message })
            }
        }
    }

    /// Reads a varlink error reply. `None` for a name this API does not
    /// define (the caller reports it as a protocol error).
    pub fn from_varlink(name: &str, parameters: &serde_json::Value) -> Option<ApiError> {
        let text = |key: &str| {
            parameters
                .get(key)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        let kind = match name {
            "org.varlink.service.InvalidParameter" => ErrorKind::InvalidArgument,
            "io.reapd.Reaper.NoSuchProcess" => ErrorKind::NotFound,
            "io.reapd.Reaper.PermissionDenied" => ErrorKind::PermissionDenied,
            "io.reapd.Reaper.ProcessChanged" => ErrorKind::ProcessChanged,
            "io.reapd.Reaper.RateLimited" => ErrorKind::RateLimited,
            "io.reapd.Reaper.InvalidMessage"
            | "org.varlink.service.MethodNotFound"
            | "org.varlink.service.MethodNotImplemented"
            | "org.varlink.service.InterfaceNotFound" => ErrorKind::InvalidMessage,
            "io.reapd.Reaper.InternalError" => ErrorKind::Internal,
            _ => return None,
        };
        let parameter = text("parameter");
        let message = text("reason").unwrap_or_else(|| match (&parameter, kind) {
            (Some(p), ErrorKind::InvalidArgument) => format!("invalid parameter {p}"),
            _ => name.to_string(),
        });
        Some(ApiError {
            kind,
            message,
            decision: text("kind").and_then(|k| k.parse().ok()),
            rule: text("rule").unwrap_or_default(),
            retry_after: parameters
                .get("retryAfterMs")
                .and_then(serde_json::Value::as_u64)
                .map(Duration::from_millis),
            parameter,
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(feature = "grpc")]
mod grpc {
    //! The model ⇄ the `reapd.v1` protobuf messages. Message fields are
    //! optional in proto3; a missing one decodes as the default.

    use super::*;
    use crate::v1 as pb;

    impl From<ProcessInfo> for pb::ProcessInfo {
        fn from(p: ProcessInfo) -> Self {
            pb::ProcessInfo {
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

    impl From<MemoryUsage> for pb::MemoryUsage {
        fn from(m: MemoryUsage) -> Self {
            pb::MemoryUsage {
                anon_bytes: m.anon_bytes,
                file_bytes: m.file_bytes,
                shmem_bytes: m.shmem_bytes,
                swap_bytes: m.swap_bytes,
                hugetlb_bytes: m.hugetlb_bytes,
            }
        }
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

    fn opt<T: Into<U>, U>(value: Option<T>) -> U
    where
        U: Default,
    {
        value.map(Into::into).unwrap_or_default()
    }

    impl From<KillReport> for pb::KillAndReapResponse {
        fn from(r: KillReport) -> Self {
            pb::KillAndReapResponse {
                outcome: r.outcome.into(),
                not_reaped_reason: r.not_reaped_reason,
                kill_path: r.kill_path.into(),
                target: Some(r.target.into()),
                memory_before: Some(r.memory_before.into()),
                bytes_released: r.bytes_released,
                kill_to_reap_ns: r.kill_to_reap_ns,
                exited: r.exited,
                rule: r.rule,
                reap_retries: r.reap_retries,
            }
        }
    }

    impl From<pb::KillAndReapResponse> for KillReport {
        fn from(r: pb::KillAndReapResponse) -> Self {
            KillReport {
                outcome: r.outcome.into(),
                not_reaped_reason: r.not_reaped_reason,
                kill_path: r.kill_path.into(),
                target: opt(r.target),
                memory_before: opt(r.memory_before),
                bytes_released: r.bytes_released,
                kill_to_reap_ns: r.kill_to_reap_ns,
                exited: r.exited,
                rule: r.rule,
                reap_retries: r.reap_retries,
            }
        }
    }

    impl From<Permission> for pb::CheckPermissionResponse {
        fn from(p: Permission) -> Self {
            pb::CheckPermissionResponse {
                allowed: p.allowed,
                reason: p.reason,
                target: Some(p.target.into()),
                kind: p.kind.into(),
                rule: p.rule,
            }
        }
    }

    impl From<pb::CheckPermissionResponse> for Permission {
        fn from(p: pb::CheckPermissionResponse) -> Self {
            Permission {
                allowed: p.allowed,
                reason: p.reason,
                target: opt(p.target),
                kind: p.kind.into(),
                rule: p.rule,
            }
        }
    }

    impl From<Capabilities> for pb::GetCapabilitiesResponse {
        fn from(c: Capabilities) -> Self {
            pb::GetCapabilitiesResponse {
                broker_version: c.broker_version,
                kernel_release: c.kernel_release,
                process_mrelease: c.process_mrelease,
                reap_kill_flag: c.reap_kill_flag,
                pidfd_get_info: c.pidfd_get_info,
                so_peerpidfd: c.so_peerpidfd,
                cgroup_kill: c.cgroup_kill,
                kill_path: c.kill_path.into(),
                has_cap_kill: c.has_cap_kill,
                notes: c.notes,
            }
        }
    }

    impl From<pb::GetCapabilitiesResponse> for Capabilities {
        fn from(c: pb::GetCapabilitiesResponse) -> Self {
            Capabilities {
                broker_version: c.broker_version,
                kernel_release: c.kernel_release,
                process_mrelease: c.process_mrelease,
                reap_kill_flag: c.reap_kill_flag,
                pidfd_get_info: c.pidfd_get_info,
                so_peerpidfd: c.so_peerpidfd,
                cgroup_kill: c.cgroup_kill,
                kill_path: c.kill_path.into(),
                has_cap_kill: c.has_cap_kill,
                notes: c.notes,
            }
        }
    }

    impl From<MemberReport> for pb::MemberReport {
        fn from(m: MemberReport) -> Self {
            pb::MemberReport {
                process: Some(m.process.into()),
                memory_before: Some(m.memory_before.into()),
                outcome: m.outcome.into(),
                not_reaped_reason: m.not_reaped_reason,
            }
        }
    }

    impl From<pb::MemberReport> for MemberReport {
        fn from(m: pb::MemberReport) -> Self {
            MemberReport {
                process: opt(m.process),
                memory_before: opt(m.memory_before),
                outcome: m.outcome.into(),
                not_reaped_reason: m.not_reaped_reason,
            }
        }
    }

    impl From<GroupReport> for pb::KillCgroupResponse {
        fn from(g: GroupReport) -> Self {
            pb::KillCgroupResponse {
                cgroup: g.cgroup,
                members: g.members.into_iter().map(Into::into).collect(),
                refused_newcomers: g.refused_newcomers.into_iter().map(Into::into).collect(),
                bytes_released: g.bytes_released,
                kill_to_reap_ns: g.kill_to_reap_ns,
                passes: g.passes,
                members_total: g.members_total,
            }
        }
    }

    impl From<pb::KillCgroupResponse> for GroupReport {
        fn from(g: pb::KillCgroupResponse) -> Self {
            GroupReport {
                cgroup: g.cgroup,
                members: g.members.into_iter().map(Into::into).collect(),
                refused_newcomers: g.refused_newcomers.into_iter().map(Into::into).collect(),
                bytes_released: g.bytes_released,
                kill_to_reap_ns: g.kill_to_reap_ns,
                passes: g.passes,
                members_total: g.members_total,
            }
        }
    }

    impl From<Candidate> for pb::Candidate {
        fn from(c: Candidate) -> Self {
            pb::Candidate {
                process: Some(c.process.into()),
                memory: Some(c.memory.into()),
                unique_bytes: c.unique_bytes,
                oom_score: c.oom_score,
                oom_score_adj: c.oom_score_adj,
                rule: c.rule,
            }
        }
    }

    impl From<pb::Candidate> for Candidate {
        fn from(c: pb::Candidate) -> Self {
            Candidate {
                process: opt(c.process),
                memory: opt(c.memory),
                unique_bytes: c.unique_bytes,
                oom_score: c.oom_score,
                oom_score_adj: c.oom_score_adj,
                rule: c.rule,
            }
        }
    }

    impl From<CgroupCandidate> for pb::CgroupCandidate {
        fn from(c: CgroupCandidate) -> Self {
            pb::CgroupCandidate {
                cgroup: c.cgroup,
                processes: c.processes,
                memory: Some(c.memory.into()),
            }
        }
    }

    impl From<pb::CgroupCandidate> for CgroupCandidate {
        fn from(c: pb::CgroupCandidate) -> Self {
            CgroupCandidate {
                cgroup: c.cgroup,
                processes: c.processes,
                memory: opt(c.memory),
            }
        }
    }

    impl From<Candidates> for pb::ListCandidatesResponse {
        fn from(c: Candidates) -> Self {
            pb::ListCandidatesResponse {
                processes: c.processes.into_iter().map(Into::into).collect(),
                cgroups: c.cgroups.into_iter().map(Into::into).collect(),
                total: c.total,
                next_offset: c.next_offset,
            }
        }
    }

    impl From<pb::ListCandidatesResponse> for Candidates {
        fn from(c: pb::ListCandidatesResponse) -> Self {
            Candidates {
                processes: c.processes.into_iter().map(Into::into).collect(),
                cgroups: c.cgroups.into_iter().map(Into::into).collect(),
                total: c.total,
                next_offset: c.next_offset,
            }
        }
    }

    impl From<Requester> for pb::Requester {
        fn from(r: Requester) -> Self {
            pb::Requester {
                pid: r.pid,
                uid: r.uid,
                comm: r.comm,
            }
        }
    }

    impl From<pb::Requester> for Requester {
        fn from(r: pb::Requester) -> Self {
            Requester {
                pid: r.pid,
                uid: r.uid,
                comm: r.comm,
            }
        }
    }

    impl From<Victim> for pb::Victim {
        fn from(v: Victim) -> Self {
            pb::Victim {
                process: Some(v.process.into()),
                memory_before: Some(v.memory_before.into()),
                outcome: v.outcome.into(),
                not_reaped_reason: v.not_reaped_reason,
                seen_as: v.seen_as,
            }
        }
    }

    impl From<pb::Victim> for Victim {
        fn from(v: pb::Victim) -> Self {
            Victim {
                process: opt(v.process),
                memory_before: opt(v.memory_before),
                outcome: v.outcome.into(),
                not_reaped_reason: v.not_reaped_reason,
                seen_as: v.seen_as,
            }
        }
    }

    impl From<KillEvent> for pb::KillEvent {
        fn from(e: KillEvent) -> Self {
            pb::KillEvent {
                sequence: e.sequence,
                time_unix_ns: e.time_unix_ns,
                kind: e.kind.into(),
                requester: Some(e.requester.into()),
                rule: e.rule,
                cgroup: e.cgroup,
                kill_path: e.kill_path.into(),
                victims: e.victims.into_iter().map(Into::into).collect(),
                complete: e.complete,
                bytes_released: e.bytes_released,
                kill_to_reap_ns: e.kill_to_reap_ns,
                elapsed_ns: e.elapsed_ns,
                dropped: e.dropped,
            }
        }
    }

    impl From<pb::KillEvent> for KillEvent {
        fn from(e: pb::KillEvent) -> Self {
            KillEvent {
                sequence: e.sequence,
                time_unix_ns: e.time_unix_ns,
                kind: e.kind.into(),
                requester: opt(e.requester),
                rule: e.rule,
                cgroup: e.cgroup,
                kill_path: e.kill_path.into(),
                victims: e.victims.into_iter().map(Into::into).collect(),
                complete: e.complete,
                bytes_released: e.bytes_released,
                kill_to_reap_ns: e.kill_to_reap_ns,
                elapsed_ns: e.elapsed_ns,
                dropped: e.dropped,
            }
        }
    }

    impl ApiError {
        /// The gRPC status code of this error.
        pub fn grpc_code(&self) -> tonic::Code {
            match self.kind {
                ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
                ErrorKind::NotFound => tonic::Code::NotFound,
                ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
                ErrorKind::ProcessChanged => tonic::Code::FailedPrecondition,
                ErrorKind::RateLimited => tonic::Code::ResourceExhausted,
                ErrorKind::InvalidMessage => tonic::Code::Unimplemented,
                ErrorKind::Internal => tonic::Code::Internal,
            }
        }

        /// The status the broker sends: code, message, the verdict as a
        /// `google.rpc.ErrorInfo` (reason = the decision kind in
        /// UPPER_SNAKE, as AIP-193 asks; metadata `kind` and `rule`), the
        /// blamed parameter as a `BadRequest` field violation, and the
        /// retry hint as `retry-after-ms` metadata.
        pub fn to_status(&self) -> tonic::Status {
            use tonic_types::{ErrorDetails, StatusExt};
            let mut details = ErrorDetails::new();
            if let Some(kind) = self.decision {
                let metadata = std::collections::HashMap::from([
                    ("kind".to_string(), kind.as_str().to_string()),
                    ("rule".to_string(), self.rule.clone()),
                ]);
                details.set_error_info(kind.as_str().to_uppercase(), ERROR_DOMAIN, metadata);
            }
            if let Some(parameter) = &self.parameter {
                details.add_bad_request_violation(parameter.clone(), self.message.clone());
            }
            let mut status = if self.decision.is_none() && self.parameter.is_none() {
                tonic::Status::new(self.grpc_code(), self.message.clone())
            } else {
                tonic::Status::with_error_details(self.grpc_code(), self.message.clone(), details)
            };
            if let Some(retry_after) = self.retry_after {
                if let Ok(value) = retry_after.as_millis().to_string().parse() {
                    status.metadata_mut().insert(RETRY_AFTER_MS, value);
                }
            }
            status
        }

        /// Reads a status the broker sent. `None` for a code the API does
        /// not use for its own answers (a transport failure, a timeout).
        pub fn from_status(status: &tonic::Status) -> Option<ApiError> {
            use tonic_types::StatusExt;
            let kind = match status.code() {
                tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
                tonic::Code::NotFound => ErrorKind::NotFound,
                tonic::Code::PermissionDenied => ErrorKind::PermissionDenied,
                tonic::Code::FailedPrecondition => ErrorKind::ProcessChanged,
                tonic::Code::ResourceExhausted => ErrorKind::RateLimited,
                tonic::Code::Unimplemented => ErrorKind::InvalidMessage,
                tonic::Code::Internal => ErrorKind::Internal,
                _ => return None,
            };
            let details = status.get_error_details();
            let info = details.error_info();
            let field = |k: &str| info.and_then(|i| i.metadata.get(k).cloned());
            Some(ApiError {
                kind,
                message: status.message().to_string(),
                decision: field("kind").and_then(|k| k.parse().ok()),
                rule: field("rule").unwrap_or_default(),
                retry_after: status
                    .metadata()
                    .get(RETRY_AFTER_MS)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis),
                parameter: details
                    .bad_request()
                    .and_then(|b| b.field_violations.first())
                    .map(|v| v.field.clone()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IDL's field names of a type or method reply, in order.
    fn idl_fields(head: &str) -> Vec<String> {
        let idl = crate::VARLINK_INTERFACE;
        let start = idl.find(head).unwrap_or_else(|| panic!("{head} not in the IDL"));
        let body = &idl[start + head.len()..];
        let end = body.find("\n)").expect("closing parenthesis");
        body[..end]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split(':').next().unwrap().trim().to_string())
            .collect()
    }

    fn serde_fields<T: Serialize + Default>() -> Vec<String> {
        match serde_json::to_value(T::default()).unwrap() {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    fn same_set(mut a: Vec<String>, mut b: Vec<String>, what: &str) {
        a.sort();
        b.sort();
        assert_eq!(a, b, "{what}: serde fields vs IDL fields");
    }

    #[test]
    fn serde_names_are_the_idl_names() {
        same_set(
            serde_fields::<ProcessInfo>(),
            idl_fields("type ProcessInfo ("),
            "ProcessInfo",
        );
        same_set(
            serde_fields::<MemoryUsage>(),
            idl_fields("type MemoryUsage ("),
            "MemoryUsage",
        );
        same_set(
            serde_fields::<MemberReport>(),
            idl_fields("type MemberReport ("),
            "MemberReport",
        );
        same_set(serde_fields::<Candidate>(), idl_fields("type Candidate ("), "Candidate");
        same_set(
            serde_fields::<CgroupCandidate>(),
            idl_fields("type CgroupCandidate ("),
            "CgroupCandidate",
        );
        same_set(serde_fields::<Victim>(), idl_fields("type Victim ("), "Victim");
        same_set(serde_fields::<Requester>(), idl_fields("type Requester ("), "Requester");
        same_set(serde_fields::<KillEvent>(), idl_fields("type KillEvent ("), "KillEvent");
        let reply = |method: &str| {
            let idl = crate::VARLINK_INTERFACE;
            let at = idl.find(&format!("method {method}(")).unwrap();
            let arrow = at + idl[at..].find(") -> (").unwrap();
            idl_fields(&idl[at..arrow + 6])
        };
        same_set(serde_fields::<KillReport>(), reply("KillAndReap"), "KillAndReap");
        same_set(
            serde_fields::<Permission>(),
            reply("CheckPermission"),
            "CheckPermission",
        );
        same_set(serde_fields::<GroupReport>(), reply("KillCgroup"), "KillCgroup");
        same_set(serde_fields::<Candidates>(), reply("ListCandidates"), "ListCandidates");
        same_set(
            serde_fields::<Capabilities>(),
            reply("GetCapabilities"),
            "GetCapabilities",
        );
    }

    #[test]
    fn enum_names_round_trip_and_unknown_names_are_unspecified() {
        for v in Outcome::ALL {
            let json = serde_json::to_value(v).unwrap();
            assert_eq!(json, v.as_str());
            assert_eq!(serde_json::from_value::<Outcome>(json).unwrap(), *v);
            assert_eq!(v.as_str().parse::<Outcome>().unwrap(), *v);
        }
        let newer: KillPath = serde_json::from_value(serde_json::json!("reap_kill_v2")).unwrap();
        assert_eq!(newer, KillPath::Unspecified);
        assert!("unspecified".parse::<DecisionKind>().is_err());
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn enums_match_the_proto_numbers() {
        use crate::v1 as pb;
        for v in DecisionKind::ALL {
            let n: i32 = (*v).into();
            assert_eq!(DecisionKind::from(n), *v);
            let proto_name = pb::DecisionKind::try_from(n).unwrap().as_str_name();
            assert_eq!(proto_name, format!("DECISION_KIND_{}", v.as_str().to_uppercase()));
        }
        for v in Outcome::ALL {
            let n: i32 = (*v).into();
            let proto_name = pb::Outcome::try_from(n).unwrap().as_str_name();
            assert_eq!(proto_name, format!("OUTCOME_{}", v.as_str().to_uppercase()));
        }
        for v in KillPath::ALL {
            let n: i32 = (*v).into();
            let proto_name = pb::KillPath::try_from(n).unwrap().as_str_name();
            assert_eq!(proto_name, format!("KILL_PATH_{}", v.as_str().to_uppercase()));
        }
        for v in SortKey::ALL {
            let n: i32 = (*v).into();
            let proto_name = pb::SortKey::try_from(n).unwrap().as_str_name();
            assert_eq!(proto_name, format!("SORT_KEY_{}", v.as_str().to_uppercase()));
        }
        assert_eq!(Outcome::from(99), Outcome::Unspecified);
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn every_type_round_trips_through_protobuf_and_json() {
        let process = ProcessInfo {
            pid: 7,
            uid: 61001,
            euid: 61001,
            suid: 61001,
            gid: 61001,
            comm: "hog".into(),
            start_time: 12345,
            cgroup: "/a/b".into(),
        };
        let memory = MemoryUsage {
            anon_bytes: 1,
            file_bytes: 2,
            shmem_bytes: 3,
            swap_bytes: 4,
            hugetlb_bytes: 5,
        };
        let report = KillReport {
            outcome: Outcome::Reaped,
            not_reaped_reason: String::new(),
            kill_path: KillPath::KillThenMrelease,
            target: process.clone(),
            memory_before: memory,
            bytes_released: 9,
            kill_to_reap_ns: 10,
            exited: true,
            rule: "r".into(),
            reap_retries: 1,
        };
        let wire = crate::v1::KillAndReapResponse::from(report.clone());
        assert_eq!(KillReport::from(wire), report);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(serde_json::from_value::<KillReport>(json).unwrap(), report);
        let event = KillEvent {
            sequence: 3,
            kind: KillKind::Cgroup,
            requester: Requester {
                pid: 1,
                uid: 2,
                comm: "lmk".into(),
            },
            victims: vec![Victim {
                process,
                memory_before: memory,
                outcome: Outcome::ExitedBeforeReap,
                not_reaped_reason: "x".into(),
                seen_as: "y".into(),
            }],
            complete: true,
            ..KillEvent::default()
        };
        assert_eq!(KillEvent::from(crate::v1::KillEvent::from(event.clone())), event);
        let candidates = Candidates {
            next_offset: Some(5),
            total: 6,
            ..Candidates::default()
        };
        let json = serde_json::to_value(&candidates).unwrap();
        assert_eq!(json["nextOffset"], 5);
        assert_eq!(
            Candidates::from(crate::v1::ListCandidatesResponse::from(candidates.clone())),
            candidates
        );
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn errors_survive_both_wires() {
        let refusal = ApiError {
            kind: ErrorKind::PermissionDenied,
            message: "uid 61001 may not kill uid 0".into(),
            decision: Some(DecisionKind::NoRule),
            rule: "kill(2)".into(),
            retry_after: None,
            parameter: None,
        };
        assert_eq!(ApiError::from_status(&refusal.to_status()).unwrap(), refusal);
        assert_eq!(
            ApiError::from_varlink(refusal.varlink_name(), &refusal.varlink_parameters()).unwrap(),
            refusal
        );
        let limited = ApiError {
            kind: ErrorKind::RateLimited,
            message: "over 5 kills/s; retry after 200 ms".into(),
            decision: Some(DecisionKind::RateLimited),
            rule: "rate-limit".into(),
            retry_after: Some(Duration::from_millis(200)),
            parameter: None,
        };
        let status = limited.to_status();
        assert_eq!(status.metadata().get(RETRY_AFTER_MS).unwrap(), "200");
        assert_eq!(ApiError::from_status(&status).unwrap(), limited);
        let blamed = ApiError {
            kind: ErrorKind::InvalidArgument,
            message: "pid must be positive".into(),
            decision: None,
            rule: String::new(),
            retry_after: None,
            parameter: Some("pid".into()),
        };
        assert_eq!(ApiError::from_status(&blamed.to_status()).unwrap(), blamed);
        // varlink's standard InvalidParameter carries only the parameter.
        let read = ApiError::from_varlink(blamed.varlink_name(), &blamed.varlink_parameters()).unwrap();
        assert_eq!(
            (read.kind, read.parameter),
            (ErrorKind::InvalidArgument, Some("pid".to_string()))
        );
        assert!(ApiError::from_status(&tonic::Status::unavailable("connection reset")).is_none());
    }
}
