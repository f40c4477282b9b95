// SPDX-License-Identifier: MIT OR Apache-2.0
//! What an OOM manager needs beyond single kills: whole-cgroup kills, the
//! list of victims it may kill, and a paced kill (SIGTERM grace, reap
//! delay). Available on the async and blocking gRPC clients and on the
//! varlink client, with the same types.

use std::time::Duration;

use reapd_proto::v1 as pb;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::{is_transport_failure, kill_path_name, outcome_name, Error, KillReport, MemoryUsage, ProcessInfo, Target};

/// How a kill is paced; the default is SIGKILL and reap at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KillOptions {
    /// Wait up to this long after the reap for the process to be gone
    /// (capped at 10 s by the broker).
    pub wait_for_exit: Option<Duration>,
    /// SIGTERM first; SIGKILL + reap only if still alive after this long
    /// (capped at 10 s).
    pub grace: Option<Duration>,
    /// After SIGKILL let the process run its exit path this long (robust
    /// futexes reach their waiters) and reap only if it is still there;
    /// `None`: the policy's `reap-delay-ms`.
    pub reap_delay: Option<Duration>,
}

/// A cgroup to kill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Group {
    /// An absolute cgroup v2 path as the broker sees it.
    Cgroup(String),
    /// A systemd unit, found only where root names cgroups.
    Unit(String),
}

/// One killed member of a group.
#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    pub process: Option<ProcessInfo>,
    pub memory_before: MemoryUsage,
    /// As [`KillReport::outcome`].
    pub outcome: String,
    pub not_reaped_reason: String,
}

/// What KillCgroup did.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub cgroup: String,
    /// The killed members, at most 10,000 listed (`members_total` counts
    /// them all).
    pub members: Vec<MemberReport>,
    /// Members killed in all.
    pub members_total: u32,
    /// Joined during the kill, not the caller's to kill: left alive.
    pub refused_newcomers: Vec<ProcessInfo>,
    /// What the kill gave back to the system, in bytes.
    pub bytes_released: u64,
    /// From the first SIGKILL to the last reap, in nanoseconds.
    pub kill_to_reap_ns: u64,
    /// Passes over the members (1 when nothing forked during the kill).
    pub passes: u32,
}

/// Ranking for [`Candidates`], largest first (`StartTime`: newest first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SortKey {
    /// Anonymous + swap bytes (default).
    #[default]
    Unique,
    Anon,
    Rss,
    Swap,
    OomScore,
    StartTime,
}

impl SortKey {
    /// The varlink (and CLI) name.
    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Unique => "unique",
            SortKey::Anon => "anon",
            SortKey::Rss => "rss",
            SortKey::Swap => "swap",
            SortKey::OomScore => "oom_score",
            SortKey::StartTime => "start_time",
        }
    }

    fn wire(self) -> pb::SortKey {
        match self {
            SortKey::Unique => pb::SortKey::Unique,
            SortKey::Anon => pb::SortKey::Anon,
            SortKey::Rss => pb::SortKey::Rss,
            SortKey::Swap => pb::SortKey::Swap,
            SortKey::OomScore => pb::SortKey::OomScore,
            SortKey::StartTime => pb::SortKey::StartTime,
        }
    }
}

impl std::str::FromStr for SortKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "unique" => SortKey::Unique,
            "anon" => SortKey::Anon,
            "rss" => SortKey::Rss,
            "swap" => SortKey::Swap,
            "oom_score" => SortKey::OomScore,
            "start_time" => SortKey::StartTime,
            other => return Err(format!("unknown sort key {other:?}")),
        })
    }
}

/// One process the caller may kill now.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub process: Option<ProcessInfo>,
    pub memory: MemoryUsage,
    /// Anonymous + swap bytes.
    pub unique_bytes: u64,
    pub oom_score: u32,
    pub oom_score_adj: i32,
    /// The rule that would allow the kill.
    pub rule: String,
}

/// A cgroup every one of whose processes the caller may kill.
#[derive(Debug, Clone, Serialize)]
pub struct CgroupCandidate {
    pub cgroup: String,
    pub processes: u32,
    pub memory: MemoryUsage,
}

/// One page of candidates.
#[derive(Debug, Clone, Serialize)]
pub struct Candidates {
    pub processes: Vec<Candidate>,
    pub cgroups: Vec<CgroupCandidate>,
    /// Processes the caller may kill in all.
    pub total: u32,
    /// Pass as `offset` for the next page.
    pub next_offset: Option<u32>,
}

/// Which page of which ranking.
#[derive(Debug, Clone, Copy, Default)]
pub struct CandidatesQuery {
    pub sort_by: SortKey,
    /// 1..=1000; 0 means 100.
    pub limit: u32,
    pub offset: u32,
}

fn ms(d: Option<Duration>) -> Option<u32> {
    d.map(|d| d.as_millis().min(u32::MAX as u128) as u32)
}

impl crate::Client {
    /// Kills `target` paced by `options`; otherwise as
    /// [`crate::Client::kill_and_reap`] (one transparent retry after a lost
    /// connection, pinned to the start time read before the first try).
    pub async fn kill_and_reap_with(&mut self, target: Target, options: KillOptions) -> Result<KillReport, Error> {
        let request = |target: Target| pb::KillAndReapRequest {
            target: Some(target.into()),
            wait_for_exit_ms: ms(options.wait_for_exit),
            grace_ms: ms(options.grace),
            reap_delay_ms: ms(options.reap_delay),
        };
        let retry_target = match target.start_time {
            Some(_) => Some(target),
            None => Target::pinned(target.pid).ok(),
        };
        let reply = match self.inner.kill_and_reap(request(target)).await {
            Ok(reply) => reply,
            Err(status) if is_transport_failure(&status) => match retry_target {
                Some(pinned) => {
                    self.reconnect().await?;
                    self.inner.kill_and_reap(request(pinned)).await?
                }
                None => return Err(status.into()),
            },
            Err(status) => return Err(status.into()),
        }
        .into_inner();
        Ok(KillReport {
            outcome: outcome_name(reply.outcome),
            not_reaped_reason: reply.not_reaped_reason,
            kill_path: kill_path_name(reply.kill_path),
            target: reply.target.map(Into::into),
            memory_before: reply.memory_before.map(Into::into).unwrap_or_default(),
            bytes_released: reply.bytes_released,
            kill_to_reap_ns: reply.kill_to_reap_ns,
            exited: reply.exited,
            rule: reply.rule,
            reap_retries: reply.reap_retries,
        })
    }

    /// Kills every process of `group` and reaps them, all or nothing
    /// (PERMISSION_DENIED names the member that may not be killed).
    /// `reap_delay`: as in [`KillOptions`]. Not retried after a lost
    /// connection: the caller re-lists and decides again.
    pub async fn kill_cgroup(&mut self, group: Group, reap_delay: Option<Duration>) -> Result<GroupReport, Error> {
        let request = pb::KillCgroupRequest {
            group: Some(match group {
                Group::Cgroup(path) => pb::kill_cgroup_request::Group::Cgroup(path),
                Group::Unit(unit) => pb::kill_cgroup_request::Group::Unit(unit),
            }),
            reap_delay_ms: ms(reap_delay),
        };
        let reply = self.inner.kill_cgroup(request).await?.into_inner();
        Ok(GroupReport {
            cgroup: reply.cgroup,
            members: reply
                .members
                .into_iter()
                .map(|m| MemberReport {
                    process: m.process.map(Into::into),
                    memory_before: m.memory_before.map(Into::into).unwrap_or_default(),
                    outcome: outcome_name(m.outcome),
                    not_reaped_reason: m.not_reaped_reason,
                })
                .collect(),
            refused_newcomers: reply.refused_newcomers.into_iter().map(Into::into).collect(),
            bytes_released: reply.bytes_released,
            kill_to_reap_ns: reply.kill_to_reap_ns,
            passes: reply.passes,
            members_total: reply.members_total,
        })
    }

    /// The processes and cgroups the caller may kill now, one page.
    pub async fn list_candidates(&mut self, query: CandidatesQuery) -> Result<Candidates, Error> {
        let request = pb::ListCandidatesRequest {
            sort_by: query.sort_by.wire() as i32,
            limit: query.limit,
            offset: query.offset,
        };
        let reply = match self.inner.list_candidates(request).await {
            Err(status) if is_transport_failure(&status) => {
                self.reconnect().await?;
                self.inner.list_candidates(request).await?
            }
            other => other?,
        }
        .into_inner();
        Ok(Candidates {
            processes: reply
                .processes
                .into_iter()
                .map(|c| Candidate {
                    process: c.process.map(Into::into),
                    memory: c.memory.map(Into::into).unwrap_or_default(),
                    unique_bytes: c.unique_bytes,
                    oom_score: c.oom_score,
                    oom_score_adj: c.oom_score_adj,
                    rule: c.rule,
                })
                .collect(),
            cgroups: reply
                .cgroups
                .into_iter()
                .map(|g| CgroupCandidate {
                    cgroup: g.cgroup,
                    processes: g.processes,
                    memory: g.memory.map(Into::into).unwrap_or_default(),
                })
                .collect(),
            total: reply.total,
            next_offset: reply.next_offset,
        })
    }
}

impl crate::blocking::Client {
    /// As [`crate::Client::kill_and_reap_with`].
    pub fn kill_and_reap_with(&mut self, target: Target, options: KillOptions) -> Result<KillReport, Error> {
        let (runtime, inner) = self.parts();
        runtime.block_on(inner.kill_and_reap_with(target, options))
    }

    /// As [`crate::Client::kill_cgroup`].
    pub fn kill_cgroup(&mut self, group: Group, reap_delay: Option<Duration>) -> Result<GroupReport, Error> {
        let (runtime, inner) = self.parts();
        runtime.block_on(inner.kill_cgroup(group, reap_delay))
    }

    /// As [`crate::Client::list_candidates`].
    pub fn list_candidates(&mut self, query: CandidatesQuery) -> Result<Candidates, Error> {
        let (runtime, inner) = self.parts();
        runtime.block_on(inner.list_candidates(query))
    }
}

// ---- varlink ----

pub(crate) fn memory_of(v: &Value) -> MemoryUsage {
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    MemoryUsage {
        anon_bytes: n("anonBytes"),
        file_bytes: n("fileBytes"),
        shmem_bytes: n("shmemBytes"),
        swap_bytes: n("swapBytes"),
        hugetlb_bytes: n("hugetlbBytes"),
    }
}

fn uint(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn string(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}

impl crate::varlink::Client {
    /// As [`crate::Client::kill_cgroup`], over varlink.
    pub fn kill_cgroup(
        &mut self,
        group: Group,
        reap_delay: Option<Duration>,
    ) -> Result<GroupReport, crate::varlink::Error> {
        let mut params = Map::new();
        match group {
            Group::Cgroup(path) => params.insert("cgroup".into(), json!(path)),
            Group::Unit(unit) => params.insert("unit".into(), json!(unit)),
        };
        if let Some(ms) = ms(reap_delay) {
            params.insert("reapDelayMs".into(), json!(ms));
        }
        let r = self.call("io.reapd.Reaper.KillCgroup", Value::Object(params), &[])?;
        let list = |k: &str| r.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(GroupReport {
            cgroup: string(&r, "cgroup"),
            members: list("members")
                .iter()
                .map(|m| MemberReport {
                    process: m.get("process").map(crate::varlink::process_info),
                    memory_before: memory_of(m.get("memoryBefore").unwrap_or(&Value::Null)),
                    outcome: string(m, "outcome"),
                    not_reaped_reason: string(m, "notReapedReason"),
                })
                .collect(),
            refused_newcomers: list("refusedNewcomers")
                .iter()
                .map(crate::varlink::process_info)
                .collect(),
            bytes_released: uint(&r, "bytesReleased"),
            kill_to_reap_ns: uint(&r, "killToReapNs"),
            passes: uint(&r, "passes") as u32,
            members_total: uint(&r, "membersTotal") as u32,
        })
    }

    /// As [`crate::Client::list_candidates`], over varlink.
    pub fn list_candidates(&mut self, query: CandidatesQuery) -> Result<Candidates, crate::varlink::Error> {
        let params = json!({
            "sortBy": query.sort_by.as_str(),
            "limit": query.limit,
            "offset": query.offset,
        });
        let r = self.call("io.reapd.Reaper.ListCandidates", params, &[])?;
        let list = |k: &str| r.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(Candidates {
            processes: list("processes")
                .iter()
                .map(|c| Candidate {
                    process: c.get("process").map(crate::varlink::process_info),
                    memory: memory_of(c.get("memory").unwrap_or(&Value::Null)),
                    unique_bytes: uint(c, "uniqueBytes"),
                    oom_score: uint(c, "oomScore") as u32,
                    oom_score_adj: c.get("oomScoreAdj").and_then(Value::as_i64).unwrap_or(0) as i32,
                    rule: string(c, "rule"),
                })
                .collect(),
            cgroups: list("cgroups")
                .iter()
                .map(|g| CgroupCandidate {
                    cgroup: string(g, "cgroup"),
                    processes: uint(g, "processes") as u32,
                    memory: memory_of(g.get("memory").unwrap_or(&Value::Null)),
                })
                .collect(),
            total: uint(&r, "total") as u32,
            next_offset: r.get("nextOffset").and_then(Value::as_u64).map(|n| n as u32),
        })
    }
}
