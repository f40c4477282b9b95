// SPDX-License-Identifier: MIT OR Apache-2.0
//! reapd's wire types.
//!
//! [`model`] is the API's data model, one type per reply and refusal, with
//! its encodings for both wires. `v1` is the gRPC API (package `reapd.v1`),
//! generated from `reapd/v1/reaper.proto` (feature `grpc`, default).
//! [`VARLINK_INTERFACE`] is the varlink IDL of the same API
//! (`io.reapd.Reaper`).

#[cfg(feature = "grpc")]
pub mod codec;
pub mod model;

/// The `reapd.v1` gRPC API: messages, the `Reaper` client and server.
#[cfg(feature = "grpc")]
pub mod v1 {
    tonic::include_proto!("reapd.v1");

    /// Encoded `FileDescriptorSet` for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("reapd_descriptor");
}

/// The varlink IDL of the same API: interface `io.reapd.Reaper`, served by
/// `reapd --varlink-socket` and returned by
/// `org.varlink.service.GetInterfaceDescription`.
pub const VARLINK_INTERFACE: &str = include_str!("../io.reapd.Reaper.varlink");
