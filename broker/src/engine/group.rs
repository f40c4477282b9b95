// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-cgroup kills: every member checked first, then all killed, forks
//! during the kill caught, each member reaped.
//!
//! `cgroup.kill` (5.14) would kill the group in one write, but writing it
//! needs write access to a root-owned file (CAP_DAC_OVERRIDE, and a
//! writable cgroup2 mount, which the unit's `ProtectControlGroups=yes`
//! withholds); neither is worth the exposure. The equivalent with CAP_KILL
//! alone: read the members, SIGKILL each through a pidfd, and read again
//! until no live member is new. A process with SIGKILL pending cannot fork
//! (`copy_process()` checks `fatal_signal_pending()`), so only children
//! forked in the instant between a read and the kill can appear, and the
//! next pass catches them.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{pidfd_send_signal, Signal};
use serde::Serialize;

use crate::engine::error::EngineError;
use crate::engine::reap_pool::{self, Ended, ReapOf, REAP_ANSWER_AFTER};
use crate::engine::reaper::{KillOptions, Outcome, ReapReport, MAX_REAP_RETRIES};
use crate::engine::target::{self, Namespace, TargetProcess};
use crate::os::cgroup;
use crate::os::features::{KernelFeatures, KillPath};
use crate::os::procfs::{self, Memory};
use crate::os::sys;

/// Most passes over the members before the broker gives up on a group
/// that keeps gaining members (each pass kills everything it found).
pub const MAX_PASSES: u32 = 16;

/// Most members one request may kill.
pub const MAX_MEMBERS: usize = 100_000;

/// Most members a reply lists (`members_total` counts them all), and the
/// most bytes their listing may take (a member's cgroup path may be long):
/// a reply stays well inside every client's default message limit (gRPC:
/// 4 MiB).
pub const MAX_REPORTED_MEMBERS: usize = 10_000;
pub const MAX_REPORTED_BYTES: usize = 2 << 20;
/// Most refused newcomers a reply lists.
pub const MAX_REPORTED_NEWCOMERS: usize = 1_000;

/// How a request names a group.
#[derive(Debug, Clone)]
pub enum GroupSpec {
    /// An absolute cgroup path, as the broker sees it (`/system.slice/x.service`).
    Path(String),
    /// A systemd unit name (`x.service`, `y.scope`), found in the part of
    /// the hierarchy only root names (never in a delegated subtree).
    Unit(String),
}

/// One member's fate.
#[derive(Debug, Serialize)]
pub struct MemberReport {
    pub target: TargetProcess,
    pub memory_before: Memory,
    pub outcome: Outcome,
    pub not_reaped_reason: String,
}

/// What a group kill did.
#[derive(Debug, Serialize)]
pub struct GroupReport {
    /// The group's path (broker's view).
    pub cgroup: String,
    /// The killed members, at most [`MAX_REPORTED_MEMBERS`] (see
    /// [`GroupReport::truncate_for_reply`]).
    pub members: Vec<MemberReport>,
    /// Members killed in all.
    pub members_total: usize,
    /// Members that joined during the kill and that the caller may not
    /// kill: left alive, named here.
    pub refused_newcomers: Vec<TargetProcess>,
    /// What the whole kill gave back to the system, as for one process
    /// (`ReapReport::bytes_released`), capped by the members' own anon +
    /// swap before.
    pub bytes_released: u64,
    /// From the first SIGKILL until the last reap returned.
    pub kill_to_reap: Duration,
    /// Passes over the members (1 when nothing joined during the kill).
    pub passes: u32,
}

impl GroupReport {
    /// Keeps the members a reply may list: at most [`MAX_REPORTED_MEMBERS`]
    /// and [`MAX_REPORTED_BYTES`] (estimated from the names they carry).
    /// `members_total` still counts every one.
    pub fn truncate_for_reply(&mut self) {
        let mut bytes = 0;
        let keep = self
            .members
            .iter()
            .take(MAX_REPORTED_MEMBERS)
            .take_while(|m| {
                bytes += 128 + m.target.comm.len() + m.target.cgroup_path().len();
                bytes <= MAX_REPORTED_BYTES
            })
            .count();
        self.members.truncate(keep);
        self.refused_newcomers.truncate(MAX_REPORTED_NEWCOMERS);
    }
}

/// Resolves `spec` to a cgroup directory under the cgroup2 mount.
pub fn resolve(spec: &GroupSpec) -> Result<(String, PathBuf), EngineError> {
    let mount = cgroup::mount().ok_or_else(|| EngineError::Internal("no cgroup2 hierarchy is mounted".into()))?;
    match spec {
        GroupSpec::Path(path) => {
            let trimmed = path.trim_matches('/');
            let bad = !path.starts_with('/')
                || path.contains('\0')
                || path.contains("//")
                || trimmed.split('/').any(|c| c == "." || c == "..")
                || path.len() > 4096;
            if bad {
                return Err(EngineError::invalid(
                    "cgroup",
                    format!("cgroup: expected an absolute path like /system.slice/x.service, got {path:?}"),
                ));
            }
            let normal = format!("/{trimmed}");
            let dir = mount.join(trimmed);
            if !dir.join("cgroup.procs").exists() {
                return Err(EngineError::NotFound(format!("no cgroup {normal}")));
            }
            Ok((normal, dir))
        }
        GroupSpec::Unit(unit) => find_unit(mount, unit),
    }
}

/// The one root-named cgroup called `unit`: searched breadth first, never
/// below a directory root does not own alone (a user's own
/// `earlyoom.service` in its `user@UID.service` is not the system's).
fn find_unit(mount: &Path, unit: &str) -> Result<(String, PathBuf), EngineError> {
    if unit.is_empty() || unit.contains('/') || unit.contains('\0') || unit.starts_with('.') {
        return Err(EngineError::invalid("unit", format!("unit: not a unit name: {unit:?}")));
    }
    let mut found = Vec::new();
    let mut queue = vec![(String::new(), mount.to_path_buf())];
    let mut visited = 0usize;
    while let Some((rel, dir)) = queue.pop() {
        visited += 1;
        if visited > 100_000 {
            break;
        }
        if !cgroup::root_only_cgroup(&dir) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = format!("{rel}/{name}");
            if name == unit {
                found.push((child.clone(), entry.path()));
            }
            queue.push((child, entry.path()));
        }
    }
    match found.len() {
        0 => Err(EngineError::NotFound(format!("no unit {unit} in the cgroup hierarchy"))),
        1 => Ok(found.remove(0)),
        _ => Err(EngineError::invalid(
            "unit",
            format!(
                "unit: {unit} names {} cgroups ({}); name the cgroup path",
                found.len(),
                found.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// The pids (broker's namespace) of every process in `dir` and below.
pub fn member_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut queue = vec![dir.to_path_buf()];
    while let Some(dir) = queue.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    queue.push(entry.path());
                }
            }
        }
        if pids.len() > MAX_MEMBERS {
            break;
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Pins every current member of `dir` as the caller sees it. A member that
/// exited meanwhile is skipped; one the caller cannot see, or any other
/// failure, is returned as the error (nothing has been killed yet).
pub fn pin_members(
    dir: &Path,
    ns: Namespace<'_>,
    features: &KernelFeatures,
) -> Result<Vec<TargetProcess>, EngineError> {
    let pids = member_pids(dir);
    if pids.len() > MAX_MEMBERS {
        return Err(EngineError::invalid(
            "cgroup",
            format!("the group has more than {MAX_MEMBERS} members"),
        ));
    }
    let mut pinned = Vec::with_capacity(pids.len());
    for pid in pids {
        match target::pin_member(pid, ns, features, true) {
            Ok(t) => pinned.push(t),
            Err(EngineError::NotFound(msg)) if msg.contains("has exited") => {}
            Err(EngineError::NotFound(_)) => {
                return Err(EngineError::PermissionDenied {
                    kind: crate::engine::policy::DecisionKind::NotVisible,
                    rule: "not-visible".into(),
                    reason: "a member of the group is outside the caller's pid namespace; nothing was killed".into(),
                })
            }
            Err(err) => return Err(err),
        }
    }
    Ok(pinned)
}

/// Kills the checked `members` of `dir`, then any newcomer `allowed`
/// accepts (newcomers it refuses are left alive and reported), and reaps
/// them all.
#[allow(clippy::too_many_arguments)]
pub fn kill_all(
    cgroup_path: String,
    dir: &Path,
    checked: Vec<TargetProcess>,
    ns: Namespace<'_>,
    features: &KernelFeatures,
    options: KillOptions,
    allowed: impl Fn(&TargetProcess) -> bool,
    requester: Requester,
) -> GroupReport {
    let system_before = procfs::system_anon_and_swap().ok();
    let started = Instant::now();
    let mut killed: Vec<(TargetProcess, Memory)> = Vec::with_capacity(checked.len());
    let mut seen: HashMap<i32, u64> = HashMap::new();
    let mut refused_newcomers = Vec::new();
    let mut passes = 0;
    let mut batch = checked;
    loop {
        passes += 1;
        for t in batch {
            seen.insert(t.pid, t.start_time);
            let memory = procfs::read_process_memory(t.pid).map(|(m, _)| m).unwrap_or_default();
            // ESRCH: it exited on its own meanwhile; nothing to do.
            if pidfd_send_signal(t.pidfd.as_fd(), Signal::KILL).is_ok() {
                killed.push((t, memory));
            }
        }
        if passes >= MAX_PASSES {
            break;
        }
        // Newcomers: members not seen before (or a reused pid).
        let mut next = Vec::new();
        for pid in member_pids(dir) {
            let Ok(t) = target::pin_member(pid, ns, features, true) else {
                continue;
            };
            if seen.get(&t.pid) == Some(&t.start_time) {
                continue;
            }
            if allowed(&t) {
                next.push(t);
            } else {
                seen.insert(t.pid, t.start_time);
                refused_newcomers.push(t);
            }
        }
        if next.is_empty() {
            break;
        }
        batch = next;
    }

    if !options.reap_delay.is_zero() {
        // Let them run their exit paths (robust futexes), then reap what is
        // left: the delay is one for the whole group, not per member.
        let deadline = Instant::now() + options.reap_delay;
        for (t, _) in &killed {
            target::wait_for_exit(t.pidfd.as_fd(), deadline.saturating_duration_since(Instant::now()));
        }
    }
    let outcomes = reap_members(&killed, features, &requester);
    let kill_to_reap = started.elapsed();
    let before: u64 = killed.iter().map(|(_, m)| m.reapable_bytes()).sum();
    // Members freeing their own memory finish it (see the single kill).
    if outcomes.iter().any(|(o, _)| *o == Outcome::ExitedBeforeReap) {
        let deadline = Instant::now() + crate::engine::reaper::EXIT_SETTLE;
        for (t, _) in &killed {
            target::wait_for_exit(t.pidfd.as_fd(), deadline.saturating_duration_since(Instant::now()));
        }
    }
    let bytes_released = match (system_before, procfs::system_anon_and_swap().ok()) {
        (Some(b), Some(a)) => b.saturating_sub(a).min(before),
        _ => 0,
    };
    let members: Vec<MemberReport> = killed
        .into_iter()
        .zip(outcomes)
        .map(|((target, memory_before), (outcome, not_reaped_reason))| MemberReport {
            target,
            memory_before,
            outcome,
            not_reaped_reason,
        })
        .collect();
    GroupReport {
        members_total: members.len(),
        cgroup: cgroup_path,
        members,
        refused_newcomers,
        bytes_released,
        kill_to_reap,
        passes,
    }
}

/// Who asked for a group kill, for its members' reap records.
pub struct Requester {
    pub caller_pid: i32,
    pub caller_uid: u32,
    /// When the request came: the follow-up records' `elapsed_us`.
    pub started: Instant,
}

/// A member's reap, for a reaper thread.
struct MemberReap(std::os::fd::OwnedFd);

impl reap_pool::Work for MemberReap {
    type Output = (Outcome, String);
    fn run(self) -> (Outcome, String) {
        reap_one(self.0.as_fd())
    }
}

/// Reaps every killed member on the reaper threads, as single kills'
/// reaps are (each member counted against its uid's and, in another user
/// namespace, the namespaces' limits), waiting at most
/// [`REAP_ANSWER_AFTER`] for all of them: a member's reap can wait on its
/// mmap lock indefinitely (docs/threats.md, "A reap that never ends").
/// Members whose reap had not ended by then are `ReapPending` (a
/// `reap_ended` record follows when it ends); those whose reap never got a
/// thread in time are killed only.
fn reap_members(
    killed: &[(TargetProcess, Memory)],
    features: &KernelFeatures,
    requester: &Requester,
) -> Vec<(Outcome, String)> {
    if !features.process_mrelease {
        let reason = "the kernel has no process_mrelease; the process frees its memory on exit";
        return killed
            .iter()
            .map(|_| (Outcome::KilledNotReaped, reason.to_owned()))
            .collect();
    }
    let deadline = Instant::now() + REAP_ANSWER_AFTER;
    let mut out: Vec<Option<(Outcome, String)>> = vec![None; killed.len()];
    let mut reaps = Vec::with_capacity(killed.len());
    for (i, (t, memory)) in killed.iter().enumerate() {
        let pidfd = match t.pidfd.try_clone() {
            Ok(pidfd) => pidfd,
            Err(err) => {
                out[i] = Some((Outcome::KilledNotReaped, format!("dup of its pidfd: {err}")));
                continue;
            }
        };
        let of = ReapOf {
            target_pid: t.pid,
            target_uid: t.ruid,
            target_comm: t.comm.clone(),
            namespaced: t.namespaced.unwrap_or(true),
            caller_pid: requester.caller_pid,
            caller_uid: requester.caller_uid,
        };
        match reap_pool::submit(of.clone(), MemberReap(pidfd)) {
            Ok(reap) => reaps.push((i, of, *memory, reap)),
            Err(refused) => out[i] = Some((Outcome::KilledNotReaped, refused.reason)),
        }
    }
    for (i, of, memory_before, reap) in reaps {
        let started = requester.started;
        let follow_up = move |result: Option<(Outcome, String)>| {
            let (outcome, not_reaped_reason) =
                result.unwrap_or_else(|| (Outcome::KilledNotReaped, reap_pool::PANICKED_REASON.into()));
            let report = ReapReport {
                outcome,
                not_reaped_reason,
                kill_path: KillPath::KillThenMrelease,
                memory_before,
                // Per member not measured (the group's figure is the
                // system's drop); the record says how it ended.
                bytes_released: 0,
                kill_to_reap: started.elapsed(),
                reap_retries: 0,
            };
            crate::engine::audit_reap_ended(&of, &Ok(report), started);
        };
        out[i] = Some(match reap.wait_blocking(deadline, follow_up) {
            Ok(result) => result,
            Err(Ended::NotStarted(refused)) => (Outcome::KilledNotReaped, refused.reason),
            Err(Ended::Stalled(_)) => (Outcome::ReapPending, reap_pool::pending_reason()),
            Err(Ended::Panicked) => (Outcome::KilledNotReaped, reap_pool::PANICKED_REASON.into()),
        });
    }
    out.into_iter()
        .map(|result| result.unwrap_or((Outcome::KilledNotReaped, String::new())))
        .collect()
}

fn reap_one(pidfd: BorrowedFd<'_>) -> (Outcome, String) {
    let mut retries = 0;
    loop {
        match sys::process_mrelease(pidfd, 0) {
            Ok(()) => return (Outcome::Reaped, String::new()),
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) && retries < MAX_REAP_RETRIES => {
                retries += 1;
                std::thread::sleep(Duration::from_millis(1 << retries.min(5)));
            }
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
                return (
                    Outcome::ExitedBeforeReap,
                    "the process passed exit_mm() before the reap and frees its own memory".into(),
                )
            }
            Err(err) => {
                return (
                    Outcome::KilledNotReaped,
                    format!(
                        "process_mrelease failed: {}",
                        crate::os::features::errno_name(err.raw_os_error())
                    ),
                )
            }
        }
    }
}
