//! Who is asking: taken from the kernel when a connection is accepted.
//!
//! SO_PEERCRED gives the pid, effective uid and gid at connect time,
//! SO_PEERGROUPS the supplementary groups, SO_PEERPIDFD a pidfd that pins the
//! caller so its pid cannot be recycled under us. The caller's real uid (which
//! kill(2) also honours) is read through that pidfd. Nothing a request says
//! about its sender is believed.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::sockopt::socket_peercred;
use serde::Serialize;

use crate::features::KernelFeatures;
use crate::{procfs, sys};

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
    /// The caller's command name, for audit only.
    pub comm: String,
    /// The caller's cgroup v2 path, when read reliably (re-validated against
    /// the peer pidfd). Policy rules on the caller's cgroup never match
    /// `None`.
    pub cgroup: Option<String>,
    #[serde(skip)]
    pub pidfd: Option<OwnedFd>,
}

impl Caller {
    /// Reads the peer's identity off a connected Unix socket.
    pub fn from_socket(socket: BorrowedFd<'_>, features: &KernelFeatures) -> std::io::Result<Caller> {
        let cred = socket_peercred(socket)?;
        let pid = cred.pid.as_raw_nonzero().get();
        let uid = cred.uid.as_raw();
        let gid = cred.gid.as_raw();
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
            pidfd,
        };
        caller.read_process_details(features);
        Ok(caller)
    }

    /// Fills the real uid, comm and cgroup. Reads by pid are trusted only if
    /// the peer pidfd shows the same process is still alive afterwards.
    fn read_process_details(&mut self, features: &KernelFeatures) {
        let comm = procfs::read_stat(self.pid).map(|s| s.comm).unwrap_or_default();
        let cgroup = procfs::read_cgroup(self.pid).ok();
        let Some(pidfd) = self.pidfd.as_ref() else {
            // No pidfd: the pid may have been recycled; keep the comm for the
            // audit record (marked unverified) and believe nothing else.
            self.comm = format!("{comm}?");
            return;
        };
        let live = if features.pidfd_get_info {
            sys::pidfd_get_info(pidfd.as_fd(), sys::PIDFD_INFO_CREDS)
                .ok()
                .map(|info| (info.ruid, info.euid))
        } else {
            // Only PIDFD_GET_INFO reads through the pidfd; a /proc read counts
            // (like the comm and cgroup above) if the caller still runs after it.
            procfs::read_status(self.pid)
                .ok()
                .filter(|_| crate::target::is_running(pidfd.as_fd()))
                .map(|s| (s.uids[0], s.uids[1]))
        };
        let Some((ruid, euid)) = live else {
            self.comm = format!("{comm}?");
            return;
        };
        self.comm = comm;
        self.cgroup = cgroup;
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
