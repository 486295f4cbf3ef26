//! Generates Rust types and gRPC stubs from `proto/*.proto` with a vendored
//! `protoc`, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    // Set per-config instead of exporting PROTOC: other crates' build scripts
    // (raft-proto) only accept protoc 3.x and must not see this one.
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/llmesh.proto", "proto/control.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
