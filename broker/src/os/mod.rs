// SPDX-License-Identifier: MIT OR Apache-2.0
//! What the kernel and the service manager provide, in typed wrappers: the
//! engine asks these, never the kernel directly.

pub mod cgroup;
pub mod features;
pub mod privilege;
pub mod procfs;
pub mod seccomp;
pub mod sys;
pub mod systemd;
