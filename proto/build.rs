//! Compiles `proto/*.proto` without a `protoc` binary: protox parses them into a
//! file-descriptor set in pure Rust, which tonic-prost-build turns into code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["ca", "dispatcher", "control", "raft", "cluster", "etcd_kv"].map(|n| format!("proto/{n}.proto"));
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(&files, ["proto"])?;
    // etcd_kv.proto is a client of a peer's API (benchmarks); no server is generated for it.
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
