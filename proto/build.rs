//! Compiles `proto/posfleet/v1/*.proto` with `protox` (a pure-Rust protobuf
//! compiler), so a fresh machine builds the API without `protoc`.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "posfleet/v1/agent.proto",
    "posfleet/v1/rollout.proto",
    "posfleet/v1/admin.proto",
    "posfleet/v1/session.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set is served by the gRPC reflection service.
    std::fs::write(out_dir.join("posfleet_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
