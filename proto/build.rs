//! Compiles `kvault.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=kvault.proto");
    println!("cargo:rerun-if-changed=sidecar.proto");
    // Both files are package kvault.v1: their code lands in one module.
    let fds = protox::compile(["kvault.proto", "sidecar.proto"], ["."])?;
    tonic_prost_build::configure()
        // Bytes fields become `bytes::Bytes`: the server slices stored chunks
        // into body pieces without copying them, and received pieces are
        // views into the receive buffer.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
