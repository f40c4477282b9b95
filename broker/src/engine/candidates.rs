// SPDX-License-Identifier: MIT OR Apache-2.0
//! Which processes (and cgroups) may this caller kill right now, with what
//! an OOM manager ranks them by. Read-only: listing grants nothing, every
//! kill is decided again when it is asked for.
//!
//! One pass over `/proc`: each process is pinned and identified exactly as a
//! kill of it would be (`target::pin_member`, so it is listed only if the
//! caller can see it), decided by the same `Policy::decide`, and skipped
//! unless allowed and the caller may ask about it (`check` grant). The
//! calling process itself is never listed.

use std::collections::HashMap;

use serde::Serialize;

use crate::engine::caller::Caller;
use crate::engine::policy::{BrokerFacts, Policy};
use crate::engine::target::{self, Namespace, TargetProcess};
use crate::os::features::KernelFeatures;
use crate::os::procfs::{self, Memory};

/// Most entries one page may hold.
pub const MAX_PAGE: usize = 1000;

/// What to rank by (largest first; `StartTime`: newest first): the API's.
pub use reapd_proto::model::SortKey;

/// One process the caller may kill.
#[derive(Debug, Serialize)]
pub struct Candidate {
    pub target: TargetProcess,
    pub memory: Memory,
    /// `/proc/PID/oom_score`.
    pub oom_score: u32,
    /// The rule that would allow the kill.
    pub rule: String,
}

impl Candidate {
    /// Anonymous + swap bytes: an upper bound of what the kill releases
    /// (the proportional share needs `smaps_rollup`, which CAP_KILL cannot
    /// read; copy-on-write sharing makes the real figure smaller).
    pub fn unique_bytes(&self) -> u64 {
        self.memory.reapable_bytes()
    }

    fn key(&self, key: SortKey) -> u64 {
        match key {
            // Unspecified: the default order.
            SortKey::Unique | SortKey::Unspecified => self.unique_bytes(),
            SortKey::Anon => self.memory.anon_bytes,
            SortKey::Rss => self.memory.anon_bytes + self.memory.file_bytes + self.memory.shmem_bytes,
            SortKey::Swap => self.memory.swap_bytes,
            SortKey::OomScore => u64::from(self.oom_score),
            SortKey::StartTime => self.target.start_time,
        }
    }
}

/// A cgroup every one of whose (visible) processes the caller may kill:
/// a candidate for `KillCgroup`.
#[derive(Debug, Serialize)]
pub struct CgroupCandidate {
    pub path: String,
    pub processes: u32,
    pub memory: Memory,
}

/// One page of candidates.
#[derive(Debug, Serialize)]
pub struct CandidatesReport {
    pub processes: Vec<Candidate>,
    pub cgroups: Vec<CgroupCandidate>,
    /// Processes the caller may kill in all (before paging).
    pub total: u32,
    /// Where the next page starts (`offset` for the next call), if any.
    pub next_offset: Option<u32>,
}

/// Which page of which ranking.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query {
    pub key: SortKey,
    /// Entries to skip (the previous page's `next_offset`).
    pub offset: usize,
    /// Entries wanted, 1..=[`MAX_PAGE`] (0: 100).
    pub limit: usize,
}

/// Lists what `caller` may kill now, ranked by `query.key`, one page of it
/// (pages are taken from a fresh scan each call: best effort).
pub fn list(
    policy: &Policy,
    caller: &Caller,
    broker: BrokerFacts,
    ns: Namespace<'_>,
    features: &KernelFeatures,
    query: Query,
) -> CandidatesReport {
    let Query { key, offset, limit } = query;
    let limit = if limit == 0 { 100 } else { limit };
    let mut allowed: Vec<Candidate> = Vec::new();
    // Per cgroup path: (processes seen, all allowed, memory of the allowed).
    let mut groups: HashMap<String, (u32, bool, Memory)> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return CandidatesReport {
            processes: Vec::new(),
            cgroups: Vec::new(),
            total: 0,
            next_offset: None,
        };
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // Invisible to the caller, exited, a kernel thread: not listed.
        let Ok(target) = target::pin_member(pid, ns, features, false) else {
            continue;
        };
        // Not the caller itself: a manager that lists itself first would
        // kill itself first.
        if target.is_kernel_thread || target.pid == caller.pid {
            continue;
        }
        let decision = policy.decide(caller, &target, broker);
        let may_ask = policy.check_refusal(caller, &target).is_none();
        let path = target.cgroup_path().to_string();
        let memory = procfs::read_process_memory(pid).map(|(m, _)| m).unwrap_or_default();
        if may_ask && !path.is_empty() {
            let group = groups.entry(path).or_insert((0, true, Memory::default()));
            group.0 += 1;
            group.1 &= decision.allowed;
            if decision.allowed {
                group.2.anon_bytes += memory.anon_bytes;
                group.2.file_bytes += memory.file_bytes;
                group.2.shmem_bytes += memory.shmem_bytes;
                group.2.swap_bytes += memory.swap_bytes;
            }
        }
        if !decision.allowed || !may_ask {
            continue;
        }
        let oom_score = std::fs::read_to_string(format!("/proc/{pid}/oom_score"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        allowed.push(Candidate {
            target,
            memory,
            oom_score,
            rule: decision.rule,
        });
    }
    allowed.sort_by(|a, b| b.key(key).cmp(&a.key(key)).then(a.target.pid.cmp(&b.target.pid)));
    let total = allowed.len();
    let limit = limit.clamp(1, MAX_PAGE);
    let processes: Vec<Candidate> = allowed.into_iter().skip(offset).take(limit).collect();
    let next_offset = (offset + processes.len() < total).then(|| (offset + processes.len()) as u32);
    let mut cgroups: Vec<CgroupCandidate> = groups
        .into_iter()
        .filter(|(_, (_, all, _))| *all)
        .map(|(path, (processes, _, memory))| CgroupCandidate {
            path,
            processes,
            memory,
        })
        .collect();
    cgroups.sort_by(|a, b| {
        b.memory
            .reapable_bytes()
            .cmp(&a.memory.reapable_bytes())
            .then(a.path.cmp(&b.path))
    });
    cgroups.truncate(limit);
    CandidatesReport {
        processes,
        cgroups,
        total: total as u32,
        next_offset,
    }
}
