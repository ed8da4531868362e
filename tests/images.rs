//! Images end to end: `secretctl image load` into a cluster of three
//! managers (each holds every blob, checked on disk), a service pinned to the
//! digest at admission, its tasks unpacked once into the worker's cache, a
//! worker refused blobs it has no task for, removal refused while a service
//! uses the image, and the records and blobs surviving a restart, a snapshot
//! and a manager that joins later.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use swarmd_certs::tls::client_config;
use swarmd_certs::{dial, NodeIdentity};
use swarmd_proto::cluster::cluster_client::ClusterClient;
use swarmd_proto::cluster::FetchBlobRequest;
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::load_image_chunk::Part;
use swarmd_proto::control::{LoadImageChunk, LoadImageHeader};
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::FetchTaskBlobRequest;
use tonic::Code;

fn image_json(m: &Manager, reference: &str) -> Option<Value> {
    let o = m.ctl(&["--format", "json", "image", "inspect", reference]);
    o.status.success().then(|| serde_json::from_slice(&o.stdout).unwrap())
}

fn blob_file(m: &Manager, digest: &str) -> std::path::PathBuf {
    m.data.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

/// The digests of every blob of an image (`image inspect --format json`).
fn blobs_of(image: &Value) -> Vec<String> {
    let mut v = vec![image["digest"].as_str().unwrap().to_owned(), image["config_digest"].as_str().unwrap().to_owned()];
    v.extend(image["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()));
    v
}

fn running_tasks(m: &Manager, service: &str) -> Vec<Value> {
    let o = m.ctl(&["--format", "json", "service", "ps", service]);
    let tasks: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
    tasks.into_iter().filter(|t| t["state"] == "running" && t["desired"] == "running").collect()
}

/// Fetches blob `digest` for task `task` with `node`'s certificate through
/// `m`'s dispatcher; the bytes, or the refusal's code.
async fn fetch_as(node: &std::path::Path, m: &Manager, task: &str, digest: &str) -> Result<Vec<u8>, Code> {
    let id = NodeIdentity::load(&node.join("certs")).unwrap();
    let ch = dial::connect(&m.addr, Arc::new(client_config(&id).unwrap())).await.unwrap();
    let req = FetchTaskBlobRequest { task_id: task.into(), digest: digest.into() };
    let mut stream = DispatcherClient::new(ch).fetch_blob(req).await.map_err(|s| s.code())?.into_inner();
    let mut out = Vec::new();
    while let Some(c) = stream.message().await.map_err(|s| s.code())? {
        out.extend_from_slice(&c.data);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_is_held_by_every_manager_and_runs_from_the_worker_s_cache() {
    if !can_run_containers("images::an_image_is_held_by_every_manager_and_runs_from_the_worker_s_cache") {
        return;
    }
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--heartbeat", "1s"]);
    let mtoken = m1.token("manager");
    let m2 = env.start_manager_join("m2", &mtoken, &m1, &[]);
    let m3 = env.start_manager_join("m3", &mtoken, &m1, &[]);
    let wtoken = m1.token("worker");
    let w1 = env.join_worker("w1", &wtoken, &m1.addr);
    let w2 = env.join_worker("w2", &wtoken, &m1.addr);
    m1.wait_ready(5);
    let (w1_id, w2_id) = (w1.node_id(), w2.node_id());
    m1.ctl_ok(&["node", "update", "--label-add", "pick=yes", &w1_id]);

    // Loaded through m2 (any manager may take a load): every manager holds every blob.
    let rootfs = busybox_rootfs(&env.path("rootfs"));
    // 16 MiB that do not compress: a layer larger than any flow-control window.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let noise: Vec<u8> = (0..16 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(rootfs.join("etc/noise"), noise).unwrap();
    let layout = env.path("layout");
    let built = build_image(&rootfs, &layout, "busybox:1");
    let loaded = m2.ctl_ok(&["image", "load", layout.to_str().unwrap()]);
    assert_eq!(loaded.trim(), built, "image load prints the manifest digest");
    let image = image_json(&m1, "busybox:1").expect("the layout's name is kept");
    assert_eq!(image["digest"], built.as_str());
    assert_eq!(image["holders"].as_array().unwrap().len(), 3, "{image}");
    for m in [&m1, &m2, &m3] {
        for b in blobs_of(&image) {
            assert!(blob_file(m, &b).is_file(), "{} lacks blob {b}", m.name);
        }
    }
    let ls = m1.ctl_ok(&["image", "ls", "-q"]);
    assert_eq!(ls.trim(), built);
    // Loading it again changes nothing.
    assert_eq!(m1.ctl_ok(&["image", "load", layout.to_str().unwrap()]).trim(), built);

    // Pinned at admission; an unknown image and a directory are refused.
    let o = m1.ctl(&["service", "create", "nope", "--image", "busybox:2", "--", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such image"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = m1.ctl(&["service", "create", "dir", "--image", rootfs.to_str().unwrap(), "--", "true"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--allow-host-rootfs"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = m1.ctl_stdin(&["create", "db_pass"], b"image-secret");
    assert!(o.status.success());
    m1.ctl_ok(&[
        "service",
        "create",
        "web",
        "--image",
        "busybox:1",
        "--constraint",
        "node.labels.pick==yes",
        "--secret",
        "db_pass",
        "--",
        "sh",
        "-c",
        "cat /run/secrets/db_pass; echo; sleep 3600",
    ]);
    let svc: Value = serde_json::from_str(&m1.ctl_ok(&["--format", "json", "service", "inspect", "web"])).unwrap();
    assert_eq!(svc["image"], format!("busybox:1@{built}"));
    assert_eq!(svc["image_digest"], built.as_str());
    wait_for("web running", Duration::from_secs(90), || (running_tasks(&m1, "web").len() == 1).then_some(()));
    wait_for("the secret in the task's output", Duration::from_secs(30), || {
        m1.ctl_ok(&["service", "logs", "web"]).contains("image-secret").then_some(())
    });
    let trees = image_dir(&w1_id).join("rootfs");
    assert_eq!(std::fs::read_dir(&trees).unwrap().count(), 1);

    // What a local user reaches: the tasks' path to the tree, read-only and
    // nosuid — nothing planted in the shared tree (even in its 1777 /tmp),
    // nothing listed, and the trees themselves out of reach.
    let exposed = std::fs::read_dir(&trees).unwrap().next().unwrap().unwrap().path();
    let as_nobody = |script: &str| {
        std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "sh", "-c", script])
            .output()
            .unwrap()
    };
    let o = as_nobody(&format!("echo x > {}/tmp/planted", exposed.display()));
    assert!(!o.status.success(), "nobody wrote into the shared tree");
    assert!(String::from_utf8_lossy(&o.stderr).contains("Read-only"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!as_nobody(&format!("ls {}", trees.display())).status.success(), "nobody listed the exposures");
    assert!(!as_nobody(&format!("ls {}", image_dir(&w1_id).join("trees").display())).status.success());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo.lines().find(|l| l.split(' ').nth(4) == exposed.to_str()).expect("the exposure is a mount");
    for flag in ["ro", "nosuid", "nodev"] {
        assert!(line.split(' ').nth(5).unwrap().split(',').any(|f| f == flag), "{flag} missing: {line}");
    }

    // A second task of the image starts from the same tree.
    m1.ctl_ok(&["service", "update", "web", "--replicas", "2"]);
    wait_for("two tasks running", Duration::from_secs(90), || (running_tasks(&m1, "web").len() == 2).then_some(()));
    assert_eq!(std::fs::read_dir(&trees).unwrap().count(), 1, "a second tree was unpacked");

    // Blobs reach only the nodes of the image's live tasks.
    let task = running_tasks(&m1, "web")[0]["id"].as_str().unwrap().to_owned();
    let layer = image["layers"][0]["digest"].as_str().unwrap().to_owned();
    let bytes = fetch_as(&w1.data, &m1, &task, &layer).await.expect("its own task's layer");
    assert_eq!(format!("sha256:{}", hex_sha256(&bytes)), layer);
    assert_eq!(
        fetch_as(&w2.data, &m1, &task, &layer).await.unwrap_err(),
        Code::PermissionDenied,
        "another node's task"
    );
    let other = format!("sha256:{}", "0".repeat(64));
    assert_eq!(fetch_as(&w1.data, &m1, &task, &other).await.unwrap_err(), Code::PermissionDenied, "not of the image");
    // A node holds at most four streams at once: one that stops reading
    // cannot starve the others.
    let id = NodeIdentity::load(&w1.data.join("certs")).unwrap();
    let ch = dial::connect(&m1.addr, Arc::new(client_config(&id).unwrap())).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let req = FetchTaskBlobRequest { task_id: task.clone(), digest: layer.clone() };
        held.push(DispatcherClient::new(ch.clone()).fetch_blob(req).await.expect("a stream"));
    }
    let req = FetchTaskBlobRequest { task_id: task.clone(), digest: layer.clone() };
    let fifth = DispatcherClient::new(ch.clone()).fetch_blob(req).await;
    assert_eq!(fifth.err().map(|s| s.code()), Some(Code::ResourceExhausted));
    drop(held);
    // And never through the managers' own service.
    let wid = NodeIdentity::load(&w2.data.join("certs")).unwrap();
    let ch = dial::connect(&m1.addr, Arc::new(client_config(&wid).unwrap())).await.unwrap();
    let r = ClusterClient::new(ch).fetch_blob(FetchBlobRequest { digest: layer.clone() }).await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
    assert!(
        !image_dir(&w2_id).join("rootfs").exists()
            || std::fs::read_dir(image_dir(&w2_id).join("rootfs")).unwrap().count() == 0
    );

    // Removal is refused while a service uses it, naming the service.
    let o = m1.ctl(&["image", "rm", "busybox:1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("web"), "{err}");
    m1.ctl_ok(&["service", "rm", "web"]);
    assert_eq!(m1.ctl_ok(&["image", "rm", "busybox:1"]).trim(), built);
    assert!(m1.ctl_ok(&["image", "ls", "-q"]).trim().is_empty());
    // A task that stopped leaves no container behind.
    wait_for("web's tasks gone", Duration::from_secs(60), || running_tasks(&m1, "web").is_empty().then_some(()));
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_and_malformed_images_are_refused_and_change_nothing() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let rootfs = env.path("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::write(rootfs.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    let layout = env.path("layout");
    let digest = build_image(&rootfs, &layout, "hello:1");
    // Flip one byte of the layer blob.
    let index: Value = serde_json::from_slice(&std::fs::read(blob_path(&layout, &digest)).unwrap()).unwrap();
    let layer = index["layers"][0]["digest"].as_str().unwrap().to_owned();
    let path = blob_path(&layout, &layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let o = m.ctl(&["image", "load", layout.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&layer) && err.contains("hashes to"), "{err}");
    assert!(m.ctl_ok(&["image", "ls", "-q"]).trim().is_empty());
    assert!(!m.data.join("blobs/sha256").join(layer.trim_start_matches("sha256:")).exists());

    // A client that skips secretctl's own check meets the manager's.
    let manifest = std::fs::read(blob_path(&layout, &digest)).unwrap();
    let config_digest = index["config"]["digest"].as_str().unwrap();
    let config = std::fs::read(blob_path(&layout, config_digest)).unwrap();
    let header = |name: &str| LoadImageChunk {
        part: Some(Part::Header(LoadImageHeader {
            manifest: manifest.clone(),
            config: config.clone(),
            name: name.into(),
            platform: String::new(),
        })),
    };
    let data = |b: &[u8]| LoadImageChunk { part: Some(Part::Data(b.to_vec().into())) };
    let channel = swarmd::secretctl::connect(&swarmd::secretctl::Host::Unix(m.socket())).await.unwrap();
    let mut client = ControlClient::new(channel);
    let cases: Vec<(&str, Vec<LoadImageChunk>, &str)> = vec![
        ("a tampered layer", vec![header("x:1"), data(&bytes)], "hashes to"),
        ("a short layer", vec![header("x:1"), data(&bytes[..10])], "ended after"),
        ("no header", vec![data(&bytes)], "starts with its header"),
        ("a bad name", vec![header("x 1")], "no spaces"),
        (
            "bytes beyond the layers",
            vec![
                header("x:1"),
                data(&{
                    let mut b = bytes.clone();
                    b[mid] ^= 0xff;
                    b.push(0);
                    b
                }),
            ],
            "more bytes",
        ),
        (
            "a config that is not the manifest's",
            vec![LoadImageChunk {
                part: Some(Part::Header(LoadImageHeader {
                    manifest: manifest.clone(),
                    config: b"{}".to_vec(),
                    ..Default::default()
                })),
            }],
            "descriptor says",
        ),
    ];
    for (what, chunks, expect) in cases {
        let s = client.load_image(tokio_stream::iter(chunks)).await.expect_err(what);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(s.message().contains(expect), "{what}: {}", s.message());
        assert!(m.ctl_ok(&["image", "ls", "-q"]).trim().is_empty(), "{what}");
    }
    let left: Vec<_> =
        std::fs::read_dir(m.data.join("blobs/sha256")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "blobs a refused load left: {left:?}");
}

fn blob_path(layout: &std::path::Path, digest: &str) -> std::path::PathBuf {
    layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

#[tokio::test(flavor = "multi_thread")]
async fn images_survive_a_restart_a_snapshot_and_a_manager_that_joins_later() {
    let mut env = Env::new();
    let mut m1 = env.start_manager("m1", &["--snapshot-interval", "1000"]);
    let rootfs = env.path("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::write(rootfs.join("bin/hello"), vec![7u8; 300_000]).unwrap();
    let layout = env.path("layout");
    let digest = build_image(&rootfs, &layout, "hello:1");
    assert_eq!(m1.ctl_ok(&["image", "load", layout.to_str().unwrap()]).trim(), digest);
    // Signed by a trusted key: the signature must come through too.
    let key = env.path("k.pem");
    let public = env.path("k.pub");
    let openssl = |args: &[&str]| assert!(std::process::Command::new("openssl").args(args).status().unwrap().success());
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key.to_str().unwrap()]);
    openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    m1.ctl_ok(&["trust", "key", "add", "k", public.to_str().unwrap()]);
    m1.ctl_ok(&["image", "sign", "hello:1", "--key", key.to_str().unwrap()]);
    let image = image_json(&m1, "hello:1").unwrap();
    assert_eq!(image["signatures"][0]["key"], "k");

    // Past a snapshot (the log behind it compacted), then a restart, which
    // keeps the record and the blobs.
    fill_log(&m1, 1_100, 16).await;
    wait_snapshot_covering(&m1, 900);
    let exit = env.proc(m1.proc_idx).terminate();
    assert!(exit.success(), "{exit:?}");
    m1.proc_idx = env.run_node(&m1.name, &m1.data);
    let back = wait_for("m1 back", DEADLINE, || image_json(&m1, "hello:1"));
    assert_eq!(back["signatures"], image["signatures"]);
    for b in blobs_of(&image) {
        assert!(blob_file(&m1, &b).is_file());
    }

    // A new manager catches up through the snapshot and fetches the blobs from m1.
    let m2 = env.start_manager_join("m2", &m1.token("manager"), &m1, &[]);
    wait_for("m2 to have joined", DEADLINE, || m2.data.join("manager.json").exists().then_some(()));
    let m2_id = m2.node_id();
    let held = wait_for("m2 to hold the image", Duration::from_secs(120), || {
        let i = image_json(&m2, &digest)?;
        i["holders"].as_array()?.iter().any(|h| h == m2_id.as_str()).then_some(i)
    });
    assert_eq!(held["names"][0], "hello:1");
    assert_eq!(held["signatures"], image["signatures"], "the signature did not come through");
    let log = env.procs[m2.proc_idx].log_text();
    assert!(log.contains("installed a snapshot"), "m2 was not brought up through a snapshot");
    for b in blobs_of(&image) {
        let f = blob_file(&m2, &b);
        assert!(f.is_file(), "m2 lacks {b}");
        assert_eq!(format!("sha256:{}", hex_sha256(&std::fs::read(&f).unwrap())), b);
    }
}
