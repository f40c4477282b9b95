// SPDX-License-Identifier: MIT OR Apache-2.0
//! The engine's reports as the API's model (`reapd_proto::model`): the one
//! place an engine fact becomes a reply field. Transports encode the model
//! (gRPC through its `From` conversions, varlink through serde) and add
//! nothing; the client decodes into the same model.

use std::time::{Duration, SystemTime};

use reapd_proto::model;

use crate::engine::candidates::CandidatesReport;
use crate::engine::events::KillEvent;
use crate::engine::group::GroupReport;
use crate::engine::{Capabilities, KillReport, PermissionReport};
use crate::os::procfs::Memory;

/// Nanoseconds, saturated at `u64::MAX` (585 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds since the Unix epoch (0 before it).
fn unix_ns(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, nanos)
}

impl From<&Memory> for model::MemoryUsage {
    fn from(m: &Memory) -> Self {
        model::MemoryUsage {
            anon_bytes: m.anon_bytes,
            file_bytes: m.file_bytes,
            shmem_bytes: m.shmem_bytes,
            swap_bytes: m.swap_bytes,
            hugetlb_bytes: m.hugetlb_bytes,
        }
    }
}

impl From<KillReport> for model::KillReport {
    fn from(r: KillReport) -> Self {
        model::KillReport {
            outcome: r.reap.outcome,
            not_reaped_reason: r.reap.not_reaped_reason,
            kill_path: r.reap.kill_path,
            target: r.target.info(),
            memory_before: (&r.reap.memory_before).into(),
            bytes_released: r.reap.bytes_released,
            kill_to_reap_ns: nanos(r.reap.kill_to_reap),
            exited: r.exited,
            rule: r.rule,
            reap_retries: r.reap.reap_retries,
        }
    }
}

impl From<PermissionReport> for model::Permission {
    fn from(r: PermissionReport) -> Self {
        model::Permission {
            allowed: r.decision.allowed,
            reason: r.decision.reason,
            target: r.target.info(),
            kind: r.decision.kind,
            rule: r.decision.rule,
        }
    }
}

impl From<Capabilities> for model::Capabilities {
    fn from(c: Capabilities) -> Self {
        model::Capabilities {
            broker_version: c.broker_version.to_string(),
            kernel_release: c.features.kernel_release,
            process_mrelease: c.features.process_mrelease,
            reap_kill_flag: c.features.reap_kill_flag,
            pidfd_get_info: c.features.pidfd_get_info,
            so_peerpidfd: c.features.so_peerpidfd,
            cgroup_kill: c.features.cgroup_kill,
            kill_path: c.kill_path,
            has_cap_kill: c.features.has_cap_kill,
            notes: c.features.notes,
        }
    }
}

impl From<GroupReport> for model::GroupReport {
    fn from(g: GroupReport) -> Self {
        model::GroupReport {
            cgroup: g.cgroup,
            members: g
                .members
                .iter()
                .map(|m| model::MemberReport {
                    process: m.target.info(),
                    memory_before: (&m.memory_before).into(),
                    outcome: m.outcome,
                    not_reaped_reason: m.not_reaped_reason.clone(),
                })
                .collect(),
            refused_newcomers: g.refused_newcomers.iter().map(|t| t.info()).collect(),
            bytes_released: g.bytes_released,
            kill_to_reap_ns: nanos(g.kill_to_reap),
            passes: g.passes,
            members_total: u32::try_from(g.members_total).unwrap_or(u32::MAX),
        }
    }
}

impl From<CandidatesReport> for model::Candidates {
    fn from(r: CandidatesReport) -> Self {
        model::Candidates {
            processes: r
                .processes
                .iter()
                .map(|c| model::Candidate {
                    process: c.target.info(),
                    memory: (&c.memory).into(),
                    unique_bytes: c.unique_bytes(),
                    oom_score: c.oom_score,
                    oom_score_adj: c.target.oom_score_adj,
                    rule: c.rule.clone(),
                })
                .collect(),
            cgroups: r
                .cgroups
                .iter()
                .map(|g| model::CgroupCandidate {
                    cgroup: g.path.clone(),
                    processes: g.processes,
                    memory: (&g.memory).into(),
                })
                .collect(),
            total: r.total,
            next_offset: r.next_offset,
        }
    }
}

impl From<KillEvent> for model::KillEvent {
    fn from(e: KillEvent) -> Self {
        model::KillEvent {
            sequence: e.sequence,
            time_unix_ns: unix_ns(e.time),
            kind: e.kind,
            requester: e.requester,
            rule: e.rule,
            cgroup: e.cgroup,
            kill_path: e.kill_path,
            victims: e
                .victims
                .into_iter()
                .map(|v| model::Victim {
                    process: v.process,
                    memory_before: (&v.memory_before).into(),
                    outcome: v.outcome,
                    not_reaped_reason: v.not_reaped_reason,
                    seen_as: v.seen_as,
                })
                .collect(),
            complete: e.complete,
            bytes_released: e.bytes_released,
            kill_to_reap_ns: nanos(e.kill_to_reap),
            elapsed_ns: nanos(e.elapsed),
            dropped: e.dropped,
        }
    }
}
