// SPDX-License-Identifier: MIT OR Apache-2.0
//! Which process: pinned by a pidfd before any check.
//!
//! The broker opens a pidfd for the named pid first (or takes the pidfd a
//! client passed), then reads the target's credentials and cgroup. Reads by
//! pid number are trusted only if the pidfd's process is still running after
//! them: a pid cannot be reused while its process exists, so the reads were
//! of the pinned process. Every later step (the kill, the reap, the wait)
//! acts on the pidfd, never on the pid number.
//!
//! A pid in a request is a number in the *caller's* pid namespace, as for
//! kill(2): it is translated into the broker's through the caller's pid
//! namespace (`NS_GET_TGID_FROM_PIDNS`, Linux 6.11), and a process the
//! caller cannot see is "not found", whether named by pid or by a passed
//! pidfd (`access_pidfd_pidns()` in `kernel/signal.c` refuses the latter
//! too). When the broker cannot learn the caller's namespace it refuses
//! rather than guess.
//!
//! The target is always a whole process (a thread group), decided on the
//! credentials of its thread-group leader as kill(2) does: a thread id or a
//! `PIDFD_THREAD` pidfd is refused, since SIGKILL to a thread kills the
//! whole process while the decision would have looked at one thread.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, Pid, PidfdFlags};
use serde::Serialize;

use crate::engine::caller::{Caller, CallerPidns};
use crate::engine::error::EngineError;
use crate::os::cgroup::CgroupFacts;
use crate::os::features::KernelFeatures;
use crate::os::sys::PidnsTranslation;
use crate::os::{procfs, sys};

/// How a request names its target.
#[derive(Debug)]
pub enum TargetSpec {
    /// A pid in the caller's pid namespace, optionally guarded by its start
    /// time (field 22 of `/proc/PID/stat`, clock ticks since boot).
    Pid { pid: i32, start_time: Option<u64> },
    /// A pidfd the client holds and passed with the call (varlink).
    Pidfd(OwnedFd),
}

/// A pinned, identified target process.
#[derive(Debug, Serialize)]
pub struct TargetProcess {
    #[serde(skip)]
    pub pidfd: OwnedFd,
    /// Its pid (tgid) in the broker's pid namespace: for audit records.
    pub pid: i32,
    /// Its pid in the caller's pid namespace: the only pid a reply shows.
    pub caller_pid: i32,
    /// Real, effective and saved uid and real gid of the thread-group
    /// leader (what kill(2) compares).
    pub ruid: u32,
    pub euid: u32,
    pub suid: u32,
    pub gid: u32,
    /// Escaped command name (`procfs::escape_comm`), display only.
    pub comm: String,
    pub start_time: u64,
    /// Its cgroup, `None` when it could not be verified.
    pub cgroup: Option<CgroupFacts>,
    pub is_kernel_thread: bool,
    pub oom_score_adj: i32,
    /// Its memory as the pin read it from `/proc/PID/status`, when asked
    /// for ([`pin`]'s `with_memory`) and the leader still had an mm: a
    /// kill's `memory_before`, read with the rest instead of again.
    #[serde(skip)]
    pub memory: Option<procfs::Memory>,
    /// Whether it is in a user namespace other than the broker's
    /// (`procfs::in_own_user_namespace`): read for a kill only (`None`
    /// otherwise), `Some(true)` when unreadable. Its reap counts against the
    /// budget such namespaces share (`reap_pool::MAX_RUNNING_NAMESPACED`).
    pub namespaced: Option<bool>,
}

impl TargetProcess {
    /// The cgroup path for replies ("" when unknown).
    pub fn cgroup_path(&self) -> &str {
        self.cgroup.as_ref().map_or("", |c| c.path.as_str())
    }

    /// Who it is, as replies show it (the caller's pid).
    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.caller_pid,
            uid: self.ruid,
            euid: self.euid,
            suid: self.suid,
            gid: self.gid,
            comm: self.comm.clone(),
            start_time: self.start_time,
            cgroup: self.cgroup_path().to_string(),
        }
    }
}

/// Who a process is, as a reply or an event shows it: the facts of a
/// [`TargetProcess`] without its pidfd, so it can outlive the process and
/// be queued. The API's own type: `uid` is the real uid.
pub use reapd_proto::model::ProcessInfo;

/// The pidfd's process has not exited: a pidfd polls readable once it has.
pub fn is_running(pidfd: BorrowedFd<'_>) -> bool {
    !wait_for_exit(pidfd, std::time::Duration::ZERO)
}

/// Set when the broker stops: see [`stop_waiting`].
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How long one poll of [`wait_for_exit`] may sleep before it looks at
/// [`STOPPING`] again.
const STOP_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Ends every wait on a victim early, now and later: called when the broker
/// stops. A kill's SIGTERM grace, reap delay and wait for exit can add up to
/// about 30 s, longer than shutdown drains kills (`SHUTDOWN_GRACE`, 12 s),
/// so without this a kill decided and audited before the stop would be cut
/// off by the exit with no outcome record (and a victim in its grace period
/// left with SIGTERM only). With it each such kill goes straight on to its
/// SIGKILL, reap and outcome record.
pub fn stop_waiting() {
    STOPPING.store(true, Ordering::SeqCst);
}

/// Blocks until the pidfd's process exits (true) or `timeout` passes
/// (false); when the broker is stopping ([`stop_waiting`]), at once.
pub fn wait_for_exit(pidfd: BorrowedFd<'_>, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut left = deadline.saturating_duration_since(std::time::Instant::now());
        if STOPPING.load(Ordering::SeqCst) {
            left = std::time::Duration::ZERO;
        }
        // Long waits sleep in slices, so that a stop is seen within one.
        let slice = left.min(STOP_CHECK);
        let timespec = Timespec {
            tv_sec: slice.as_secs() as i64,
            tv_nsec: slice.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::from_borrowed_fd(pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&timespec)) {
            Ok(0) if slice < left => continue,
            Ok(0) => return false,
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            // EINVAL/EBADF cannot happen on a pidfd; count it as gone.
            Err(_) => return true,
        }
    }
}

/// How many pid namespaces `pidns` lies below the broker's: the number of
/// `NS_GET_PARENT` steps until the kernel refuses to go above the broker's
/// own namespace. `None` if it is not a pid namespace below ours.
pub fn pidns_level(pidns: BorrowedFd<'_>) -> Option<usize> {
    // Pid namespaces nest at most 32 deep (MAX_PID_NS_LEVEL).
    const MAX_LEVEL: usize = 32;
    let mut current: Option<OwnedFd> = None;
    for level in 0..=MAX_LEVEL {
        let fd = current.as_ref().map_or(pidns, |fd| fd.as_fd());
        match sys::pidns_parent(fd) {
            Ok(parent) => current = Some(parent),
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => return Some(level),
            Err(_) => return None,
        }
    }
    None
}

/// Checks that `pidns` is exactly the caller's own pid namespace: at the
/// caller's depth, and the caller is in it under the pid its `NSpid` line
/// gives. A namespace above the caller's would let it name processes it
/// cannot see; one beside it would not hold the caller at all.
pub fn verify_caller_pidns(pidns: BorrowedFd<'_>, caller: &Caller) -> Result<(), EngineError> {
    let refuse = |why: &str| {
        EngineError::invalid(
            "pidns",
            format!("the passed fd is not the caller's pid namespace ({why})"),
        )
    };
    // First what the fd is, from its /proc link alone: every ioctl below
    // would go to whatever implements the file, and for a FUSE file that is
    // the caller's own server, which need never answer.
    if !is_pid_namespace_file(pidns) {
        return Err(refuse("not a pid namespace file"));
    }
    let status = procfs::read_status(caller.pid).map_err(|_| refuse("the caller is gone"))?;
    let (Some(level), Some(own)) = (status.ns_pids.len().checked_sub(1), status.ns_pids.last()) else {
        return Err(refuse("the caller's NSpid is unknown"));
    };
    if pidns_level(pidns) != Some(level) {
        return Err(refuse("wrong depth, or not a pid namespace"));
    }
    match sys::pidns_translate(pidns, PidnsTranslation::PidInNs, caller.pid) {
        Ok(pid) if pid == *own => {}
        _ => return Err(refuse("the caller is not in it")),
    }
    // The reads above were of the caller only if it still runs.
    if !caller.pidfd.as_ref().is_some_and(|fd| is_running(fd.as_fd())) {
        return Err(refuse("the caller is gone"));
    }
    Ok(())
}

/// `fd` is a pid namespace file (nsfs, linked as `pid:[INODE]`), judged by
/// `/proc/self/fd`'s link, which the kernel composes without asking the
/// file's file system anything.
fn is_pid_namespace_file(fd: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
        return false;
    };
    link.as_os_str()
        .as_bytes()
        .strip_prefix(b"pid:[")
        .and_then(|rest| rest.strip_suffix(b"]"))
        .is_some_and(|inode| !inode.is_empty() && inode.iter().all(u8::is_ascii_digit))
}

/// The pid namespace a request's pids are read in.
#[derive(Debug, Clone, Copy)]
pub enum Namespace<'a> {
    /// The broker's own: no translation.
    Broker,
    /// A namespace below the broker's, verified to be the caller's.
    Child(BorrowedFd<'a>),
}

/// The caller's pid namespace for this request: the broker's, the one it
/// opened at accept, or `proof` (an fd the caller passed, verified here).
/// Refuses, naming the fact, when none of them can be established.
pub fn caller_namespace<'a>(caller: &'a Caller, proof: Option<&'a OwnedFd>) -> Result<Namespace<'a>, EngineError> {
    match &caller.pidns {
        CallerPidns::Broker => Ok(Namespace::Broker),
        CallerPidns::Child { ns: Some(ns), .. } => Ok(Namespace::Child(ns.as_fd())),
        CallerPidns::Child { ns: None, level } => match proof {
            Some(fd) => {
                verify_caller_pidns(fd.as_fd(), caller)?;
                Ok(Namespace::Child(fd.as_fd()))
            }
            None => Err(EngineError::unverified(
                "unverified:caller-pidns",
                format!(
                    "unverified fact: the caller's pid namespace ({level} below the broker's): the broker may not \
                 open another user's namespace (the kernel wants ptrace access), so it cannot tell which process \
                 a pid means there; over varlink, pass the namespace (an fd of /proc/self/ns/pid) as `pidns`"
                ),
            )),
        },
        CallerPidns::Unknown => Err(EngineError::unverified(
            "unverified:caller-pidns",
            "unverified fact: the caller's pid namespace could not be read (the caller may have exited), so \
             no pid it names can be resolved",
        )),
    }
}

/// Opens a pidfd for `spec`, named in `ns`, and reads who the process is;
/// `with_memory` also keeps its memory (for a kill's report).
///
/// Runs on the async worker: it makes no call that waits on another
/// process. pidfd_open, the pidfd ioctls and poll do not block; the /proc
/// files it reads (`stat`, `status`, `oom_score_adj`, `cgroup`) never take
/// the target's `mmap_lock` (unlike `cmdline`, `environ`, `maps` or
/// `smaps`, which a target could hold up by stalling a page fault, and which
/// the broker never reads); `cgroup` takes the global `cgroup_mutex`, held
/// only briefly by cgroup creation, removal and migration.
///
/// Errors: `InvalidArgument` for a pid ≤ 0, a thread id, a thread pidfd or an
/// fd that is not a pidfd; `NotFound` when no process the caller can see has
/// that name (or it has exited); `ProcessChanged` on a start-time mismatch;
/// `Internal` when /proc answers unexpectedly for a running process.
pub fn pin(
    spec: TargetSpec,
    ns: Namespace<'_>,
    features: &KernelFeatures,
    with_memory: bool,
) -> Result<TargetProcess, EngineError> {
    // Errors about the target itself blame the parameter that named it.
    let named_by = match spec {
        TargetSpec::Pid { .. } => "pid",
        TargetSpec::Pidfd(_) => "pidfd",
    };
    pin_named(spec, ns, features, with_memory).map_err(|err| err.blaming(TARGET, named_by))
}

/// The parameter name target errors carry until [`pin`] names the real one.
const TARGET: &str = "target";

fn pin_named(
    spec: TargetSpec,
    ns: Namespace<'_>,
    features: &KernelFeatures,
    with_memory: bool,
) -> Result<TargetProcess, EngineError> {
    let (pidfd, pid, caller_pid, expected_start) = match spec {
        TargetSpec::Pid { pid, start_time } => {
            if pid <= 0 {
                return Err(EngineError::invalid("pid", format!("pid must be positive, got {pid}")));
            }
            let (pidfd, host_pid) = open_in(pid, ns)?;
            (pidfd, host_pid, pid, start_time)
        }
        TargetSpec::Pidfd(pidfd) => {
            let host_pid = pid_of_pidfd(pidfd.as_fd(), features)?;
            let caller_pid = match ns {
                Namespace::Broker => host_pid,
                Namespace::Child(ns) => match sys::pidns_translate(ns, PidnsTranslation::TgidInNs, host_pid) {
                    Ok(pid) => pid,
                    Err(_) => {
                        return Err(EngineError::NotFound(
                            "the process behind the passed pidfd is not in the caller's pid namespace".into(),
                        ))
                    }
                },
            };
            (pidfd, host_pid, caller_pid, None)
        }
    };

    identify(
        pidfd,
        pid,
        caller_pid,
        expected_start,
        features,
        with_memory,
        with_memory,
    )
}

/// Pins a process known by its pid in the broker's own namespace (a member
/// of a cgroup), as the caller in `ns` would name it: `NotFound` when the
/// caller cannot see it.
pub(crate) fn pin_member(
    host_pid: i32,
    ns: Namespace<'_>,
    features: &KernelFeatures,
    for_kill: bool,
) -> Result<TargetProcess, EngineError> {
    let not_found = || EngineError::NotFound(format!("member {host_pid} has exited"));
    let raw = Pid::from_raw(host_pid).ok_or_else(not_found)?;
    let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|err| match err {
        rustix::io::Errno::SRCH => not_found(),
        rustix::io::Errno::INVAL | rustix::io::Errno::NOENT => thread_refused(),
        other => EngineError::Internal(format!("pidfd_open({host_pid}): {other}")),
    })?;
    let caller_pid = match ns {
        Namespace::Broker => host_pid,
        Namespace::Child(ns) => sys::pidns_translate(ns, PidnsTranslation::TgidInNs, host_pid)
            .map_err(|_| EngineError::NotFound("a member is not in the caller's pid namespace".into()))?,
    };
    identify(pidfd, host_pid, caller_pid, None, features, false, for_kill)
}

/// Reads who the process behind `pidfd` (pid `pid` in the broker's
/// namespace, `caller_pid` in the caller's) is, re-validated against the
/// pidfd; with its memory, and its user namespace (`for_kill`), for a kill.
fn identify(
    pidfd: OwnedFd,
    pid: i32,
    caller_pid: i32,
    expected_start: Option<u64>,
    features: &KernelFeatures,
    with_memory: bool,
    for_kill: bool,
) -> Result<TargetProcess, EngineError> {
    let not_running = || EngineError::NotFound(format!("process {caller_pid} has exited"));
    // A read that fails is "exited" only if the pidfd says so; otherwise the
    // kernel answered something unexpected, which is reported as such.
    let read_failed = |what: &str, err: std::io::Error, pidfd: BorrowedFd<'_>| {
        if is_running(pidfd) {
            EngineError::Internal(format!("reading {what} of pid {caller_pid}: {err}"))
        } else {
            not_running()
        }
    };
    // No liveness check before the reads: the one after them is what makes
    // them trustworthy (a process gone before them fails it too).
    let stat = procfs::read_stat(pid).map_err(|e| read_failed("/proc/PID/stat", e, pidfd.as_fd()))?;
    // status is needed for the credentials only where PIDFD_GET_INFO cannot
    // give them, and for a kill's memory figure.
    let status = if with_memory || !features.pidfd_get_info {
        Some(procfs::read_status(pid).map_err(|e| read_failed("/proc/PID/status", e, pidfd.as_fd()))?)
    } else {
        None
    };
    let oom_score_adj =
        procfs::read_oom_score_adj(pid).map_err(|e| read_failed("/proc/PID/oom_score_adj", e, pidfd.as_fd()))?;
    let cgroup = procfs::read_cgroup_bytes(pid).ok().and_then(CgroupFacts::of);
    // Unreadable counts as namespaced: the smaller reap budget.
    let namespaced = for_kill.then(|| !procfs::in_own_user_namespace(pid).unwrap_or(false));

    // Credentials: from the pidfd itself where the kernel can say (6.13+);
    // otherwise from /proc, trusted through the re-validation below. Both
    // are the thread-group leader's, the task kill(2) checks.
    let (ruid, euid, suid, gid) = if let (false, Some(status)) = (features.pidfd_get_info, &status) {
        (status.uids[0], status.uids[1], status.uids[2], status.gids[0])
    } else {
        let info =
            sys::pidfd_get_info(pidfd.as_fd(), sys::PIDFD_INFO_CREDS | sys::PIDFD_INFO_PID).map_err(|err| match err
                .raw_os_error()
            {
                Some(libc::ESRCH) => not_running(),
                _ => EngineError::Internal(format!("PIDFD_GET_INFO on pid {caller_pid}: {err}")),
            })?;
        if info.pid != info.tgid {
            return Err(thread_refused());
        }
        (info.ruid, info.euid, info.suid, info.rgid)
    };

    // Re-validation: still running, so every read above was of this process.
    if !is_running(pidfd.as_fd()) {
        return Err(not_running());
    }

    if let Some(expected) = expected_start {
        if expected != stat.start_time {
            return Err(EngineError::ProcessChanged(format!(
                "pid {caller_pid} now names a process started at {}, not {expected}",
                stat.start_time
            )));
        }
    }

    let is_kernel_thread = stat.is_kernel_thread();
    Ok(TargetProcess {
        pidfd,
        pid,
        caller_pid,
        ruid,
        euid,
        suid,
        gid,
        comm: stat.comm,
        start_time: stat.start_time,
        cgroup,
        is_kernel_thread,
        oom_score_adj,
        memory: status.filter(|s| with_memory && s.has_mm).map(|s| s.memory),
        namespaced,
    })
}

fn thread_refused() -> EngineError {
    EngineError::invalid(
        TARGET,
        "the target is a thread, not a process: name the process (its tgid, or a pidfd opened without PIDFD_THREAD); \
         a kill reaches the whole process, so the broker decides on the whole process",
    )
}

/// A pidfd for the process `pid` names in `ns`, and its pid in ours.
fn open_in(pid: i32, ns: Namespace<'_>) -> Result<(OwnedFd, i32), EngineError> {
    let not_found = || EngineError::NotFound(format!("no process with pid {pid}"));
    let host_pid = match ns {
        Namespace::Broker => pid,
        Namespace::Child(ns) => {
            let tgid = sys::pidns_translate(ns, PidnsTranslation::TgidFromNs, pid).map_err(|_| not_found())?;
            let task = sys::pidns_translate(ns, PidnsTranslation::PidFromNs, pid).map_err(|_| not_found())?;
            if task != tgid {
                return Err(thread_refused());
            }
            tgid
        }
    };
    let raw = Pid::from_raw(host_pid).ok_or_else(not_found)?;
    let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|err| match err {
        rustix::io::Errno::SRCH => not_found(),
        rustix::io::Errno::INVAL | rustix::io::Errno::NOENT => thread_refused(),
        other => EngineError::Internal(format!("pidfd_open({pid}): {other}")),
    })?;
    if let Namespace::Child(ns) = ns {
        // The translation and the open were two steps: the pid may have been
        // recycled between them. The pidfd's process holds `host_pid` (it is
        // re-validated as running after every read), so it is the caller's
        // `pid` iff that translates back.
        match sys::pidns_translate(ns, PidnsTranslation::TgidInNs, host_pid) {
            Ok(back) if back == pid => {}
            _ => return Err(not_found()),
        }
    }
    Ok((pidfd, host_pid))
}

/// The pid behind a pidfd a client passed. Anything that is not a pidfd of
/// a whole process is refused: the client named no process.
fn pid_of_pidfd(fd: BorrowedFd<'_>, features: &KernelFeatures) -> Result<i32, EngineError> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let not_a_pidfd = || EngineError::invalid("pidfd", "the passed file descriptor is not a pidfd");
    // fdinfo of a pidfd has a "Pid:" line (5.3+): -1 once the process has
    // exited, 0 when it is outside our pid namespace.
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).map_err(|_| not_a_pidfd())?;
    let link = std::fs::read_link(format!("/proc/self/fd/{raw}")).map_err(|_| not_a_pidfd())?;
    if !link.to_string_lossy().contains("pidfd") {
        return Err(not_a_pidfd());
    }
    // PIDFD_THREAD is O_EXCL in the file's flags (include/uapi/linux/pidfd.h).
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|_| not_a_pidfd())?;
    if flags.contains(rustix::fs::OFlags::EXCL) {
        return Err(thread_refused());
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
        0 => Err(EngineError::NotFound(
            "the process behind the passed pidfd is outside the broker's pid namespace".into(),
        )),
        pid if features.pidfd_get_info => {
            // Cross-check with the kernel's own answer where it has one.
            match sys::pidfd_get_info(fd, sys::PIDFD_INFO_PID) {
                Ok(info) if info.pid != info.tgid => Err(thread_refused()),
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
