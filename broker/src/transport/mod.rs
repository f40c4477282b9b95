// SPDX-License-Identifier: MIT OR Apache-2.0
//! The sockets and the wire: accept, identify, decode, call the engine,
//! encode. No decision is made here.

pub mod authority;
pub mod closer;
pub mod grpc;
pub mod listener;
pub mod varlink;
