//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates the tonic code.
//! The encoded descriptor set is written to `OUT_DIR` for gRPC server reflection.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["switchboard/v1/broker.proto"], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("switchboard_descriptor.bin"), fds.encode_to_vec())?;
    // Smaller per-call buffers than tonic's 8 KiB (src/grpc/codec.rs).
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::grpc::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    Ok(())
}
