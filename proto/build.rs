// SPDX-License-Identifier: MIT OR Apache-2.0
//! Generates the reapd.v1 types, client and server from the .proto file.
//!
//! protoc comes from the `protoc-bin-vendored` crate so a build needs nothing
//! from apt; a `PROTOC` set in the environment wins (distributions prefer their
//! own protoc). Without the `grpc` feature there is nothing to generate.

#[cfg(not(feature = "grpc"))]
fn main() {}

#[cfg(feature = "grpc")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::{env, path::PathBuf};
    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // Edition 2021: set_var is safe; build.rs runs before any thread.
        env::set_var("PROTOC", protoc);
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("reapd_descriptor.bin"))
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::StrictProstCodec")
        .compile_protos(&["reapd/v1/reaper.proto"], &["."])?;
    println!("cargo:rerun-if-changed=reapd/v1/reaper.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
