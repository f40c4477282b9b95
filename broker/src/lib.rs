// SPDX-License-Identifier: MIT OR Apache-2.0
//! reapd: a privileged broker that kills a process and reaps its memory at
//! once, on behalf of unprivileged callers.
//!
//! The folders follow a request:
//! - [`transport`]: the sockets and the two wire protocols. [`transport::listener`]
//!   accepts and caps connections and takes each caller's identity from the
//!   kernel; [`transport::closer`] closes received fds off the executor;
//!   [`transport::grpc`] and [`transport::varlink`] decode a call, hand it to
//!   the engine and encode its answer — nothing else.
//! - [`engine`]: every decision. [`engine::caller`] (who asks),
//!   [`engine::target`] (which process, pinned by a pidfd before any check),
//!   [`engine::policy`] (may this caller kill it, and why),
//!   [`engine::limits`] (rate and in-flight caps), [`engine::reaper`] (the
//!   kill and the reap), the audit records, [`engine::events`] and
//!   [`engine::metrics`].
//! - [`os`]: what the kernel and systemd give: [`os::sys`] (the only
//!   `unsafe`), [`os::procfs`], [`os::cgroup`], [`os::features`] (probed once),
//!   [`os::privilege`], [`os::seccomp`], [`os::systemd`].
//! - [`server`]: start-up, the two transports over one engine, and the one
//!   shutdown path.

// All unsafe code lives in `os::sys`, which opts back in.
#![deny(unsafe_code)]

pub mod engine;
pub mod os;
pub mod server;
pub mod transport;
