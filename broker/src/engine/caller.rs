// SPDX-License-Identifier: MIT OR Apache-2.0
//! Who is asking: taken from the kernel when a connection is accepted.
//!
//! SO_PEERCRED gives the pid, effective uid and gid at connect time,
//! SO_PEERGROUPS the supplementary groups, SO_PEERPIDFD a pidfd that pins the
//! caller so its pid cannot be recycled under us. The caller's real uid (which
//! kill(2) also honours), its pid namespace and its cgroup are read by pid and
//! believed only if that pidfd shows the same process still alive afterwards.
//! Nothing a request says about its sender is believed.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use serde::Serialize;

use crate::os::cgroup::CgroupFacts;
use crate::os::features::KernelFeatures;
use crate::os::{procfs, sys};

/// Where the caller's pid numbers live, relative to the broker's.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CallerPidns {
    /// The caller lives in the broker's pid namespace: its pids are ours.
    Broker,
    /// The caller lives in a pid namespace below the broker's, `level`
    /// steps down (`NSpid` of `/proc/PID/status`).
    Child {
        level: usize,
        /// The caller's pid namespace, when the broker could open it
        /// (`PIDFD_GET_PID_NAMESPACE`; the kernel requires ptrace read
        /// access to the caller, which CAP_KILL alone gives only for the
        /// broker's own uid), or the caller proved it by passing it
        /// (varlink). Without it, the caller's pid numbers cannot be
        /// translated and the broker refuses to guess.
        #[serde(skip)]
        ns: Option<OwnedFd>,
    },
    /// The broker could not learn it (the caller exited at once, no
    /// `NSpid`, or the broker's `/proc` is not its own namespace's): pid
    /// numbers from this caller are refused.
    Unknown,
}

#[derive(Debug, Serialize)]
pub struct Caller {
    /// The connecting process (SO_PEERCRED), as seen in the broker's pid
    /// namespace.
    pub pid: i32,
    /// Effective uid at connect time (SO_PEERCRED).
    pub uid: u32,
    /// Effective gid at connect time (SO_PEERCRED).
    pub gid: u32,
    /// Real uid, when it could be read reliably (through the peer's pidfd,
    /// and only while its effective uid still matches SO_PEERCRED's).
    /// `None` means "not known": only `uid` is used.
    pub real_uid: Option<u32>,
    /// Supplementary groups (SO_PEERGROUPS); empty if unavailable.
    pub groups: Vec<u32>,
    /// The caller's command name (escaped), for audit only.
    pub comm: String,
    /// The caller's cgroup, when read reliably (re-validated against the
    /// peer pidfd). `None` means unverified: allow rules on the caller's
    /// cgroup never match it, deny rules always do.
    pub cgroup: Option<CgroupFacts>,
    /// The caller's pid namespace, for naming targets by pid.
    pub pidns: CallerPidns,
    /// The caller holds effective capabilities while not root (`CapEff`),
    /// i.e. it is root of a user namespace. kill(2) would honour CAP_KILL
    /// there for processes of that namespace; the broker does not (see
    /// `docs/policy.md`), and says so when it refuses.
    pub userns_capabilities: bool,
    /// The caller is uid 0 *and* holds CAP_KILL (bit 5 of `CapEff`): what
    /// kill(2) needs to signal other users' processes. A uid 0 process
    /// without it (a service with `CapabilityBoundingSet=~CAP_KILL`, a
    /// container root with the capability dropped) may kill(2) only uid 0's
    /// processes. `false` when it could not be read: no root authority.
    pub cap_kill: bool,
    #[serde(skip)]
    pub pidfd: Option<OwnedFd>,
}

/// `CAP_KILL` in a `CapEff` mask (`include/uapi/linux/capability.h`).
const CAP_KILL_BIT: u64 = 1 << 5;

/// Why a peer is not served at all.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    #[error("SO_PEERCRED: {0}")]
    PeerCred(#[from] std::io::Error),
    #[error("the peer lives outside the broker's pid namespace (SO_PEERCRED gives pid 0)")]
    OutsidePidns,
}

/// The number of `NSpid` entries of the broker itself: 1 when its `/proc`
/// belongs to its own pid namespace, as the rules below assume; 0 on a
/// kernel built without pid namespaces (no `NSpid` line: one namespace
/// only); `None` if the broker cannot read its own status.
fn own_ns_depth() -> Option<usize> {
    static DEPTH: OnceLock<Option<usize>> = OnceLock::new();
    *DEPTH.get_or_init(|| {
        procfs::read_status(std::process::id() as i32)
            .ok()
            .map(|s| s.ns_pids.len())
    })
}

impl Caller {
    /// Reads the peer's identity off a connected Unix socket.
    pub fn from_socket(socket: BorrowedFd<'_>, features: &KernelFeatures) -> Result<Caller, IdentifyError> {
        let (pid, uid, gid) = sys::peer_cred(socket)?;
        if pid <= 0 {
            return Err(IdentifyError::OutsidePidns);
        }
        let groups = sys::peer_groups(socket).unwrap_or_default();
        let pidfd = if features.so_peerpidfd {
            sys::peer_pidfd(socket).ok()
        } else {
            None
        };

        let mut caller = Caller {
            pid,
            uid,
            gid,
            real_uid: None,
            groups,
            comm: String::new(),
            cgroup: None,
            pidns: CallerPidns::Unknown,
            userns_capabilities: false,
            cap_kill: false,
            pidfd,
        };
        caller.read_process_details(features);
        Ok(caller)
    }

    /// Fills the real uid, comm, cgroup and pid namespace. Reads by pid are
    /// trusted only if the peer pidfd shows the same process is still alive
    /// afterwards.
    fn read_process_details(&mut self, features: &KernelFeatures) {
        let comm = procfs::read_stat(self.pid).map(|s| s.comm).unwrap_or_default();
        let cgroup = procfs::read_cgroup_bytes(self.pid).ok();
        let status = procfs::read_status(self.pid).ok();
        let Some(pidfd) = self.pidfd.as_ref() else {
            // No SO_PEERPIDFD (before 6.5): the pid may have been recycled;
            // keep the comm for the audit record (marked unverified) and
            // believe nothing else, except where pids live: without that no
            // pid could be named at all. A pidfd opened now pins whatever
            // holds the pid; the one gap (the caller exited and its pid was
            // reused between connect and this read) is documented in
            // docs/policy.md and threats.md.
            self.comm = format!("{comm}?");
            if let (Some(status), Ok(pidfd)) = (
                status.as_ref(),
                rustix::process::pidfd_open(
                    rustix::process::Pid::from_raw(self.pid).expect("pid > 0 checked at accept"),
                    rustix::process::PidfdFlags::empty(),
                ),
            ) {
                let pidns = pidns_of(status, pidfd.as_fd());
                if crate::engine::target::is_running(pidfd.as_fd()) {
                    self.pidns = pidns;
                    self.cap_kill = self.uid == 0 && status.cap_eff & CAP_KILL_BIT != 0;
                }
            }
            return;
        };
        let live = if features.pidfd_get_info {
            sys::pidfd_get_info(pidfd.as_fd(), sys::PIDFD_INFO_CREDS)
                .ok()
                .map(|info| (info.ruid, info.euid))
        } else {
            status.as_ref().map(|s| (s.uids[0], s.uids[1]))
        };
        // Everything read by pid above counts only if the caller still runs.
        let Some((ruid, euid)) = live.filter(|_| crate::engine::target::is_running(pidfd.as_fd())) else {
            self.comm = format!("{comm}?");
            return;
        };
        self.comm = comm;
        self.cgroup = cgroup.and_then(CgroupFacts::of);
        if let Some(status) = &status {
            self.pidns = pidns_of(status, pidfd.as_fd());
            self.userns_capabilities = status.cap_eff != 0 && self.uid != 0;
            self.cap_kill = self.uid == 0 && status.cap_eff & CAP_KILL_BIT != 0;
        }
        // A caller that changed its euid since connecting keeps the authority
        // of the socket it opened, but gains nothing from its new real uid.
        if euid == self.uid {
            self.real_uid = Some(ruid);
        }
    }

    /// The uids kill(2) would compare for this caller: effective and real.
    pub fn kill_uids(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.uid).chain(self.real_uid)
    }

    /// Primary and supplementary groups.
    pub fn all_groups(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.gid).chain(self.groups.iter().copied())
    }
}

/// Where the caller's pids live, from its `NSpid` line (world-readable and
/// re-validated by the caller's pidfd) and, for a child namespace, an fd for
/// it if the kernel lets the broker open one.
fn pidns_of(status: &procfs::Status, pidfd: BorrowedFd<'_>) -> CallerPidns {
    match own_ns_depth() {
        // A kernel without CONFIG_PID_NS prints no NSpid: there is only one
        // pid namespace, the broker's.
        Some(0) => return CallerPidns::Broker,
        Some(1) => {}
        _ => return CallerPidns::Unknown,
    }
    if status.ns_pids.is_empty() {
        // Ours has NSpid and the caller's has none: nothing to go on.
        return CallerPidns::Unknown;
    }
    let level = status.ns_pids.len() - 1;
    if level == 0 {
        return CallerPidns::Broker;
    }
    let ns = sys::pidfd_pid_namespace(pidfd)
        .ok()
        .filter(|ns| crate::engine::target::pidns_level(ns.as_fd()) == Some(level));
    CallerPidns::Child { level, ns }
}
