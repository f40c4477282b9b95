// SPDX-License-Identifier: MIT OR Apache-2.0
//! Which part of a cgroup path the broker may believe.
//!
//! A cgroup's name is chosen by whoever may create directories in its
//! parent, and a process's membership in a subtree is decided by whoever may
//! write the `cgroup.procs` files above it. systemd hands both to
//! unprivileged users wherever it delegates (`Delegate=yes`: every
//! `user@UID.service`, container runtimes): it chowns the delegated
//! cgroup's directory and its `cgroup.procs` to the user, who may then
//! create `earlyoom.service` or `sshd.service` below it and move its own
//! processes in.
//!
//! So the broker trusts a path only down to the first cgroup that is not
//! root's alone: the *trusted prefix* keeps a component only while its
//! parent directory and the parent's `cgroup.procs` are owned by uid 0 and
//! writable by nobody else. Every name in the prefix was chosen by root, and
//! only root (or the delegatee, from inside the delegated subtree) can have
//! put the process below it.
//!
//! Policy use (see `docs/policy.md`): grants and protections match the
//! trusted prefix only (a user gains nothing by naming its cgroups); deny
//! rules on the *caller* match the full path (the caller cannot leave the
//! part it does not own, and matching more only refuses more).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

/// A process's cgroup, as far as the broker could verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupFacts {
    /// The full path from `/proc/PID/cgroup`, in the broker's cgroup
    /// namespace (`/` is the root), invalid UTF-8 escaped as `\xNN`.
    pub path: String,
    /// The longest prefix of `path` whose names and membership only root
    /// could have chosen.
    pub trusted: String,
}

impl CgroupFacts {
    /// Reads the facts for `path` (the bytes `/proc/PID/cgroup` gives) from
    /// the cgroup2 mount. `None` when there is no cgroup2 hierarchy or the
    /// path is not absolute (nothing about it can be verified). A name that
    /// is not UTF-8 is no reason to doubt the rest: only a name below the
    /// trusted prefix can be one a user chose.
    pub fn of(path: Vec<u8>) -> Option<CgroupFacts> {
        let mount = mount()?;
        if !path.starts_with(b"/") {
            return None;
        }
        let trusted = trusted_prefix(mount, &path);
        Some(CgroupFacts {
            path: crate::os::procfs::escape_invalid_utf8(&path),
            trusted,
        })
    }

    /// The part of the path only root could have named: `path` itself when
    /// nothing on it is delegated.
    pub fn is_fully_trusted(&self) -> bool {
        self.trusted == self.path
    }
}

/// The cgroup2 mount, found once from `/proc/self/mountinfo`.
pub fn mount() -> Option<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT.get_or_init(crate::os::procfs::cgroup2_mount).as_deref()
}

/// Owned by uid 0 and writable by no one else.
fn root_only(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
}

/// The directory `dir` lets only root create children in it and move
/// processes into its subtree from outside.
pub fn root_only_cgroup(dir: &Path) -> bool {
    root_only(dir) && root_only(&dir.join("cgroup.procs"))
}

/// The longest prefix of `path` (absolute, in the hierarchy mounted at
/// `mount`, as bytes) in which every component's parent is
/// [`root_only_cgroup`]. A component that cannot be examined (gone,
/// unreadable) or is not UTF-8 (no policy can name it) ends the prefix.
pub fn trusted_prefix(mount: &Path, path: impl AsRef<[u8]>) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut trusted = String::from("/");
    let mut dir = mount.to_path_buf();
    for component in path.as_ref().split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        let Ok(component) = std::str::from_utf8(component) else {
            break;
        };
        if component == "." || component == ".." || !root_only_cgroup(&dir) {
            break;
        }
        dir.push(std::ffi::OsStr::from_bytes(component.as_bytes()));
        if trusted.len() > 1 {
            trusted.push('/');
        }
        trusted.push_str(component);
    }
    trusted
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn prefix_stops_below_the_first_directory_root_does_not_own_alone() {
        // A scratch tree standing in for a cgroup hierarchy: the rule reads
        // only owners and modes. Needs root to chown (the tests run as root).
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("SKIP: needs root to chown the scratch tree");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let base = root.path();
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mk = |rel: &str, uid: u32| {
            let dir = base.join(rel);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::write(dir.join("cgroup.procs"), "").unwrap();
            std::fs::set_permissions(dir.join("cgroup.procs"), std::fs::Permissions::from_mode(0o644)).unwrap();
            std::os::unix::fs::chown(&dir, Some(uid), None).unwrap();
            std::os::unix::fs::chown(dir.join("cgroup.procs"), Some(uid), None).unwrap();
        };
        std::fs::write(base.join("cgroup.procs"), "").unwrap();
        std::fs::set_permissions(base.join("cgroup.procs"), std::fs::Permissions::from_mode(0o644)).unwrap();
        mk("user.slice", 0);
        mk("user.slice/user-61000.slice", 0);
        mk("user.slice/user-61000.slice/user@61000.service", 61000);
        mk("user.slice/user-61000.slice/user@61000.service/earlyoom.service", 61000);
        mk("system.slice", 0);
        mk("system.slice/earlyoom.service", 0);
        assert_eq!(
            trusted_prefix(base, "/user.slice/user-61000.slice/user@61000.service/earlyoom.service"),
            "/user.slice/user-61000.slice/user@61000.service"
        );
        assert_eq!(
            trusted_prefix(base, "/system.slice/earlyoom.service"),
            "/system.slice/earlyoom.service"
        );
        // A world-writable directory delegates as much as a chown does.
        std::fs::set_permissions(base.join("system.slice"), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(trusted_prefix(base, "/system.slice/earlyoom.service"), "/system.slice");
        // Missing components end the prefix; dot-dot never climbs.
        assert_eq!(trusted_prefix(base, "/gone/x"), "/gone");
        assert_eq!(trusted_prefix(base, "/user.slice/../system.slice"), "/user.slice");
        // A name that is not UTF-8 ends the prefix (no policy can name it)
        // but casts no doubt on the part above it.
        assert_eq!(
            trusted_prefix(base, b"/user.slice/user-61000.slice/user@61000.service/x\xff/y"),
            "/user.slice/user-61000.slice/user@61000.service"
        );
        assert_eq!(trusted_prefix(base, b"/user.slice/\xff/y"), "/user.slice");
    }
}
