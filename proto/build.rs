//! Compiles `proto/*.proto` without a `protoc` binary: protox parses them into a
//! file-descriptor set in pure Rust, which tonic-prost-build turns into code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["ca", "dispatcher", "control", "raft", "cluster"].map(|n| format!("proto/{n}.proto"));
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(&files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
