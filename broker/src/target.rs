//! Which process: pinned by a pidfd before any check.
//!
//! The broker opens a pidfd for the named pid first (or takes the pidfd a
//! client passed), then reads the target's credentials and cgroup. Reads by
//! pid number are trusted only if the pidfd's process is still running after
//! them: a pid cannot be reused while its process exists, so the reads were
//! of the pinned process. Every later step (the kill, the reap, the wait)
//! acts on the pidfd, never on the pid number.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, Pid, PidfdFlags};
use serde::Serialize;

use crate::error::EngineError;
use crate::features::KernelFeatures;
use crate::{procfs, sys};

/// How a request names its target.
#[derive(Debug)]
pub enum TargetSpec {
    /// A pid, optionally guarded by its start time (field 22 of
    /// `/proc/PID/stat`).
    Pid { pid: i32, start_time: Option<u64> },
    /// A pidfd the client holds and passed with the call (varlink).
    Pidfd(OwnedFd),
}

/// A pinned, identified target process.
#[derive(Debug, Serialize)]
pub struct TargetProcess {
    #[serde(skip)]
    pub pidfd: OwnedFd,
    pub pid: i32,
    pub ruid: u32,
    pub euid: u32,
    pub suid: u32,
    pub gid: u32,
    pub comm: String,
    pub start_time: u64,
    /// cgroup v2 path ("" on machines without a unified hierarchy).
    pub cgroup: String,
    pub is_kernel_thread: bool,
    pub oom_score_adj: i32,
    /// `/proc/PID/exe`, when the broker may read it.
    pub exe: Option<PathBuf>,
}

/// The pidfd's process has not exited: a pidfd polls readable once it has.
pub fn is_running(pidfd: BorrowedFd<'_>) -> bool {
    !wait_for_exit(pidfd, std::time::Duration::ZERO)
}

/// Blocks until the pidfd's process exits (true) or `timeout` passes (false).
pub fn wait_for_exit(pidfd: BorrowedFd<'_>, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timespec = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::from_borrowed_fd(pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&timespec)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            // EINVAL/EBADF cannot happen on a pidfd; count it as gone.
            Err(_) => return true,
        }
    }
}

/// Opens a pidfd for `spec` and reads who the process is.
pub fn pin(spec: TargetSpec, features: &KernelFeatures) -> Result<TargetProcess, EngineError> {
    let (pidfd, pid, expected_start) = match spec {
        TargetSpec::Pid { pid, start_time } => {
            if pid <= 0 {
                return Err(EngineError::InvalidArgument(format!("pid must be positive, got {pid}")));
            }
            let raw = Pid::from_raw(pid).expect("pid > 0 checked above");
            let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|err| match err {
                rustix::io::Errno::SRCH => EngineError::NotFound(format!("no process with pid {pid}")),
                rustix::io::Errno::INVAL | rustix::io::Errno::NOENT => {
                    EngineError::InvalidArgument(format!("pid {pid} is a thread, not a process"))
                }
                other => EngineError::Internal(format!("pidfd_open({pid}): {other}")),
            })?;
            (pidfd, pid, start_time)
        }
        TargetSpec::Pidfd(pidfd) => {
            let pid = pid_of_pidfd(pidfd.as_fd(), features)?;
            (pidfd, pid, None)
        }
    };

    let not_running = || EngineError::NotFound(format!("process {pid} has exited"));
    if !is_running(pidfd.as_fd()) {
        return Err(not_running());
    }
    let stat = procfs::read_stat(pid).map_err(|_| not_running())?;
    let status = procfs::read_status(pid).map_err(|_| not_running())?;
    let cgroup = procfs::read_cgroup(pid).unwrap_or_default();
    let oom_score_adj = procfs::read_oom_score_adj(pid).unwrap_or(0);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();

    // Credentials: from the pidfd itself where the kernel can say (6.13+);
    // otherwise from /proc, trusted through the re-validation below.
    let (ruid, euid, suid, gid) = if features.pidfd_get_info {
        let info =
            sys::pidfd_get_info(pidfd.as_fd(), sys::PIDFD_INFO_CREDS).map_err(|err| match err.raw_os_error() {
                Some(libc::ESRCH) => not_running(),
                _ => EngineError::Internal(format!("PIDFD_GET_INFO on pid {pid}: {err}")),
            })?;
        (info.ruid, info.euid, info.suid, info.rgid)
    } else {
        (status.uids[0], status.uids[1], status.uids[2], status.gids[0])
    };

    // Re-validation: still running, so every read above was of this process.
    if !is_running(pidfd.as_fd()) {
        return Err(not_running());
    }

    if let Some(expected) = expected_start {
        if expected != stat.start_time {
            return Err(EngineError::ProcessChanged(format!(
                "pid {pid} now names a process started at {}, not {expected}",
                stat.start_time
            )));
        }
    }

    let is_kernel_thread = stat.is_kernel_thread();
    Ok(TargetProcess {
        pidfd,
        pid,
        ruid,
        euid,
        suid,
        gid,
        comm: stat.comm,
        start_time: stat.start_time,
        cgroup,
        is_kernel_thread,
        oom_score_adj,
        exe,
    })
}

/// The pid behind a pidfd a client passed. Anything that is not a pidfd is
/// refused: the client named no process.
fn pid_of_pidfd(fd: BorrowedFd<'_>, features: &KernelFeatures) -> Result<i32, EngineError> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let not_a_pidfd = || EngineError::InvalidArgument("the passed file descriptor is not a pidfd".into());
    // fdinfo of a pidfd has a "Pid:" line (5.3+): -1 once the process has
    // exited, 0 when it is outside our pid namespace.
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).map_err(|_| not_a_pidfd())?;
    let link = std::fs::read_link(format!("/proc/self/fd/{raw}")).map_err(|_| not_a_pidfd())?;
    if !link.to_string_lossy().contains("pidfd") {
        return Err(not_a_pidfd());
    }
    let pid: i32 = fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(not_a_pidfd)?;
    match pid {
        -1 => Err(EngineError::NotFound(
            "the process behind the passed pidfd has exited".into(),
        )),
        0 => Err(EngineError::InvalidArgument(
            "the passed pidfd names a process outside the broker's pid namespace".into(),
        )),
        pid if features.pidfd_get_info => {
            // Cross-check with the kernel's own answer where it has one.
            match sys::pidfd_get_info(fd, sys::PIDFD_INFO_PID) {
                Ok(info) if info.pid as i32 == pid => Ok(pid),
                Ok(_) => Err(EngineError::ProcessChanged("pidfd changed under the broker".into())),
                Err(_) => Err(EngineError::NotFound(
                    "the process behind the passed pidfd has exited".into(),
                )),
            }
        }
        pid => Ok(pid),
    }
}
