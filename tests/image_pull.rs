//! `secretctl image pull` from a real registry (Debian's docker-registry,
//! Distribution 2.8) on 127.0.0.1, pushed to with skopeo: by tag and by
//! digest, the same digest as the layout; a blob tampered with in the
//! registry's storage is refused and leaves nothing; an unknown tag and a
//! reference without a registry get one clear line.

mod common;

use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

struct Registry {
    child: Child,
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry(env: &Env) -> Registry {
    let root = env.path("registry");
    std::fs::create_dir_all(&root).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = env.path("registry.yml");
    std::fs::write(
        &config,
        format!("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n", root.display()),
    )
    .unwrap();
    let log = std::fs::File::create(env.path("registry.log")).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run docker-registry ({e}): install Debian's docker-registry (scripts/setup does)")
        });
    let r = Registry { child, addr };
    wait_for("the registry to listen", DEADLINE, || std::net::TcpStream::connect(&r.addr).ok());
    r
}

fn push(layout: &std::path::Path, tag: &str, dest: &str) {
    let o = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .expect("skopeo (scripts/setup installs it)");
    assert!(o.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn images_are_pulled_from_a_registry_and_checked_blob_by_blob() {
    let mut env = Env::new();
    let reg = registry(&env);
    let m = env.start_manager("m1", &[]);
    let rootfs = env.path("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/hello"), vec![b'h'; 100_000]).unwrap();
    let layout = env.path("layout");
    let digest = build_image(&rootfs, &layout, "hello:1");
    push(&layout, "hello:1", &format!("{}/acme/hello:1", reg.addr));

    // By tag: the same manifest, named after the reference.
    let pulled = m.ctl_ok(&["image", "pull", &format!("{}/acme/hello:1", reg.addr)]);
    assert_eq!(pulled.trim(), digest, "skopeo kept the OCI manifest, so the digest is the layout's");
    let i: Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "image", "inspect", &digest])).unwrap();
    assert_eq!(i["names"][0], format!("{}/acme/hello:1", reg.addr));
    for l in i["layers"].as_array().unwrap() {
        let hex = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
        assert!(m.data.join("blobs/sha256").join(hex).is_file());
    }
    // By digest, under another name.
    let by_digest = format!("{}/acme/hello@{digest}", reg.addr);
    assert_eq!(m.ctl_ok(&["image", "pull", &by_digest, "--name", "hello:pinned"]).trim(), digest);
    assert!(m.ctl_ok(&["image", "inspect", "hello:pinned"]).contains(&digest));

    // Clear refusals.
    let o = m.ctl(&["image", "pull", &format!("{}/acme/hello:nope", reg.addr)]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = m.ctl(&["image", "pull", "acme/hello:1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("registry host"), "{}", String::from_utf8_lossy(&o.stderr));

    // Another image whose layer is tampered with in the registry's storage.
    std::fs::write(rootfs.join("etc/other"), "other").unwrap();
    let layout2 = env.path("layout2");
    let digest2 = build_image(&rootfs, &layout2, "other:1");
    push(&layout2, "other:1", &format!("{}/acme/other:1", reg.addr));
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(layout2.join("blobs/sha256").join(digest2.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
    let data = env.path("registry/docker/registry/v2/blobs/sha256").join(&layer[..2]).join(&layer).join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let o = m.ctl(&["image", "pull", &format!("{}/acme/other:1", reg.addr)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&layer) && err.contains("hashes to"), "{err}");
    assert!(!m.data.join("blobs/sha256").join(&layer).exists(), "a tampered blob was kept");
    assert!(!m.ctl_ok(&["image", "ls", "-q"]).contains(&digest2));
}
