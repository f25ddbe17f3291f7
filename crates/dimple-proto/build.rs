//! Compiles `proto/` with the pure-Rust `protox` (no `protoc` needed) and generates the
//! tonic/prost code, plus the encoded descriptor set served by gRPC reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: [&str; 2] = ["dimple/v1/dimple.proto", "dimple/worker/v1/worker.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not compiled in: cargo hashes workspace members by their path
    // relative to the workspace, so checkouts sharing one target directory share this
    // script's binary, and a compiled-in path would read another checkout's protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("dimple_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
