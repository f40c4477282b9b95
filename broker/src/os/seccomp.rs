// SPDX-License-Identifier: MIT OR Apache-2.0
//! The broker's own seccomp allow-list, applied once start-up is done
//! (sockets bound, privileges dropped, logging set up), as Firecracker
//! does: defence in depth for the process that holds CAP_KILL.
//!
//! `ALLOWED_TABLE` is what the broker needs while serving. The unit's
//! `SystemCallFilter=` (which systemd applies before exec, so it must also
//! cover exec and start-up) is exactly `ALLOWED_TABLE` plus [`STARTUP`]; a test
//! checks that the two agree. `process_mrelease` is in no systemd syscall
//! group, so both name it explicitly (earlyoom died of SIGSYS without it).
//!
//! Anything else fails with EPERM rather than killing the broker: the
//! broker turns errors into precise replies, and a daemon that frees memory
//! under pressure should degrade, not vanish. The unit matches that with
//! `SystemCallErrorNumber=EPERM`.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unsupported architecture {0}")]
    Arch(String),
    #[error("building the filter: {0}")]
    Build(String),
    #[error("installing the filter: {0}")]
    Install(String),
}

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name as i64)),*]
    };
}

/// Calls the serving broker makes (tokio, tonic, glibc, tracing, journald,
/// sd_notify, the engine's pidfd/procfs/kill/reap work), from strace of the
/// end-to-end tests. Names are the kernel's, the `SYS_` prefix dropped.
const ALLOWED_TABLE: &[(&str, i64)] = syscalls![
    SYS_accept4,
    SYS_brk,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_clone,
    SYS_clone3,
    SYS_close,
    SYS_connect,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_eventfd2,
    SYS_exit,
    SYS_exit_group,
    SYS_fcntl,
    SYS_fstat,
    SYS_futex,
    SYS_getcwd,
    SYS_getdents64,
    SYS_getpid,
    SYS_getrandom,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_ioctl,
    SYS_lseek,
    SYS_madvise,
    SYS_memfd_create,
    SYS_mmap,
    SYS_mprotect,
    SYS_mremap,
    SYS_munmap,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_openat,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe2,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_process_mrelease,
    SYS_read,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sched_getaffinity,
    SYS_sched_yield,
    SYS_sendmsg,
    SYS_sendto,
    SYS_set_robust_list,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_socket,
    SYS_socketpair,
    SYS_statx,
    SYS_uname,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

/// Calls that exist on x86_64 only (aarch64 has just the *at / p* forms,
/// which [`ALLOWED_TABLE`] already has); the unit names them too: systemd
/// skips names the architecture lacks.
#[cfg(target_arch = "x86_64")]
const ARCH_TABLE: &[(&str, i64)] = syscalls![SYS_epoll_wait, SYS_poll, SYS_readlink];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_TABLE: &[(&str, i64)] = &[];

/// Calls needed only between exec and [`apply`] under systemd: the dynamic
/// loader, reading capabilities, locking memory, installing this filter
/// (and binding, should the unit be started without its sockets). The unit
/// allows them (systemd filters from exec on); the broker's own filter does
/// not. Dropping privileges by hand (capset, setresuid, setrlimit: the
/// `@privileged`/`@resources` groups) happens before any filter exists and
/// is a no-op under the unit, so neither list has them.
pub const STARTUP: &[&str] = &[
    "access",
    "arch_prctl",
    "bind",
    "capget",
    "chmod",
    "execve",
    "fchmod",
    "fchmodat",
    "getrlimit",
    "listen",
    "mkdir",
    "mkdirat",
    "mlockall",
    "prlimit64",
    "seccomp",
    "set_tid_address",
    // SO_PASSRIGHTS off on the gRPC listener (main, before the filter).
    "setsockopt",
    "unlink",
    "unlinkat",
];

/// Names of the calls the serving broker may make.
pub fn allowed() -> impl Iterator<Item = &'static str> {
    ALLOWED_TABLE
        .iter()
        .chain(ARCH_TABLE)
        .map(|(name, _)| name.strip_prefix("SYS_").unwrap_or(name))
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH.to_string()))
}

/// The compiled filter: [`allowed`] calls pass, anything else is EPERM.
pub fn program() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = ALLOWED_TABLE
        .iter()
        .chain(ARCH_TABLE)
        .map(|(_, nr)| (*nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        target_arch()?,
    )
    .map_err(|err| SeccompError::Build(err.to_string()))?;
    filter
        .try_into()
        .map_err(|err: seccompiler::BackendError| SeccompError::Build(err.to_string()))
}

/// Installs the filter on every thread of the process (TSYNC), setting
/// `no_new_privs` first as the kernel requires.
pub fn apply() -> Result<(), SeccompError> {
    let program = program()?;
    seccompiler::apply_filter_all_threads(&program).map_err(|err| SeccompError::Install(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_process_mrelease_and_no_duplicates() {
        let names: Vec<_> = allowed().collect();
        assert!(names.contains(&"process_mrelease"));
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        let startup: std::collections::BTreeSet<_> = STARTUP.iter().collect();
        assert_eq!(startup.len(), STARTUP.len());
    }

    /// The unit's SystemCallFilter= names exactly ALLOWED + STARTUP: no
    /// call the broker makes is missing from the unit (SIGSYS/EPERM under
    /// systemd), and the unit allows nothing the broker does not need.
    #[test]
    fn unit_filter_agrees_with_the_broker_filter() {
        let unit_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/reapd.service");
        let unit = std::fs::read_to_string(unit_path).expect("systemd/reapd.service");
        let mut in_unit = std::collections::BTreeSet::new();
        for line in unit.lines() {
            if let Some(value) = line.trim().strip_prefix("SystemCallFilter=") {
                assert!(!value.starts_with('~'), "the unit's filter must be an allow-list");
                for name in value.split_whitespace() {
                    assert!(!name.starts_with('@'), "name calls, not groups: {name}");
                    assert!(in_unit.insert(name.to_string()), "{name} listed twice");
                }
            }
        }
        let mut expected: std::collections::BTreeSet<String> = allowed().map(String::from).collect();
        for name in STARTUP {
            assert!(
                expected.insert(name.to_string()),
                "{name} is in both ALLOWED and STARTUP"
            );
        }
        let missing: Vec<_> = expected.difference(&in_unit).collect();
        let extra: Vec<_> = in_unit.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "SystemCallFilter= disagrees with seccomp.rs: missing from the unit {missing:?}, only in the unit {extra:?}"
        );
        assert!(in_unit.contains("process_mrelease"));
    }

    #[test]
    fn compiles_for_this_arch() {
        assert!(!program().expect("filter builds").is_empty());
    }
}
