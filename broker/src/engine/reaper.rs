// SPDX-License-Identifier: MIT OR Apache-2.0
//! The kill and the reap, on a pinned pidfd. Blocking: run it off the async
//! threads (a reap of a large address space takes milliseconds).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{pidfd_send_signal, Signal};
use serde::Serialize;

use crate::engine::error::EngineError;
use crate::engine::target::{wait_for_exit, TargetProcess};
use crate::os::features::{errno_name, KillPath};
use crate::os::procfs::{self, Memory};
use crate::os::sys;

/// EAGAIN (mmap lock contended) retries before the broker gives up on the
/// reap. The kernel's OOM reaper tries 10 times too; our waits are shorter
/// because a caller is waiting on the answer.
pub const MAX_REAP_RETRIES: u32 = 10;

/// Longest wait for a target that frees its own memory (it passed
/// exit_mm() before the reap) to finish, before the released figure is
/// taken. Its exit path unmaps at the speed a reap would.
pub const EXIT_SETTLE: Duration = Duration::from_millis(500);

pub use reapd_proto::model::Outcome;

#[derive(Debug, Clone, Serialize)]
pub struct ReapReport {
    pub outcome: Outcome,
    pub not_reaped_reason: String,
    pub kill_path: KillPath,
    /// The target's address space just before the kill (read from a live
    /// thread when its leader has exited).
    pub memory_before: Memory,
    /// What this kill gave back to the system, in bytes: the drop of the
    /// system's anonymous and swap memory in use (`/proc/meminfo`
    /// AnonPages + SwapTotal − SwapFree) from just before the kill until the
    /// reap returned, never more than the target's own anon + swap before.
    /// Copy-on-write pages still mapped by a survivor are not counted (they
    /// stay in use); memory the target frees on its own exit path while the
    /// broker waits is. 0 for `AlreadyDying`. An estimate where other
    /// processes allocate or free at the same moment (documented in
    /// docs/benchmarks.md).
    pub bytes_released: u64,
    pub kill_to_reap: Duration,
    pub reap_retries: u32,
}

/// Processes (pid, start time) a request of this broker is killing now: a
/// second request for the same process reports `AlreadyDying` instead of
/// counting the same memory twice.
static DYING: Mutex<Option<HashSet<(i32, u64)>>> = Mutex::new(None);

/// A claim on a process in [`DYING`], released on drop.
struct Claim((i32, u64));

impl Claim {
    fn take(target: &TargetProcess) -> Option<Claim> {
        let key = (target.pid, target.start_time);
        let mut dying = DYING.lock().unwrap_or_else(|p| p.into_inner());
        // `then`, not `then_some`: a Claim built for a refused insert would
        // be dropped at once, removing the other request's key (and locking
        // DYING again while this guard holds it).
        dying.get_or_insert_with(HashSet::new).insert(key).then(|| Claim(key))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut dying = DYING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = dying.as_mut() {
            set.remove(&self.0);
        }
    }
}

/// Longest reap delay or grace period a request or policy may ask for.
pub const MAX_REAP_DELAY: Duration = Duration::from_secs(10);

/// How the kill is paced. Both zero (the default): SIGKILL and reap at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KillOptions {
    /// SIGTERM first, and SIGKILL only if the process has not exited within
    /// this long (earlyoom's habit). It may then clean up; it also keeps
    /// its memory that long.
    pub grace: Duration,
    /// After SIGKILL, let the process run its own exit path this long
    /// before reaping it, and reap only if it has not exited by then. The
    /// exit path hands its robust futexes to waiters (EOWNERDEAD); a reap
    /// before it destroys the list (private memory), and peers blocked on
    /// a process-shared robust mutex the victim held hang. The kernel's own
    /// OOM reaper waits 2 s (`OOM_REAPER_DELAY`) for this reason.
    pub reap_delay: Duration,
}

/// What [`kill`] leaves to do: nothing more (the process was already being
/// killed, or it exited on SIGTERM), or its reap.
pub enum Killed {
    Done(ReapReport),
    Reap(ReapJob),
}

/// The reap of a killed process (and, on the one-call path, its SIGKILL,
/// which is part of the same syscall): `process_mrelease` and the release
/// figure read after it. Owns all it needs (a dup of the pidfd, the claim
/// on the process) so it can run on a reaper thread and outlive the
/// request, however long the kernel makes it wait (see `reap_pool`).
pub struct ReapJob {
    pidfd: std::os::fd::OwnedFd,
    caller_pid: i32,
    path: KillPath,
    report: ReapReport,
    system_before: Option<u64>,
    started: Instant,
    /// Set when the process already exited in its reap delay: no reap.
    exited_in_delay: bool,
    /// The SIGKILL sent before waiting for a reaper thread failed: the
    /// answer, whatever happens to the reap.
    kill_failed: Option<EngineError>,
    /// Held until the reap ends: a second kill of the same process says
    /// `AlreadyDying` instead of starting a second reap behind the first.
    _claim: Claim,
}

/// Kills `target` (SIGTERM and its grace first if asked, the reap delay
/// after): everything of a kill but the reap, which it returns to run.
/// Blocks only when `options` asks for a grace or a reap delay. On the
/// one-call path (`ReapKill` with no reap delay) the SIGKILL is the reap's
/// own syscall, made at the start of [`ReapJob::run`].
pub fn kill(target: &TargetProcess, path: KillPath, options: KillOptions) -> Result<Killed, EngineError> {
    // The pin's own status read where it kept one (it is re-validated by
    // the pidfd); otherwise read by pid, valid because the kill below goes
    // through the pidfd: if the process had gone (and the pid been reused)
    // the kill would fail.
    let memory_before = target.memory.unwrap_or_else(|| {
        procfs::read_process_memory(target.pid)
            .map(|(m, _)| m)
            .unwrap_or_default()
    });
    let mut report = ReapReport {
        outcome: Outcome::Reaped,
        not_reaped_reason: String::new(),
        kill_path: path,
        memory_before,
        bytes_released: 0,
        kill_to_reap: Duration::ZERO,
        reap_retries: 0,
    };
    let Some(claim) = Claim::take(target) else {
        report.outcome = Outcome::AlreadyDying;
        report.not_reaped_reason = "another request is already killing and reaping this process".into();
        return Ok(Killed::Done(report));
    };
    let system_before = procfs::system_anon_and_swap().ok();

    if !options.grace.is_zero() {
        pidfd_send_signal(target.pidfd.as_fd(), Signal::TERM).map_err(|err| signal_error(target.caller_pid, err))?;
        if wait_for_exit(target.pidfd.as_fd(), options.grace.min(MAX_REAP_DELAY)) {
            report.outcome = Outcome::ExitedBeforeReap;
            report.not_reaped_reason = "it exited on SIGTERM within the grace period".into();
            if let (Some(before), Ok(after)) = (system_before, procfs::system_anon_and_swap()) {
                report.bytes_released = before.saturating_sub(after).min(memory_before.reapable_bytes());
            }
            return Ok(Killed::Done(report));
        }
    }
    // A reap delay needs the kill and the reap apart.
    let path = if !options.reap_delay.is_zero() && path == KillPath::ReapKill {
        KillPath::KillThenMrelease
    } else {
        path
    };
    report.kill_path = path;
    let pidfd = target
        .pidfd
        .try_clone()
        .map_err(|err| EngineError::Internal(format!("dup of the target's pidfd: {err}")))?;
    let started = Instant::now();
    let mut exited_in_delay = false;
    if path != KillPath::ReapKill {
        send_kill(target.pidfd.as_fd(), target.caller_pid)?;
        exited_in_delay = !options.reap_delay.is_zero()
            && path == KillPath::KillThenMrelease
            && wait_for_exit(target.pidfd.as_fd(), options.reap_delay.min(MAX_REAP_DELAY));
    }
    Ok(Killed::Reap(ReapJob {
        pidfd,
        caller_pid: target.caller_pid,
        path,
        report,
        system_before,
        started,
        exited_in_delay,
        kill_failed: None,
        _claim: claim,
    }))
}

impl crate::engine::reap_pool::Work for ReapJob {
    type Output = Result<ReapReport, EngineError>;
    fn run(self) -> Self::Output {
        ReapJob::run(self)
    }

    /// The one-call path's SIGKILL is the reap's own syscall; waiting for
    /// a reaper thread, it would wait too: it goes now, and the reap is
    /// the two-call one.
    fn before_waiting(&mut self) {
        if self.path != KillPath::ReapKill {
            return;
        }
        self.started = Instant::now();
        match send_kill(self.pidfd.as_fd(), self.caller_pid) {
            Ok(()) => {
                self.path = KillPath::KillThenMrelease;
                self.report.kill_path = KillPath::KillThenMrelease;
            }
            Err(err) => self.kill_failed = Some(err),
        }
    }
}

impl ReapJob {
    /// When the SIGKILL went (or, on the one-call path, goes) out.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// What the reply says of a reap still running: killed, reap pending.
    pub fn pending_report(&self, reason: String) -> ReapReport {
        ReapReport {
            outcome: Outcome::ReapPending,
            not_reaped_reason: reason,
            kill_to_reap: self.started.elapsed(),
            ..self.report.clone()
        }
    }

    /// The process, killed and not reaped: the SIGKILL alone (what the
    /// kernel does by default) when the reap is refused (too many reaps
    /// stalled, `reason` says), sent here if the one-call path had not
    /// sent it yet.
    pub fn skip(self, reason: String) -> Result<ReapReport, EngineError> {
        if let Some(err) = self.kill_failed {
            return Err(err);
        }
        if self.path == KillPath::ReapKill {
            send_kill(self.pidfd.as_fd(), self.caller_pid)?;
        }
        let mut report = self.report;
        report.kill_path = KillPath::KillOnly;
        report.kill_to_reap = self.started.elapsed();
        report.bytes_released = released(self.system_before, &report.memory_before, false);
        report.outcome = Outcome::KilledNotReaped;
        report.not_reaped_reason = reason;
        Ok(report)
    }

    /// The reap: blocks as long as `process_mrelease` does (a victim's
    /// mmap lock held elsewhere can make that forever, docs/threats.md).
    pub fn run(self) -> Result<ReapReport, EngineError> {
        let ReapJob {
            pidfd,
            caller_pid,
            path,
            mut report,
            system_before,
            started,
            exited_in_delay,
            kill_failed,
            _claim,
        } = self;
        if let Some(err) = kill_failed {
            return Err(err);
        }
        let reaped = match path {
            KillPath::ReapKill => match sys::process_mrelease(pidfd.as_fd(), sys::PROCESS_MRELEASE_REAP_KILL) {
                Ok(()) => Ok(()),
                Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
                    return Err(EngineError::NotFound(format!(
                        "process {caller_pid} exited before the kill"
                    )))
                }
                Err(err) if err.raw_os_error() == Some(libc::EPERM) => return Err(kernel_refused(caller_pid, err)),
                // Anything else (EAGAIN on the lock, EINVAL): make sure the
                // process is killed, then retry the reap the two-call way.
                Err(_) => {
                    report.kill_path = KillPath::KillThenMrelease;
                    send_kill(pidfd.as_fd(), caller_pid)?;
                    reap_with_retries(pidfd.as_fd(), &mut report.reap_retries)
                }
            },
            // It ran its exit path in time: nothing left to reap.
            KillPath::KillThenMrelease if exited_in_delay => Err(io::Error::from_raw_os_error(libc::ESRCH)),
            KillPath::KillThenMrelease => reap_with_retries(pidfd.as_fd(), &mut report.reap_retries),
            // Unspecified (the wire's unknown value) never comes from the
            // probe; if it did, a plain kill is the one path every kernel
            // has (sent by `kill`).
            KillPath::KillOnly | KillPath::Unspecified => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
        };
        report.kill_to_reap = started.elapsed();

        // A target that passed exit_mm() before the reap is freeing its
        // memory itself, right now: let it finish (its pidfd turns readable
        // after exit_mmap() is done) so the figure says what the kill gave
        // back, not what happened to be freed at the instant
        // process_mrelease said ESRCH. Bounded: an mm pinned by someone
        // else may not go at all.
        if matches!(&reaped, Err(err) if err.raw_os_error() == Some(libc::ESRCH)) {
            wait_for_exit(pidfd.as_fd(), EXIT_SETTLE);
        }
        report.bytes_released = released(system_before, &report.memory_before, reaped.is_ok());
        match reaped {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
                report.outcome = Outcome::ExitedBeforeReap;
                report.not_reaped_reason =
                    "the process passed exit_mm() before the reap and frees its own memory".into();
            }
            Err(err) => {
                report.outcome = Outcome::KilledNotReaped;
                report.not_reaped_reason = match err.raw_os_error() {
                    Some(libc::ENOSYS) => {
                        "the kernel has no process_mrelease; the process frees its memory on exit".into()
                    }
                    Some(libc::EAGAIN) => format!("the mmap lock stayed contended through {MAX_REAP_RETRIES} retries"),
                    Some(libc::EINVAL) => "its address space is shared with a process that is not being killed".into(),
                    errno => format!("process_mrelease failed: {}", errno_name(errno)),
                };
            }
        }
        Ok(report)
    }
}

/// What the kill gave back so far: the system's own counters, not the
/// target's (a reap of pages a survivor still maps, copy-on-write after
/// fork, frees nothing), at most the target's own anon + swap.
fn released(system_before: Option<u64>, memory_before: &Memory, reaped: bool) -> u64 {
    match (system_before, procfs::system_anon_and_swap().ok()) {
        (Some(before), Some(after)) => before.saturating_sub(after).min(memory_before.reapable_bytes()),
        // No system counters readable (a sandbox hiding both /proc/meminfo
        // and /sys): the victim's own anon + swap, an upper bound, for what
        // the reap tore down.
        _ if reaped => memory_before.reapable_bytes(),
        _ => 0,
    }
}

fn send_kill(pidfd: BorrowedFd<'_>, caller_pid: i32) -> Result<(), EngineError> {
    pidfd_send_signal(pidfd, Signal::KILL).map_err(|err| signal_error(caller_pid, err))
}

fn signal_error(caller_pid: i32, err: rustix::io::Errno) -> EngineError {
    match err {
        rustix::io::Errno::SRCH => EngineError::NotFound(format!("process {caller_pid} exited before the kill")),
        rustix::io::Errno::PERM => kernel_refused(caller_pid, err.into()),
        other => EngineError::Internal(format!("pidfd_send_signal: {other}")),
    }
}

fn kernel_refused(caller_pid: i32, err: io::Error) -> EngineError {
    EngineError::PermissionDenied {
        kind: crate::engine::policy::DecisionKind::Degraded,
        rule: "degraded:no-cap-kill".into(),
        reason: format!(
            "the kernel refused the broker's kill of pid {caller_pid} ({err}); the broker lacks CAP_KILL (degraded mode)"
        ),
    }
}

fn reap_with_retries(pidfd: BorrowedFd<'_>, retries: &mut u32) -> io::Result<()> {
    loop {
        match sys::process_mrelease(pidfd, 0) {
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) && *retries < MAX_REAP_RETRIES => {
                *retries += 1;
                // 1, 2, 4 … 32 ms, about 0.2 s in all.
                std::thread::sleep(Duration::from_millis(1 << (*retries).min(5)));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> TargetProcess {
        TargetProcess {
            pidfd: std::fs::File::open("/dev/null").unwrap().into(),
            pid: -7,
            caller_pid: -7,
            ruid: 0,
            euid: 0,
            suid: 0,
            gid: 0,
            comm: String::new(),
            start_time: 42,
            cgroup: None,
            is_kernel_thread: false,
            oom_score_adj: 0,
            memory: None,
            namespaced: None,
        }
    }

    /// A second claim on a process being killed is refused without
    /// disturbing the first, and the process can be claimed again after.
    #[test]
    fn one_claim_per_dying_process() {
        let t = target();
        let first = Claim::take(&t).expect("first claim");
        assert!(Claim::take(&t).is_none());
        assert!(Claim::take(&t).is_none(), "a refused claim must not release the first");
        drop(first);
        assert!(Claim::take(&t).is_some());
    }
}
