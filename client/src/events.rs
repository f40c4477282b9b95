// SPDX-License-Identifier: MIT OR Apache-2.0
//! Kill events (`WatchKills`): one per later kill of a process the caller is
//! entitled to see (root, the victim's owner, or a `watch` grant in the
//! broker's policy). Available on the async and blocking gRPC clients and on
//! the varlink client, with the same types.
//!
//! A subscription is one long-lived stream; it ends when the broker shuts
//! down (then `next` returns `None`). It is never re-established behind the
//! caller's back: kills made while no subscription existed are not replayed,
//! so a watcher that resubscribes should know it may have missed some
//! (`sequence` has gaps).

use reapd_proto::v1 as pb;
use serde::Serialize;
use serde_json::Value;

use crate::{kill_path_name, outcome_name, Error, MemoryUsage, ProcessInfo};

/// Who asked for a kill.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Requester {
    /// In the broker's pid namespace; 0 for a subscriber in another one.
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    pub comm: String,
}

/// One process a kill hit.
#[derive(Debug, Clone, Serialize)]
pub struct Victim {
    /// `pid` is in the broker's pid namespace (0 for a subscriber in another).
    pub process: Option<ProcessInfo>,
    pub memory_before: MemoryUsage,
    /// As [`crate::KillReport::outcome`].
    pub outcome: String,
    pub not_reaped_reason: String,
    /// Why the subscriber sees it: "root", "owner" or a watch rule's name.
    pub seen_as: String,
}

/// One kill.
#[derive(Debug, Clone, Serialize)]
pub struct KillEvent {
    /// Broker-wide, one per kill (gaps: kills not visible here, or dropped).
    pub sequence: u64,
    /// When the outcome was known, nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
    /// "process" or "cgroup".
    pub kind: String,
    pub requester: Requester,
    /// The rule that allowed the kill (for a cgroup: its members' rules,
    /// comma-separated).
    pub rule: String,
    /// The cgroup killed ("" for a process).
    pub cgroup: String,
    /// As [`crate::KillReport::kill_path`].
    pub kill_path: String,
    /// The victims this subscriber may see (at most 256).
    pub victims: Vec<Victim>,
    /// Whether `victims` lists every process the kill hit.
    pub complete: bool,
    /// What the whole kill gave back, in bytes; 0 unless `complete`.
    pub bytes_released: u64,
    /// From the first SIGKILL until the last reap returned, nanoseconds.
    pub kill_to_reap_ns: u64,
    /// From the request's arrival until its outcome, nanoseconds.
    pub elapsed_ns: u64,
    /// Events dropped for this subscriber (it read too slowly) since the
    /// previous one it received.
    pub dropped: u64,
}

impl From<pb::KillEvent> for KillEvent {
    fn from(e: pb::KillEvent) -> Self {
        let kind = match pb::KillKind::try_from(e.kind) {
            Ok(pb::KillKind::Process) => "process",
            Ok(pb::KillKind::Cgroup) => "cgroup",
            _ => "unspecified",
        };
        KillEvent {
            sequence: e.sequence,
            time_unix_ns: e.time_unix_ns,
            kind: kind.into(),
            requester: e
                .requester
                .map(|r| Requester {
                    pid: r.pid,
                    uid: r.uid,
                    comm: r.comm,
                })
                .unwrap_or_default(),
            rule: e.rule,
            cgroup: e.cgroup,
            kill_path: kill_path_name(e.kill_path),
            victims: e
                .victims
                .into_iter()
                .map(|v| Victim {
                    process: v.process.map(Into::into),
                    memory_before: v.memory_before.map(Into::into).unwrap_or_default(),
                    outcome: outcome_name(v.outcome),
                    not_reaped_reason: v.not_reaped_reason,
                    seen_as: v.seen_as,
                })
                .collect(),
            complete: e.complete,
            bytes_released: e.bytes_released,
            kill_to_reap_ns: e.kill_to_reap_ns,
            elapsed_ns: e.elapsed_ns,
            dropped: e.dropped,
        }
    }
}

/// Decodes a varlink `KillEvent` object.
pub(crate) fn from_varlink(e: &Value) -> KillEvent {
    let uint = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let string = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let requester = e.get("requester").cloned().unwrap_or(Value::Null);
    KillEvent {
        sequence: uint(e, "sequence"),
        time_unix_ns: uint(e, "timeUnixNs"),
        kind: string(e, "kind"),
        requester: Requester {
            pid: requester.get("pid").and_then(Value::as_i64).unwrap_or(0) as i32,
            uid: uint(&requester, "uid") as u32,
            comm: string(&requester, "comm"),
        },
        rule: string(e, "rule"),
        cgroup: string(e, "cgroup"),
        kill_path: string(e, "killPath"),
        victims: e
            .get("victims")
            .and_then(Value::as_array)
            .map(|victims| {
                victims
                    .iter()
                    .map(|v| Victim {
                        process: v.get("process").map(crate::varlink::process_info),
                        memory_before: crate::manager::memory_of(v.get("memoryBefore").unwrap_or(&Value::Null)),
                        outcome: string(v, "outcome"),
                        not_reaped_reason: string(v, "notReapedReason"),
                        seen_as: string(v, "seenAs"),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        complete: e.get("complete").and_then(Value::as_bool).unwrap_or(false),
        bytes_released: uint(e, "bytesReleased"),
        kill_to_reap_ns: uint(e, "killToReapNs"),
        elapsed_ns: uint(e, "elapsedNs"),
        dropped: uint(e, "dropped"),
    }
}

/// A gRPC kill-event subscription ([`crate::Client::watch_kills`]).
pub struct KillEvents {
    stream: tonic::Streaming<pb::KillEvent>,
}

impl KillEvents {
    /// The next event; `Ok(None)` when the broker ended the stream (it is
    /// shutting down).
    pub async fn next(&mut self) -> Result<Option<KillEvent>, Error> {
        Ok(self.stream.message().await?.map(Into::into))
    }
}

impl crate::Client {
    /// Subscribes to kill events. Returns once the subscription exists: every
    /// kill that completes after this returns and that the caller may see
    /// is delivered. Errors: RESOURCE_EXHAUSTED beyond 4 subscriptions per
    /// uid. Not retried after a lost connection (see the module docs).
    pub async fn watch_kills(&mut self) -> Result<KillEvents, Error> {
        let stream = self.inner.watch_kills(pb::WatchKillsRequest {}).await?.into_inner();
        Ok(KillEvents { stream })
    }
}

/// A blocking gRPC kill-event subscription
/// ([`crate::blocking::Client::watch_kills`]); it borrows the client's
/// runtime.
pub struct BlockingKillEvents<'a> {
    runtime: &'a tokio::runtime::Runtime,
    events: KillEvents,
}

/// Yields each event as it comes (blocking) and ends when the broker ends
/// the stream (it is shutting down).
impl Iterator for BlockingKillEvents<'_> {
    type Item = Result<KillEvent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.runtime.block_on(self.events.next()).transpose()
    }
}

impl crate::blocking::Client {
    /// As [`crate::Client::watch_kills`].
    pub fn watch_kills(&mut self) -> Result<BlockingKillEvents<'_>, Error> {
        let (runtime, inner) = self.parts();
        let events = runtime.block_on(inner.watch_kills())?;
        Ok(BlockingKillEvents { runtime, events })
    }
}
