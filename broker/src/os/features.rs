// SPDX-License-Identifier: MIT OR Apache-2.0
//! Kernel features, probed once at start.
//!
//! Every probe asks the kernel directly (never the version number), so a
//! seccomp filter or a backport answers for itself. What is missing is
//! logged, reported in `GetCapabilities`, and handled by a documented
//! degradation elsewhere.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use rustix::process::{getpid, pidfd_open, PidfdFlags};
use serde::Serialize;

use crate::os::procfs;
use crate::os::sys;

pub use reapd_proto::model::KillPath;

#[derive(Debug, Clone, Serialize)]
pub struct KernelFeatures {
    pub kernel_release: String,
    pub process_mrelease: bool,
    pub reap_kill_flag: bool,
    pub pidfd_get_info: bool,
    pub so_peerpidfd: bool,
    pub cgroup_kill: bool,
    /// CAP_KILL in the effective set. Without it the kernel lets the broker
    /// kill only its own uid's processes (degraded mode).
    pub has_cap_kill: bool,
    /// One line per degradation found.
    pub notes: Vec<String>,
}

impl KernelFeatures {
    pub fn probe() -> Self {
        let mut notes = Vec::new();
        let kernel_release = rustix::system::uname().release().to_string_lossy().into_owned();

        let plain = sys::probe_process_mrelease(0).raw_os_error();
        let process_mrelease = plain == Some(libc::EBADF);
        if !process_mrelease {
            notes.push(format!(
                "process_mrelease unavailable ({}): kills are not followed by a reap",
                errno_name(plain)
            ));
        }
        let flagged = sys::probe_process_mrelease(sys::PROCESS_MRELEASE_REAP_KILL).raw_os_error();
        let reap_kill_flag = process_mrelease && flagged == Some(libc::EBADF);
        if process_mrelease && !reap_kill_flag {
            notes.push(format!(
                "PROCESS_MRELEASE_REAP_KILL unsupported ({}): kill then reap in two calls",
                errno_name(flagged)
            ));
        }

        let pidfd_get_info = match pidfd_open(getpid(), PidfdFlags::empty()) {
            Ok(fd) => match sys::pidfd_get_info(fd.as_fd(), sys::PIDFD_INFO_CREDS) {
                Ok(_) => true,
                Err(err) => {
                    notes.push(format!(
                        "PIDFD_GET_INFO unavailable ({}): credentials read from /proc and re-validated against the pidfd",
                        errno_name(err.raw_os_error())
                    ));
                    false
                }
            },
            Err(err) => {
                notes.push(format!("pidfd_open failed ({err}): the broker cannot pin targets"));
                false
            }
        };

        let so_peerpidfd = match UnixStream::pair() {
            Ok((left, _right)) => match sys::peer_pidfd(left.as_fd()) {
                Ok(_) => true,
                Err(err) => {
                    notes.push(format!(
                        "SO_PEERPIDFD unavailable ({}): callers identified by SO_PEERCRED alone; their real uid is not used",
                        errno_name(err.raw_os_error())
                    ));
                    false
                }
            },
            Err(_) => false,
        };

        let cgroup_kill = match probe_cgroup_kill() {
            Some(seen) => seen,
            // No non-root cgroup to look at: cgroup.kill (5.14) predates
            // process_mrelease (5.15), so a kernel with the latter has it.
            None => {
                let inferred = process_mrelease && procfs::cgroup2_mount().is_some();
                notes.push(format!(
                    "cgroup.kill not seen in any cgroup; inferred {}",
                    if inferred { "present" } else { "absent" }
                ));
                inferred
            }
        };
        let has_cap_kill = sys::has_effective_capability(sys::CAP_KILL);
        if !has_cap_kill {
            notes.push("no CAP_KILL: degraded mode, only processes of the broker's own uid can be killed".into());
        }

        KernelFeatures {
            kernel_release,
            process_mrelease,
            reap_kill_flag,
            pidfd_get_info,
            so_peerpidfd,
            cgroup_kill,
            has_cap_kill,
            notes,
        }
    }

    pub fn kill_path(&self) -> KillPath {
        if self.reap_kill_flag {
            KillPath::ReapKill
        } else if self.process_mrelease {
            KillPath::KillThenMrelease
        } else {
            KillPath::KillOnly
        }
    }
}

/// cgroup.kill (5.14) exists in every non-root cgroup of a cgroup2
/// hierarchy. `None`: no cgroup2 mount or no non-root cgroup to look at.
fn probe_cgroup_kill() -> Option<bool> {
    let mount = procfs::cgroup2_mount()?;
    let own = procfs::read_cgroup(std::process::id() as i32).unwrap_or_default();
    let own_dir = mount.join(own.trim_start_matches('/'));
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if own_dir != mount {
        candidates.push(own_dir);
    }
    candidates.extend(
        std::fs::read_dir(&mount)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.is_dir()),
    );
    if candidates.is_empty() {
        return None;
    }
    Some(candidates.iter().any(|dir| dir.join("cgroup.kill").exists()))
}

pub fn errno_name(errno: Option<i32>) -> String {
    let name = match errno {
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EBADF) => "EBADF",
        Some(libc::ENOTTY) => "ENOTTY",
        Some(libc::ENOPROTOOPT) => "ENOPROTOOPT",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EAGAIN) => "EAGAIN",
        Some(libc::ESRCH) => "ESRCH",
        Some(libc::EINTR) => "EINTR",
        Some(other) => return format!("errno {other}"),
        None => "no errno",
    };
    name.to_string()
}
