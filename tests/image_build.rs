//! Issue 16: `secretctl image build-rootfs` writes an OCI image layout that
//! real tools read — skopeo (inspect, and copy to an OCI archive and a
//! docker-archive) and umoci (unpack) — and that swarmd-image reads back in
//! every one of those forms with the same layers. Needs Debian's skopeo and
//! umoci (scripts/setup installs them): without them the test fails saying so.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use swarmd_image::{load, Platform, Source};

fn tool(name: &str, args: &[&str]) -> String {
    let o = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name} ({e}): install Debian's {name} (scripts/setup does)"));
    assert!(o.status.success(), "{name} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn secretctl(args: &[&str]) -> std::process::Output {
    Command::new(secretctl_bin()).args(args).output().unwrap()
}

#[test]
fn a_built_image_is_read_by_skopeo_and_umoci_and_back_in_every_form() {
    let env = Env::new();
    let rootfs = env.path("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/motd"), b"built here\n").unwrap();
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::write(rootfs.join("bin/app"), b"#!/bin/sh\necho app\n").unwrap();
    std::os::unix::fs::symlink("bin/app", rootfs.join("entry")).unwrap();
    let layout = env.path("layout");
    let o = secretctl(&[
        "image",
        "build-rootfs",
        rootfs.to_str().unwrap(),
        "--out",
        layout.to_str().unwrap(),
        "--name",
        "app:1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let digest = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");

    // skopeo sees the same manifest digest.
    let oci = format!("oci:{}:app:1", layout.display());
    let inspected: serde_json::Value =
        serde_json::from_str(&tool("skopeo", &["--insecure-policy", "inspect", &oci])).unwrap();
    assert_eq!(inspected["Digest"], digest.as_str(), "{inspected}");
    assert_eq!(inspected["Os"], "linux");

    // umoci unpacks it to the tree.
    let bundle = env.path("bundle");
    tool("umoci", &["unpack", "--image", &format!("{}:app:1", layout.display()), bundle.to_str().unwrap()]);
    assert_eq!(std::fs::read(bundle.join("rootfs/etc/motd")).unwrap(), b"built here\n");
    assert_eq!(std::fs::read_link(bundle.join("rootfs/entry")).unwrap(), Path::new("bin/app"));

    // Back here: the layout, skopeo's OCI archive, and skopeo's docker-archive
    // (the legacy docker save format): the same layers by DiffID.
    let ours = load(&Source::open(&layout).unwrap(), &Platform::default(), None).unwrap();
    assert_eq!(ours.digest.as_str(), digest);
    let archive = env.path("app.oci.tar");
    tool("skopeo", &["--insecure-policy", "copy", &oci, &format!("oci-archive:{}:app:1", archive.display())]);
    let from_archive = load(&Source::open(&archive).unwrap(), &Platform::default(), None).unwrap();
    let docker = env.path("app.docker.tar");
    tool("skopeo", &["--insecure-policy", "copy", &oci, &format!("docker-archive:{}:app:1", docker.display())]);
    let from_docker = load(&Source::open(&docker).unwrap(), &Platform::default(), None).unwrap();
    let diff_ids = |i: &swarmd_image::Image| i.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>();
    assert_eq!(diff_ids(&from_archive), diff_ids(&ours));
    assert_eq!(diff_ids(&from_docker), diff_ids(&ours));
    assert!(from_docker.name.as_deref().is_some_and(|n| n.ends_with("app:1")), "{:?}", from_docker.name);

    // Nothing but files, directories and symlinks goes in; a bad name is refused.
    let fifo_root = env.path("fifo-root");
    std::fs::create_dir_all(&fifo_root).unwrap();
    tool("mkfifo", &[fifo_root.join("pipe").to_str().unwrap()]);
    let o = secretctl(&[
        "image",
        "build-rootfs",
        fifo_root.to_str().unwrap(),
        "--out",
        env.path("l2").to_str().unwrap(),
        "--name",
        "x",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("only files, directories and symlinks"));
    let o = secretctl(&[
        "image",
        "build-rootfs",
        rootfs.to_str().unwrap(),
        "--out",
        env.path("l3").to_str().unwrap(),
        "--name",
        "a b",
    ]);
    assert!(!o.status.success());
}
