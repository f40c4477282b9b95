// SPDX-License-Identifier: MIT OR Apache-2.0
//! Closing file descriptors that callers sent, off the async executor.
//!
//! A received fd can be anything, and `close(2)` on some of them never
//! returns: closing a file on a FUSE filesystem sends FLUSH and waits
//! uninterruptibly for the server's answer (FLUSH is a forced request). So
//! the broker never closes a received fd that is not a verified pidfd on a
//! runtime thread: each such close runs on its own short-lived thread
//! (`reapd-closer`), and every received fd is charged to its sender's uid
//! from the moment the broker asks the kernel for it until its close
//! returns. A sender whose closes hang uses up its own budget and is then
//! refused further fd-carrying calls; other uids are not affected. A global
//! cap bounds the total, with a reserve that only root and callers holding a
//! kill grant may use.
//!
//! Pidfds are closed inline: a pidfd's file has no `flush` and its release
//! only drops a reference on a `struct pid`, so it cannot block.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// Received fds one uid may have pending (received, not yet verified as a
/// pidfd or closed).
pub const PER_UID: usize = 8;
/// Received fds pending for all uids together.
pub const TOTAL: usize = 256;
/// Of [`TOTAL`], the part only privileged callers (root, kill grantees) use.
pub const RESERVED: usize = 32;

/// Most fds one `sendmsg` can attach (`SCM_MAX_FD`), so most one
/// `recvmsg` can return. A read with room for this many never makes the
/// kernel drop (and so release, on the reading thread) a passed fd.
pub const SCM_MAX_FD: usize = 253;

/// How far the fds pending close can exceed [`TOTAL`]: a read of a message
/// that carries fds installs up to [`SCM_MAX_FD`] of them before the ones
/// its call does not name are charged (over the budget); reads run on the
/// runtime's two worker threads.
pub const OVERSHOOT: usize = 2 * SCM_MAX_FD;

/// Stack of a closer thread: it only calls close(2).
const CLOSER_STACK: usize = 64 * 1024;

#[derive(Debug, Default)]
struct State {
    by_uid: HashMap<u32, usize>,
    total: usize,
}

/// The closer: budgets, and the threads that close.
#[derive(Debug)]
pub struct Closer {
    state: Mutex<State>,
    per_uid: usize,
    total: usize,
    reserved: usize,
}

impl Default for Closer {
    fn default() -> Self {
        Closer::new(PER_UID, TOTAL, RESERVED)
    }
}

/// One unit of a uid's budget: held by one received fd until it is known to
/// be a pidfd or its close has returned.
#[derive(Debug)]
pub struct Unit {
    closer: Arc<Closer>,
    uid: u32,
}

impl Drop for Unit {
    fn drop(&mut self) {
        let mut state = self.closer.state.lock().unwrap_or_else(|p| p.into_inner());
        state.total = state.total.saturating_sub(1);
        if let Some(count) = state.by_uid.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                state.by_uid.remove(&self.uid);
            }
        }
    }
}

/// Why a uid may not receive more fds now.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error("uid {uid} has {pending} received file descriptors still being closed (limit {limit}); calls that pass file descriptors are refused until they are")]
    Uid { uid: u32, pending: usize, limit: usize },
    #[error("{pending} received file descriptors are still being closed for all callers (limit {limit}); calls that pass file descriptors are refused until they are")]
    Total { pending: usize, limit: usize },
}

impl Closer {
    pub fn new(per_uid: usize, total: usize, reserved: usize) -> Self {
        Closer {
            state: Mutex::default(),
            per_uid,
            total,
            reserved: reserved.min(total),
        }
    }

    /// Charges `n` fds to `uid` before they are received. `privileged`
    /// callers may use the reserve.
    pub fn reserve(self: &Arc<Self>, uid: u32, n: usize, privileged: bool) -> Result<Vec<Unit>, BudgetError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let pending = state.by_uid.get(&uid).copied().unwrap_or(0);
        if pending + n > self.per_uid {
            return Err(BudgetError::Uid {
                uid,
                pending,
                limit: self.per_uid,
            });
        }
        let limit = if privileged {
            self.total
        } else {
            self.total - self.reserved
        };
        if state.total + n > limit {
            return Err(BudgetError::Total {
                pending: state.total,
                limit,
            });
        }
        state.total += n;
        *state.by_uid.entry(uid).or_insert(0) += n;
        drop(state);
        Ok((0..n)
            .map(|_| Unit {
                closer: Arc::clone(self),
                uid,
            })
            .collect())
    }

    /// Charges `n` fds to `uid` whatever the budget: for fds the kernel has
    /// already installed (a message can bring up to [`SCM_MAX_FD`] more than
    /// its call names). The uid is then over its budget, and its further
    /// fd-carrying messages are refused, until their closes return.
    pub fn charge(self: &Arc<Self>, uid: u32, n: usize) -> Vec<Unit> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.total += n;
        *state.by_uid.entry(uid).or_insert(0) += n;
        drop(state);
        (0..n)
            .map(|_| Unit {
                closer: Arc::clone(self),
                uid,
            })
            .collect()
    }

    /// Fds pending for `uid` (received and not yet released).
    pub fn pending(&self, uid: u32) -> usize {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.by_uid.get(&uid).copied().unwrap_or(0)
    }

    /// Fds pending for all uids.
    pub fn pending_total(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// A received fd and the budget unit it holds.
#[derive(Debug)]
pub struct Received {
    fd: OwnedFd,
    /// Held for its `Drop`: released when the fd is known harmless or closed.
    _unit: Unit,
}

impl Received {
    pub fn new(fd: OwnedFd, unit: Unit) -> Self {
        Received { fd, _unit: unit }
    }

    /// The fd, if the kernel says it is a pidfd (a process or thread
    /// pidfd); otherwise it is handed to a closer thread and `None` is
    /// returned. The unit is released either way once nothing can block.
    pub fn into_pidfd(self) -> Option<OwnedFd> {
        if is_pidfd(&self.fd) {
            Some(self.fd)
        } else {
            close_off_thread(self);
            None
        }
    }

    /// The fd, if it is a pid namespace (`/proc/self/ns/pid` or
    /// `PIDFD_GET_PID_NAMESPACE`: an nsfs file); otherwise it is handed to
    /// a closer thread and `None` is returned.
    pub fn into_pid_namespace(self) -> Option<OwnedFd> {
        if is_pid_namespace(&self.fd) {
            Some(self.fd)
        } else {
            close_off_thread(self);
            None
        }
    }

    /// An fd received without a budget unit (should not happen: the room
    /// for fds is the units held). Closed like any other, charged to nobody.
    pub fn unbudgeted(fd: OwnedFd) {
        if is_pidfd(&fd) {
            drop(fd);
        } else {
            spawn_close(fd);
        }
    }

    /// Closes the fd: inline if it is a pidfd, on a closer thread otherwise.
    pub fn dispose(self) {
        if let Some(pidfd) = self.into_pidfd() {
            drop(pidfd);
        }
    }
}

/// Whether `fd` is a pidfd, from the name the kernel gives its file
/// (`anon_inode:[pidfd]`, also on pidfs since 6.9). Reading the
/// `/proc/self/fd` link is a d_path in the kernel: it never calls into the
/// fd's filesystem, unlike fstat/fstatfs/ioctl, which on FUSE wait for the
/// server. The name cannot be forged: only anonymous-inode files have names
/// without a leading '/', and the kernel picks those names.
pub fn is_pidfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|link| link.as_os_str() == "anon_inode:[pidfd]")
        .unwrap_or(false)
}

/// The fd is a pid namespace: its link reads `pid:[INODE]` (nsfs).
pub fn is_pid_namespace(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|link| link.to_string_lossy().starts_with("pid:["))
        .unwrap_or(false)
}

/// Closes every fd of `batch` in turn on one closer thread; each one's
/// budget unit is released as its close returns.
pub fn close_batch(batch: Vec<Received>) {
    if !batch.is_empty() {
        spawn_close(batch);
    }
}

/// Drops `item` on a closer thread: for a socket whose receive queue may
/// hold passed fds, which closing it releases (see
/// [`crate::transport::varlink`]'s connection close).
pub fn drop_off_executor<T: Send + 'static>(item: T) {
    spawn_close(item);
}

fn close_off_thread(received: Received) {
    // The unit goes with the fd: released only once the close returned.
    spawn_close(received);
}

/// Drops `item` (closing the fd it holds) on a new closer thread. The drop
/// may block for as long as the fd's filesystem wants (FUSE: until its
/// server answers FLUSH); only that thread, and the sender's budget unit
/// that goes with the fd, wait.
fn spawn_close<T: Send + 'static>(item: T) {
    let slot = Arc::new(Mutex::new(Some(item)));
    let theirs = Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name("reapd-closer".into())
        .stack_size(CLOSER_STACK)
        .spawn(move || {
            let item = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(item);
        });
    if let Err(err) = spawned {
        // Without a thread the fd cannot be closed safely here: keep it
        // open (and its unit held), so the cost stays with the sender.
        if let Some(item) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            std::mem::forget(item);
        }
        tracing::warn!(error = %err, "cannot start a closer thread; a received fd stays open");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_per_uid_with_a_reserve() {
        let closer = Arc::new(Closer::new(2, 5, 2));
        let a = closer.reserve(1, 2, false).unwrap();
        assert!(matches!(closer.reserve(1, 1, false), Err(BudgetError::Uid { .. })));
        let _b = closer.reserve(2, 1, false).unwrap();
        // 3 of the 3 ordinary units are taken; the reserve is for privileged.
        assert!(matches!(closer.reserve(3, 1, false), Err(BudgetError::Total { .. })));
        let c = closer.reserve(0, 2, true).unwrap();
        assert_eq!(closer.pending_total(), 5);
        drop((a, c));
        assert_eq!(closer.pending(1), 0);
        assert!(closer.reserve(3, 1, false).is_ok());
    }

    #[test]
    fn only_pidfds_are_pidfds() {
        let pidfd = rustix::process::pidfd_open(rustix::process::getpid(), rustix::process::PidfdFlags::empty())
            .expect("pidfd_open");
        assert!(is_pidfd(&pidfd));
        let file: OwnedFd = std::fs::File::open("/proc/self/stat").unwrap().into();
        assert!(!is_pidfd(&file));
    }
}
