// SPDX-License-Identifier: MIT OR Apache-2.0
//! Thin wrappers for the few Linux calls that neither `rustix` nor `libc`
//! wrap: `process_mrelease(2)`, the `PIDFD_GET_INFO` ioctl, and the
//! `SO_PEERPIDFD` / `SO_PEERGROUPS` socket options.
//!
//! This is the only module of the broker with `unsafe` code. Every function
//! here is a direct syscall with no policy: callers decide what an errno means.

#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `PROCESS_MRELEASE_REAP_KILL` from `include/uapi/linux/mman.h` (reapd's
/// kernel series): kill the target and reap its address space atomically.
pub const PROCESS_MRELEASE_REAP_KILL: u32 = 1 << 0;

/// `SO_PEERGROUPS` (Linux 4.13): the peer's supplementary groups.
const SO_PEERGROUPS: libc::c_int = 59;
/// `SO_PEERPIDFD` (Linux 6.5): a pidfd for the peer process.
const SO_PEERPIDFD: libc::c_int = 77;

/// `PIDFD_INFO_*` request and reply mask bits (`include/uapi/linux/pidfd.h`).
pub const PIDFD_INFO_PID: u64 = 1 << 0;
pub const PIDFD_INFO_CREDS: u64 = 1 << 1;
pub const PIDFD_INFO_CGROUPID: u64 = 1 << 2;

/// `struct pidfd_info` as of its first version (`PIDFD_INFO_SIZE_VER0`, 64
/// bytes, Linux 6.13). Later kernels append fields; the ioctl number carries
/// the size we pass, so the kernel fills only these.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PidfdInfo {
    pub mask: u64,
    pub cgroupid: u64,
    pub pid: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub ruid: u32,
    pub rgid: u32,
    pub euid: u32,
    pub egid: u32,
    pub suid: u32,
    pub sgid: u32,
    pub fsuid: u32,
    pub fsgid: u32,
    pub spare0: u32,
}

const _: () = assert!(size_of::<PidfdInfo>() == 64);

/// `_IOWR(PIDFS_IOCTL_MAGIC, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong = ioc_readwrite(0xFF, 11, size_of::<PidfdInfo>());

const fn ioc_readwrite(kind: u32, nr: u32, size: usize) -> libc::c_ulong {
    const IOC_READ_WRITE: u32 = 3;
    ((IOC_READ_WRITE << 30) | ((size as u32) << 16) | (kind << 8) | nr) as libc::c_ulong
}

/// `process_mrelease(pidfd, flags)`.
pub fn process_mrelease(pidfd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: process_mrelease takes an int fd and an unsigned int by value;
    // no memory is shared with the kernel.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_process_mrelease,
            pidfd.as_raw_fd() as libc::c_long,
            flags as libc::c_long,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `process_mrelease(-1, flags)`: the feature probe. The kernel checks flags
/// before it looks the fd up, so EBADF means "flags known", EINVAL "flags
/// unknown", ENOSYS "no such syscall". Never probe with other negative fds:
/// -10000 and -10001 are PIDFD_SELF sentinels on newer kernels.
pub fn probe_process_mrelease(flags: u32) -> io::Error {
    // SAFETY: as in `process_mrelease`; fd -1 is never valid.
    let ret = unsafe { libc::syscall(libc::SYS_process_mrelease, -1 as libc::c_long, flags as libc::c_long) };
    if ret == 0 {
        // Cannot happen for fd -1; report it as the "supported" answer.
        io::Error::from_raw_os_error(libc::EBADF)
    } else {
        io::Error::last_os_error()
    }
}

/// The `PIDFD_GET_INFO` ioctl (Linux 6.13): pid, credentials and cgroup id of
/// the process behind `pidfd`. ESRCH once that process has been reaped.
pub fn pidfd_get_info(pidfd: BorrowedFd<'_>, request_mask: u64) -> io::Result<PidfdInfo> {
    let mut info = PidfdInfo {
        mask: request_mask,
        ..PidfdInfo::default()
    };
    // SAFETY: `info` is a live, properly aligned `struct pidfd_info` of the
    // size encoded in the ioctl number; the kernel writes at most that many
    // bytes into it and keeps no reference after returning.
    let ret = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info as *mut PidfdInfo) };
    if ret == 0 {
        Ok(info)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt(SO_PEERPIDFD)`: a pidfd for the process that connected.
pub fn peer_pidfd(socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are live locals; the kernel writes an int and
    // its length. On success the returned fd is new and owned by us.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            &mut fd as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel installed `fd` in our table for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `getsockopt(SO_PEERGROUPS)`: the peer's supplementary groups at connect.
pub fn peer_groups(socket: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    // NGROUPS_MAX is 65536; start small and grow on ERANGE as the kernel asks.
    let mut capacity = 64usize;
    loop {
        let mut groups: Vec<MaybeUninit<libc::gid_t>> = vec![MaybeUninit::uninit(); capacity];
        let mut len = (capacity * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a live buffer of `len` bytes; the kernel writes
        // at most `len` bytes and stores the needed length in `len`.
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr() as *mut libc::c_void,
                &mut len,
            )
        };
        let count = len as usize / size_of::<libc::gid_t>();
        if ret == 0 {
            return Ok(groups[..count.min(capacity)]
                .iter()
                // SAFETY: the kernel initialised the first `count` entries.
                .map(|gid| unsafe { gid.assume_init() })
                .collect());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && count > capacity && count <= 65536 {
            capacity = count;
            continue;
        }
        return Err(err);
    }
}

/// Most malloc arenas the broker's threads share: the main one and one
/// more, for a runtime of two async workers. glibc otherwise gives each new
/// thread that meets a locked arena an arena of its own, up to eight per
/// core (16 here); the blocking pool's short-lived threads (up to 64 under
/// load) then leave a dozen arenas behind, each holding fragments that
/// [`release_free_memory`] cannot give back (measured: after 100k checks
/// over 16 connections, 13 arenas; settled RssAnon 1.46 MiB with them, 1.31
/// with two). Two arenas still let both workers allocate without waiting on
/// each other most of the time; the blocking threads do little allocation.
const MALLOC_ARENAS: libc::c_int = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`]. Call before the runtime
/// starts any thread: arenas already made stay. Overrides
/// `GLIBC_TUNABLES=glibc.malloc.arena_max`. A no-op on other C libraries.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter under the main
    // arena's lock; it takes no pointer.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// Hands the allocator's free memory back to the kernel: glibc's
/// `malloc_trim(0)`, which releases whole free pages inside every arena
/// (`madvise(MADV_DONTNEED)`) and the heap's free top (`brk`), both in the
/// seccomp allow-list. Memory a burst of connections left free otherwise
/// stays in the broker's RSS. A no-op on other C libraries. Takes the arena
/// locks: microseconds for the broker's small heap, so it may run on an
/// async worker; call it when the broker has gone quiet, not per request.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own arenas
    // under their locks; it takes no pointer and leaves every live
    // allocation in place.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The effective capability set of this process includes `cap` (a
/// `CAP_*` bit number), read from `/proc/self/status` so no unsafe is needed.
pub fn has_effective_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << cap) != 0)
}

/// `CAP_KILL`'s bit number.
pub const CAP_KILL: u32 = 5;

/// `SD_LISTEN_FDS_START`: the first descriptor of the socket-activation
/// protocol (`sd_listen_fds(3)`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Takes ownership of the descriptors this process inherited at exec
/// through socket activation: `count` descriptors from
/// [`LISTEN_FDS_START`], as `LISTEN_FDS` says. Works once per process
/// (later calls return `None`), so the same number can never get two
/// owners through it; the protocol reserves these numbers for exactly this
/// hand-over, and the broker calls it before its runtime or any other thread
/// exists. `Some(Err(fd))`: that descriptor is not open.
pub fn take_listen_fds(count: usize) -> Option<Result<Vec<OwnedFd>, RawFd>> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    let mut fds = Vec::with_capacity(count);
    for raw in (0..count).map(|i| LISTEN_FDS_START + i as RawFd) {
        // SAFETY: F_GETFD on any integer is harmless; it only reports
        // whether the descriptor is open.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Some(Err(raw));
        }
        // SAFETY: `raw` is open (checked above), was passed by the service
        // manager for this process to own (the LISTEN_FDS protocol), and
        // this function runs once per process, so the OwnedFd is its only
        // owner and closes it exactly once.
        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    Some(Ok(fds))
}

/// `NSIO`, the ioctl type of namespace files (`include/uapi/linux/nsfs.h`).
const NSIO: u32 = 0xb7;
const fn ioc_none(kind: u32, nr: u32) -> libc::c_ulong {
    ((kind << 8) | nr) as libc::c_ulong
}
const fn ioc_read(kind: u32, nr: u32, size: usize) -> libc::c_ulong {
    const IOC_READ: u32 = 2;
    ((IOC_READ << 30) | ((size as u32) << 16) | (kind << 8) | nr) as libc::c_ulong
}
/// `NS_GET_PARENT`: an fd for the parent of a pid or user namespace.
const NS_GET_PARENT: libc::c_ulong = ioc_none(NSIO, 0x2);

/// The four pid translations of a pid-namespace fd (Linux 6.11,
/// `fs/nsfs.c`). Each takes a pid by value and returns one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidnsTranslation {
    /// A pid in the namespace → the task's pid in ours (`NS_GET_PID_FROM_PIDNS`).
    PidFromNs,
    /// A pid in the namespace → its thread group's tgid in ours (`NS_GET_TGID_FROM_PIDNS`).
    TgidFromNs,
    /// A pid in ours → the task's pid in the namespace (`NS_GET_PID_IN_PIDNS`).
    PidInNs,
    /// A pid in ours → its thread group's tgid in the namespace (`NS_GET_TGID_IN_PIDNS`).
    TgidInNs,
}

/// Translates `pid` through the pid namespace `pidns`. ESRCH when the task
/// is not visible on the other side; ENOTTY/EINVAL on kernels before 6.11.
pub fn pidns_translate(pidns: BorrowedFd<'_>, how: PidnsTranslation, pid: i32) -> io::Result<i32> {
    let nr = match how {
        PidnsTranslation::PidFromNs => 0x6,
        PidnsTranslation::TgidFromNs => 0x7,
        PidnsTranslation::PidInNs => 0x8,
        PidnsTranslation::TgidInNs => 0x9,
    };
    let request = ioc_read(NSIO, nr, size_of::<libc::c_int>());
    // SAFETY: these ioctls take the pid by value (the size in the request
    // number is nominal) and return the translated pid; no memory is shared.
    let ret = unsafe { libc::ioctl(pidns.as_raw_fd(), request, pid as libc::c_ulong) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `NS_GET_PARENT` on a pid namespace fd: its parent, or EPERM when the
/// parent is not inside our own pid namespace (we are at the top).
pub fn pidns_parent(pidns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: NS_GET_PARENT takes no argument and returns a new fd.
    let ret = unsafe { libc::ioctl(pidns.as_raw_fd(), NS_GET_PARENT) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel installed a new fd for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// `PIDFD_GET_PID_NAMESPACE` (Linux 6.11): an fd for the active pid
/// namespace of the pidfd's process. Needs ptrace read access to it
/// (`PTRACE_MODE_READ_FSCREDS`, as opening `/proc/PID/ns/pid` does):
/// EACCES for another uid's process when the broker holds only CAP_KILL.
pub fn pidfd_pid_namespace(pidfd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    const PIDFD_GET_PID_NAMESPACE: libc::c_ulong = ioc_none(0xFF, 5);
    // SAFETY: the ioctl takes no argument and returns a new fd.
    let ret = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_PID_NAMESPACE, 0 as libc::c_ulong) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel installed a new fd for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// `getsockopt(SO_PEERCRED)`: pid, uid and gid of the peer at connect,
/// translated into our namespaces. The pid is 0 when the peer is outside
/// our pid namespace, which `rustix`'s `UCred` (a non-zero `Pid`) cannot
/// represent; hence this wrapper.
pub fn peer_cred(socket: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals of the sizes passed; the
    // kernel writes at most `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid, cred.gid))
}

// ---- Refusing SCM_RIGHTS at the socket (issue 11) ----

/// `SO_PASSRIGHTS` (Linux 6.16): whether the socket accepts SCM_RIGHTS.
const SO_PASSRIGHTS: libc::c_int = 83;

/// `setsockopt(SO_PASSRIGHTS, 0)`: the kernel then refuses, with EPERM to
/// the sender, any fd sent to this socket (set on a listener, accepted
/// sockets inherit it, including connections not yet accepted). ENOPROTOOPT
/// before Linux 6.16.
pub fn refuse_passed_fds(socket: BorrowedFd<'_>) -> io::Result<()> {
    let off: libc::c_int = 0;
    // SAFETY: `off` is a live int and its size is passed; the kernel only
    // reads it.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            &off as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---- Seeing passed fds without receiving them (issue 11, attacks pass) ----

/// `recvmsg(MSG_PEEK | MSG_DONTWAIT)` into `buf` with a control buffer that
/// has room for no fd: returns the bytes peeked and whether fds are
/// attached to them (`MSG_CTRUNC`). No fd is installed: with
/// `msg_controllen` no larger than a `cmsghdr` the kernel's room for fds is
/// zero, and the references the peek took are dropped while the queued
/// message still holds its own, so nothing is released here either.
pub fn peek_for_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut control = MaybeUninit::<libc::cmsghdr>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iovec, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = size_of::<libc::cmsghdr>() as _;
    // SAFETY: `iov` points at `buf`, live and writable for its length;
    // `control` is a live cmsghdr of the length passed. The kernel writes at
    // most those lengths and keeps no pointer after returning.
    let ret = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((ret as usize, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// `pow(3)` in Rust (the `libm` crate: musl's, ported), so the broker never
/// loads glibc's libm.so. pow is the only libm function the broker links
/// (tokio's scheduler statistics call `f64::powf` after each batch of task
/// polls), yet loading libm.so costs ~0.5 MiB of RSS: the loader reads its
/// symbol tables and runs all its IFUNC resolvers, which touch most of its
/// text. Defined here, the call binds to this function and the linker
/// (`--as-needed`, rustc's default) leaves libm.so out of the executable's
/// needed libraries.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use std::hint::black_box;

    /// The C `pow` the broker defines answers as C's does, exact cases and
    /// C99 Annex F's special ones included; `f64::powf` (what tokio calls)
    /// reaches it too.
    #[test]
    fn pow_answers_as_c_does() {
        let pow = super::pow;
        assert_eq!(pow(2.0, 10.0), 1024.0);
        assert_eq!(pow(0.5, 3.0), 0.125);
        assert_eq!(pow(9.0, 0.5), 3.0);
        assert_eq!(pow(f64::NAN, 0.0), 1.0);
        assert_eq!(pow(1.0, f64::NAN), 1.0);
        assert!(pow(-8.0, 1.0 / 3.0).is_nan());
        assert_eq!(pow(0.0, -1.0), f64::INFINITY);
        assert_eq!(pow(-2.0, 3.0), -8.0);
        let (x, y) = (black_box(0.9_f64), black_box(7.0_f64));
        assert_eq!(x.powf(y), pow(0.9, 7.0));
        assert!((pow(0.9, 7.0) - 0.478_296_9).abs() < 1e-12);
    }
}
