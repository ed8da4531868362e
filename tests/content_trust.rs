//! Content trust end to end, with keys and a signature made by `openssl`
//! (not by swarmd's code): unsigned images, tampered signatures and keys out
//! of scope are refused with a message naming the keys tried; a signed image
//! runs under `--content-trust required`; removing the key stops new tasks
//! (with the reason in `service ps`) and leaves the running one alone.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn openssl(args: &[&str]) {
    let o = Command::new("openssl").args(args).output().expect("openssl");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A P-256 key pair made by openssl: (private PKCS#8 PEM, public PEM).
fn keypair(dir: &Path, name: &str) -> (String, String) {
    let (key, public) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.pub")));
    let (k, p) = (key.to_str().unwrap(), public.to_str().unwrap());
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", k]);
    openssl(&["pkey", "-in", k, "-pubout", "-out", p]);
    (k.to_owned(), p.to_owned())
}

/// Signs `payload` with openssl; the base64 signature file.
fn openssl_sign(key: &str, payload: &Path) -> std::path::PathBuf {
    let der = payload.with_extension("der");
    openssl(&["dgst", "-sha256", "-sign", key, "-out", der.to_str().unwrap(), payload.to_str().unwrap()]);
    let b64 = payload.with_extension("sig");
    let o = Command::new("base64").arg("-w0").arg(&der).output().unwrap();
    std::fs::write(&b64, o.stdout).unwrap();
    b64
}

fn err(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "unexpected success: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tasks(m: &Manager, service: &str) -> Vec<Value> {
    let o = m.ctl(&["--format", "json", "service", "ps", service]);
    serde_json::from_slice(&o.stdout).unwrap_or_default()
}

#[test]
fn only_images_signed_by_a_trusted_key_in_scope_run() {
    if !can_run_containers("content_trust::only_images_signed_by_a_trusted_key_in_scope_run") {
        return;
    }
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--heartbeat", "1s", "--content-trust", "required"]);
    let _w = env.join_worker("w1", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let dir = env.path("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let (k1, k1_pub) = keypair(&dir, "k1");
    let (k2, k2_pub) = keypair(&dir, "k2");

    let app = busybox_image(&env, &m);
    let digest = m.ctl_ok(&["image", "ls", "-q"]).trim().to_owned();
    let create = |name: &str, image: &str| {
        m.ctl(&["service", "create", name, "--image", image, "--", "sh", "-c", "echo up; sleep 3600"])
    };

    // Unsigned, and no key trusted: refused, saying so.
    let e = err(&create("web", &app));
    assert!(e.contains("content trust") && e.contains("no signature") && e.contains("no key is trusted"), "{e}");

    // A signature made by openssl over a cosign payload.
    m.ctl_ok(&["trust", "key", "add", "k1", &k1_pub, "--scope", "busybox"]);
    let payload = dir.join("payload.json");
    let body = format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"busybox"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
    );
    std::fs::write(&payload, body).unwrap();
    let sig = openssl_sign(&k1, &payload);
    // Tampered first: one byte of the DER flipped.
    let der = dir.join("payload.der");
    let mut bytes = std::fs::read(&der).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x01;
    std::fs::write(dir.join("bad.der"), &bytes).unwrap();
    let o = Command::new("base64").arg("-w0").arg(dir.join("bad.der")).output().unwrap();
    std::fs::write(dir.join("bad.sig"), o.stdout).unwrap();
    let (p, bad) = (payload.to_str().unwrap(), dir.join("bad.sig"));
    let e = err(&m.ctl(&["trust", "signature", "add", &app, "--payload", p, "--signature", bad.to_str().unwrap()]));
    assert!(e.contains("not verified by any trusted key") && e.contains("k1"), "{e}");
    let inspect: Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "image", "inspect", &app])).unwrap();
    assert_eq!(inspect["signatures"].as_array().unwrap().len(), 0, "a refused signature was kept: {inspect}");
    let e = err(&create("web", &app));
    assert!(e.contains("no signature") && e.contains("k1 (scope busybox)"), "{e}");

    m.ctl_ok(&["trust", "signature", "add", &app, "--payload", p, "--signature", sig.to_str().unwrap()]);
    let inspect: Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "image", "inspect", &app])).unwrap();
    assert_eq!(inspect["signatures"][0]["key"], "k1", "{inspect}");

    // Another image, signed by a key whose scope does not cover it.
    let other_root = env.path("other-rootfs");
    busybox_rootfs(&other_root);
    std::fs::write(other_root.join("etc/other"), "other").unwrap();
    let other = load_rootfs(&env, &m, &other_root, "other:1");
    m.ctl_ok(&["trust", "key", "add", "k2", &k2_pub, "--scope", "acme/*"]);
    let e = err(&m.ctl(&["image", "sign", &other, "--key", &k2]));
    assert!(e.contains("does not cover") && e.contains("k2 (scope acme/*)"), "{e}");
    // Its holder writes a repository in scope into the payload: kept, but it
    // vouches for acme/anything, not for the name the service uses.
    m.ctl_ok(&["image", "sign", &other, "--key", &k2, "--repository", "acme/anything"]);
    let e = err(&create("other", &other));
    assert!(e.contains("(for acme/anything) is for other") && e.contains("k2 (scope acme/*)"), "{e}");
    // A payload for another image is refused outright.
    let e = err(&m.ctl(&["trust", "signature", "add", &other, "--payload", p, "--signature", sig.to_str().unwrap()]));
    assert!(e.contains("the payload signs"), "{e}");

    // The openssl-signed image runs.
    let o = create("web", &app);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = wait_for("web running", Duration::from_secs(90), || {
        tasks(&m, "web").into_iter().find(|t| t["state"] == "running")
    });

    // The key goes: the running task stays, a new one is refused with the reason.
    m.ctl_ok(&["trust", "key", "rm", "k1"]);
    m.ctl_ok(&["service", "update", "web", "--replicas", "2"]);
    let refused = wait_for("the new task refused", Duration::from_secs(90), || {
        tasks(&m, "web").into_iter().find(|t| t["message"].as_str().is_some_and(|s| s.contains("content trust")))
    });
    assert!(refused["message"].as_str().unwrap().contains("not trusted"), "{refused}");
    let still = tasks(&m, "web").into_iter().find(|t| t["id"] == first["id"]).unwrap();
    assert_eq!(still["state"], "running", "{still}");

    // Off again: any image the cluster holds runs, and a directory where allowed.
    m.ctl_ok(&["cluster", "update", "--content-trust", "off"]);
    let o = create("other", &other);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    m.ctl_ok(&["cluster", "update", "--allow-host-rootfs=true"]);
    let dir = env.path("busybox-rootfs");
    let o = create("dir", dir.to_str().unwrap());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for("dir running", Duration::from_secs(90), || tasks(&m, "dir").into_iter().find(|t| t["state"] == "running"));
    // Required again: the directory service's new tasks are refused on the worker.
    m.ctl_ok(&["cluster", "update", "--content-trust", "required"]);
    m.ctl_ok(&["service", "update", "dir", "--replicas", "2"]);
    let refused = wait_for("the directory's new task refused", Duration::from_secs(90), || {
        tasks(&m, "dir").into_iter().find(|t| t["message"].as_str().is_some_and(|s| s.contains("content trust")))
    });
    assert_eq!(refused["state"], "rejected", "{refused}");
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `bytes` as a blob of `layout`; its descriptor fields.
fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = sha256_hex(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

#[test]
fn cosign_signatures_stored_in_a_layout_are_imported_with_the_image() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let dir = env.path("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let (k1, k1_pub) = keypair(&dir, "k1");
    let (stranger, _) = keypair(&dir, "stranger");
    m.ctl_ok(&["trust", "key", "add", "k1", &k1_pub]);
    let rootfs = env.path("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/hello"), "hi").unwrap();
    let layout = env.path("layout");
    let digest = build_image(&rootfs, &layout, "hello:1");

    // What `cosign sign` stores beside an image, as `skopeo copy` brings it into a layout:
    // a manifest tagged sha256-<hex>.sig whose layers are signed payloads.
    let payload = dir.join("payload.json");
    std::fs::write(
        &payload,
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"hello"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        ),
    )
    .unwrap();
    let mut layers = Vec::new();
    for key in [&k1, &stranger] {
        let sig = std::fs::read_to_string(openssl_sign(key, &payload)).unwrap();
        let (d, n) = put_blob(&layout, &std::fs::read(&payload).unwrap());
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": d, "size": n,
            "annotations": {"dev.cosignproject.cosign/signature": sig}
        }));
    }
    let (cd, cn) = put_blob(&layout, b"{}");
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": layers,
    });
    let (md, mn) = put_blob(&layout, &serde_json::to_vec(&manifest).unwrap());
    let index_path = layout.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
    index["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
        "annotations": {"org.opencontainers.image.ref.name": tag}
    }));
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();

    let o = m.ctl(&["image", "load", layout.to_str().unwrap(), "--name", "hello:1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), digest);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("imported a cosign signature"), "{stderr}");
    assert!(stderr.contains("not imported") && stderr.contains("not verified by any trusted key"), "{stderr}");
    let inspect: Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "image", "inspect", "hello:1"])).unwrap();
    assert_eq!(inspect["digest"], digest.as_str(), "image inspect shows the digest as `digest`");
    let sigs = inspect["signatures"].as_array().unwrap();
    assert_eq!((sigs.len(), &sigs[0]["key"], &sigs[0]["repository"]), (1, &Value::from("k1"), &Value::from("hello")));
}
