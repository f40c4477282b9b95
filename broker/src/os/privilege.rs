// SPDX-License-Identifier: MIT OR Apache-2.0
//! Least privilege outside systemd: the broker needs exactly one
//! capability, CAP_KILL, to signal other users' processes.
//!
//! Started by hand as root, it binds its sockets first (that needs root for
//! `/run/reapd`), then [`restrict`] drops every capability but CAP_KILL from
//! all sets (the bounding set included, so nothing can regain them) and
//! optionally switches to an unprivileged user, keeping CAP_KILL across
//! the switch with `PR_SET_KEEPCAPS`. Under systemd the unit already does
//! this (`User=reapd`, `AmbientCapabilities=CAP_KILL`,
//! `CapabilityBoundingSet=CAP_KILL`); [`restrict`] then changes nothing.
//!
//! Capabilities and credentials are per thread in the kernel, so all of
//! this must run before any other thread exists; [`restrict`] checks that.

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("privileges must be dropped while the process has one thread; it has {0}")]
    Threaded(usize),
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error("--user {name}: looking it up failed: {err}")]
    Lookup { name: String, err: String },
    #[error("--user needs the broker to start as root (it runs as uid {0})")]
    NotRoot(u32),
    #[error("{step}: {err}")]
    Syscall { step: &'static str, err: String },
}

/// What [`restrict`] left the process with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    pub uid: u32,
    pub gid: u32,
    /// CAP_KILL is effective: the broker may kill any uid's processes.
    /// Without it the broker runs degraded: the kernel lets it kill only
    /// processes of its own uid.
    pub cap_kill: bool,
    /// Names of the capabilities dropped from the permitted set.
    pub dropped: Vec<String>,
}

fn syscall<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> PrivilegeError {
    move |err| PrivilegeError::Syscall {
        step,
        err: err.to_string(),
    }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|dir| dir.count()).unwrap_or(1)
}

/// Drops every capability but CAP_KILL and, with `user`, switches to that
/// user (uid, primary gid, no supplementary groups) keeping CAP_KILL.
pub fn restrict(user: Option<&str>) -> Result<Privileges, PrivilegeError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(PrivilegeError::Threaded(threads));
    }
    let permitted = caps::read(None, CapSet::Permitted).map_err(syscall("reading the permitted set"))?;
    let keep: CapsHashSet = permitted
        .iter()
        .copied()
        .filter(|c| *c == Capability::CAP_KILL)
        .collect();

    // The bounding set first, while CAP_SETPCAP is still ours.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        let bounding = caps::read(None, CapSet::Bounding).map_err(syscall("reading the bounding set"))?;
        for cap in bounding.iter().filter(|c| **c != Capability::CAP_KILL) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(syscall("dropping from the bounding set"))?;
        }
    }

    let target = match user {
        Some(name) => Some(switch_user(name)?),
        None => None,
    };

    // The ambient set only matters across exec, which the broker never does.
    if !caps::read(None, CapSet::Ambient)
        .map_err(syscall("reading the ambient set"))?
        .is_empty()
    {
        caps::clear(None, CapSet::Ambient).map_err(syscall("clearing the ambient set"))?;
    }
    // capset(2) only when something changes: under the unit the sets are
    // already {CAP_KILL}, and its SystemCallFilter= does not allow capset.
    // The effective and inheritable sets shrink before the permitted set:
    // the kernel requires them to be subsets of it.
    let effective = caps::read(None, CapSet::Effective).map_err(syscall("reading the effective set"))?;
    let inheritable = caps::read(None, CapSet::Inheritable).map_err(syscall("reading the inheritable set"))?;
    let now_permitted = caps::read(None, CapSet::Permitted).map_err(syscall("reading the permitted set"))?;
    if effective != keep {
        caps::set(None, CapSet::Effective, &keep).map_err(syscall("setting the effective set"))?;
    }
    if !inheritable.is_subset(&keep) {
        caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(syscall("clearing the inheritable set"))?;
    }
    if now_permitted != keep {
        caps::set(None, CapSet::Permitted, &keep).map_err(syscall("setting the permitted set"))?;
    }

    let mut dropped: Vec<String> = permitted.difference(&keep).map(|c| c.to_string()).collect();
    dropped.sort();
    let cap_kill =
        caps::has_cap(None, CapSet::Effective, Capability::CAP_KILL).map_err(syscall("reading the effective set"))?;
    let (uid, gid) = target.unwrap_or_else(|| (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw()));
    Ok(Privileges {
        uid,
        gid,
        cap_kill,
        dropped,
    })
}

/// Switches every uid and gid to `name`'s, with no supplementary groups,
/// keeping the permitted capabilities across the switch (PR_SET_KEEPCAPS;
/// the effective set is cleared by the kernel and restored by the caller).
fn switch_user(name: &str) -> Result<(u32, u32), PrivilegeError> {
    let euid = rustix::process::geteuid().as_raw();
    if euid != 0 {
        return Err(PrivilegeError::NotRoot(euid));
    }
    let user = nix::unistd::User::from_name(name)
        .map_err(|err| PrivilegeError::Lookup {
            name: name.to_string(),
            err: err.to_string(),
        })?
        .ok_or_else(|| PrivilegeError::NoSuchUser(name.to_string()))?;
    let (uid, gid) = (user.uid, user.gid);
    rustix::thread::set_keep_capabilities(true).map_err(syscall("PR_SET_KEEPCAPS"))?;
    nix::unistd::setgroups(&[]).map_err(syscall("setgroups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(syscall("setresgid"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(syscall("setresuid"))?;
    rustix::thread::set_keep_capabilities(false).map_err(syscall("clearing PR_SET_KEEPCAPS"))?;
    Ok((uid.as_raw(), gid.as_raw()))
}

/// How [`lock_memory`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLock {
    Locked,
    /// RLIMIT_MEMLOCK is finite and there is no CAP_IPC_LOCK: locking
    /// would make later allocations fail once the limit is reached.
    SkippedLimit,
    Failed(rustix::io::Errno),
}

/// `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: the broker runs when
/// memory is short, so its pages must not be swapped or dropped. ONFAULT
/// locks pages only as they are touched, so the cost is the RSS the broker
/// has anyway, not every reserved thread stack and malloc arena.
/// Done only with an unlimited RLIMIT_MEMLOCK (the unit sets
/// `LimitMEMLOCK=infinity`; root raises it itself before dropping
/// capabilities), since mappings past the limit would fail.
pub fn lock_memory() -> MemoryLock {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let mut limit = getrlimit(Resource::Memlock);
    if limit.current.is_some() && rustix::process::geteuid().is_root() {
        // Root (CAP_SYS_RESOURCE) may raise it; failure just means we skip.
        let unlimited = Rlimit {
            current: None,
            maximum: None,
        };
        if setrlimit(Resource::Memlock, unlimited).is_ok() {
            limit = getrlimit(Resource::Memlock);
        }
    }
    if limit.current.is_some() {
        return MemoryLock::SkippedLimit;
    }
    use rustix::mm::{mlockall, MlockAllFlags};
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => MemoryLock::Locked,
        Err(err) => MemoryLock::Failed(err),
    }
}

/// Raises the soft open-file limit to the hard one (no privilege needed) and
/// returns the soft limit now in force. Every connection holds two
/// descriptors (the socket and the caller's pidfd), so the default soft
/// limit of 1024 would cap the broker far below its connection limit.
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(err) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %err, "cannot raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Connections the broker can hold with `open_files` descriptors: two each,
/// less a reserve for listeners, pidfds of targets in flight and logs.
pub fn connections_within(open_files: u64) -> usize {
    const RESERVED: u64 = 128;
    (open_files.saturating_sub(RESERVED) / 2).min(usize::MAX as u64) as usize
}
