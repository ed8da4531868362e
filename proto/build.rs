//! Compiles `proto/*.proto` without a `protoc` binary: protox parses them into a
//! file-descriptor set in pure Rust, which tonic-prost-build turns into code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["ca", "dispatcher", "control", "raft", "cluster", "etcd_kv"].map(|n| format!("proto/{n}.proto"));
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(&files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("swarmd_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // etcd_kv.proto is a client of a peer's API (benchmarks); no server is generated for it.
    // Secret values as `Bytes`, so that the manager can hand prost a buffer
    // that wipes itself when dropped (see swarmd-manager's assignments).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".swarmd.dispatcher.SecretValue.data")
        .bytes(".swarmd.control.CreateSecretRequest.data")
        .bytes(".swarmd.control.UpdateSecretRequest.data")
        // Image blobs pass through in chunks without a copy.
        .bytes(".swarmd.cluster.BlobChunk.data")
        .bytes(".swarmd.dispatcher.TaskBlobChunk.data")
        .bytes(".swarmd.control.LoadImageChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
