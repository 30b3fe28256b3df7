//! Compiles the protos in Rust (protox): no protoc is needed on any machine.

use std::path::PathBuf;

use prost::Message;

const PUBLIC: &str = "portmesh/v1/portmesh.proto";
const INTERNAL: &str = "portmesh/raft/v1/raft.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection describes the public API only; the node-to-node service stays internal.
    let public = protox::compile([PUBLIC], [&root])?;
    std::fs::write(out.join("portmesh_descriptor.bin"), public.encode_to_vec())?;
    let all = protox::compile([PUBLIC, INTERNAL], [&root])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(all)?;
    Ok(())
}
