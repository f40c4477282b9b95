// SPDX-License-Identifier: MIT OR Apache-2.0
//! The few syscalls the benchmark needs that neither std nor rustix wraps
//! safely. Every `unsafe` block of the crate lives here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `process_mrelease(2)`: frees the memory of a process that is already
/// dying (SIGKILL delivered), from the caller's context.
pub fn process_mrelease(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the syscall takes an fd (kept open by the borrow) and a flags
    // word; it touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_process_mrelease, pidfd.as_raw_fd(), 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Moves `pid` to SCHED_IDLE: it then runs only when no normal task wants
/// the CPU, which is what "starved" means here.
pub fn set_sched_idle(pid: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the
    // call; the kernel only reads it.
    let rc = unsafe { libc::sched_setscheduler(pid, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A private (copy-on-write) writable mapping of all of `file`, every page
/// written once so that each becomes a private anonymous copy. The mapping
/// is leaked: the victim holds it until it dies.
pub fn touch_private_file_mapping(file: &File, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a fresh mapping chosen by the kernel (addr NULL), so it
    // aliases nothing of ours; the fd is valid for the call.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let page = rustix::param::page_size();
    let base = addr.cast::<u8>();
    let mut offset = 0;
    while offset < len {
        // SAFETY: offset < len, so the byte lies inside the mapping made
        // above, which is readable and writable and never unmapped.
        unsafe { base.add(offset).write_volatile(1) };
        offset += page;
    }
    Ok(())
}
