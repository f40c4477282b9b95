// SPDX-License-Identifier: MIT OR Apache-2.0
//! reapd: a privileged broker that kills a process and reaps its memory at
//! once, on behalf of unprivileged callers.
//!
//! Layout, in the order a request flows through it:
//! - [`listener`]: Unix sockets, per-connection caller identity, connection caps.
//! - [`closer`]: received fds closed off the executor, with per-uid budgets.
//! - [`caller`]: who is asking (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD).
//! - [`target`]: which process, pinned by a pidfd before any check.
//! - [`policy`]: may this caller kill this target, and why.
//! - [`limits`]: per-uid kill rate and in-flight caps.
//! - [`reaper`]: the kill and the reap.
//! - [`engine`]: ties the above together, audits, and is what transports call.
//! - [`grpc`]: the gRPC transport.
//! - [`varlink`]: the varlink transport (`io.reapd.Reaper`), with pidfd passing.
//! - [`features`]: kernel features probed once at start.
//! - [`sys`]: the only `unsafe`: raw syscalls nobody else wraps.

// All unsafe code lives in `sys`, which opts back in.
#![deny(unsafe_code)]

pub mod authority;
pub mod caller;
pub mod candidates;
pub mod cgroup;
pub mod closer;
pub mod engine;
pub mod error;
pub mod events;
pub mod features;
pub mod group;
pub mod grpc;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod privilege;
pub mod procfs;
pub mod reaper;
pub mod reload;
pub mod seccomp;
pub mod sys;
pub mod systemd;
pub mod target;
pub mod varlink;
