//! The kill and the reap, on a pinned pidfd. Blocking: run it off the async
//! threads (a reap of a large address space takes milliseconds).

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rustix::process::{pidfd_send_signal, Signal};
use serde::Serialize;

use crate::error::EngineError;
use crate::features::{errno_name, KillPath};
use crate::procfs::{self, Memory};
use crate::sys;
use crate::target::{is_running, TargetProcess};

/// EAGAIN (mmap lock contended) retries before the broker gives up on the
/// reap. The kernel's OOM reaper tries 10 times too; our waits are shorter
/// because a caller is waiting on the answer.
pub const MAX_REAP_RETRIES: u32 = 10;

/// What happened to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Reaped,
    ExitedBeforeReap,
    KilledNotReaped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Reaped => "reaped",
            Outcome::ExitedBeforeReap => "exited_before_reap",
            Outcome::KilledNotReaped => "killed_not_reaped",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReapReport {
    pub outcome: Outcome,
    pub not_reaped_reason: String,
    pub kill_path: KillPath,
    pub memory_before: Memory,
    pub bytes_released: u64,
    pub kill_to_reap: Duration,
    pub reap_retries: u32,
}

/// Kills `target` and reaps its memory by `path`.
pub fn kill_and_reap(target: &TargetProcess, path: KillPath) -> Result<ReapReport, EngineError> {
    // Read by pid, valid because the kill below goes through the pidfd: if
    // the process had gone (and the pid been reused) the kill would fail.
    let memory_before = procfs::read_memory(target.pid).unwrap_or_default();
    let started = Instant::now();
    let mut report = ReapReport {
        outcome: Outcome::Reaped,
        not_reaped_reason: String::new(),
        kill_path: path,
        memory_before,
        bytes_released: 0,
        kill_to_reap: Duration::ZERO,
        reap_retries: 0,
    };

    let reaped = match path {
        KillPath::ReapKill => match sys::process_mrelease(target.pidfd.as_fd(), sys::PROCESS_MRELEASE_REAP_KILL) {
            Ok(()) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
                return Err(EngineError::NotFound(format!(
                    "process {} exited before the kill",
                    target.caller_pid
                )))
            }
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => return Err(kernel_refused(target, err)),
            // Anything else (EAGAIN on the lock, EINVAL): make sure the
            // process is killed, then retry the reap the two-call way.
            Err(_) => {
                report.kill_path = KillPath::KillThenMrelease;
                send_kill(target)?;
                reap_with_retries(target, &mut report.reap_retries)
            }
        },
        KillPath::KillThenMrelease => {
            send_kill(target)?;
            reap_with_retries(target, &mut report.reap_retries)
        }
        KillPath::KillOnly => {
            send_kill(target)?;
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        }
    };
    report.kill_to_reap = started.elapsed();

    match reaped {
        Ok(()) => {
            // What is left after the reap, read by pid and trusted only while
            // the process has not been waited for (a zombie holds its pid).
            let after = procfs::read_memory(target.pid).ok();
            let after = after.filter(|_| pid_still_held(target)).unwrap_or_default();
            report.bytes_released = memory_before.reapable_bytes().saturating_sub(after.reapable_bytes());
        }
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
            report.outcome = Outcome::ExitedBeforeReap;
            report.not_reaped_reason = "the process passed exit_mm() before the reap and frees its own memory".into();
        }
        Err(err) => {
            report.outcome = Outcome::KilledNotReaped;
            report.not_reaped_reason = match err.raw_os_error() {
                Some(libc::ENOSYS) => "the kernel has no process_mrelease; the process frees its memory on exit".into(),
                Some(libc::EAGAIN) => format!("the mmap lock stayed contended through {MAX_REAP_RETRIES} retries"),
                Some(libc::EINVAL) => "its address space is shared with a process that is not being killed".into(),
                errno => format!("process_mrelease failed: {}", errno_name(errno)),
            };
        }
    }
    Ok(report)
}

fn send_kill(target: &TargetProcess) -> Result<(), EngineError> {
    pidfd_send_signal(target.pidfd.as_fd(), Signal::KILL).map_err(|err| match err {
        rustix::io::Errno::SRCH => {
            EngineError::NotFound(format!("process {} exited before the kill", target.caller_pid))
        }
        rustix::io::Errno::PERM => kernel_refused(target, err.into()),
        other => EngineError::Internal(format!("pidfd_send_signal: {other}")),
    })
}

fn kernel_refused(target: &TargetProcess, err: io::Error) -> EngineError {
    EngineError::PermissionDenied(format!(
        "the kernel refused the broker's kill of pid {} ({err}); the broker lacks CAP_KILL (degraded mode)",
        target.caller_pid
    ))
}

fn reap_with_retries(target: &TargetProcess, retries: &mut u32) -> io::Result<()> {
    loop {
        match sys::process_mrelease(target.pidfd.as_fd(), 0) {
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) && *retries < MAX_REAP_RETRIES => {
                *retries += 1;
                // 1, 2, 4 … 32 ms, about 0.2 s in all.
                std::thread::sleep(Duration::from_millis(1 << (*retries).min(5)));
            }
            other => return other,
        }
    }
}

/// The pid still belongs to the target (running or a zombie not yet waited
/// for). A pidfd cannot tell a zombie from a reaped process without
/// PIDFD_GET_INFO, so without it a dead target counts as "not held".
fn pid_still_held(target: &TargetProcess) -> bool {
    is_running(target.pidfd.as_fd()) || sys::pidfd_get_info(target.pidfd.as_fd(), sys::PIDFD_INFO_PID).is_ok()
}
