//! Issue 15: root CA rotation without downtime (`secretctl ca rotate`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Runs `secretctl ca rotate ARGS` against `m`, failing (not hanging) past `deadline`.
fn rotate(m: &Manager, args: &[&str], deadline: Duration) -> std::process::Output {
    let mut child = Command::new(secretctl_bin())
        .arg("--host")
        .arg(format!("unix://{}", m.socket().display()))
        .args(["ca", "rotate"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("ca rotate did not finish in {deadline:?}: {}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// `openssl verify -CAfile ROOT CERT` (the leaf alone: no intermediates).
fn verifies(root_pem: &str, cert: &Path, scratch: &Path) -> bool {
    let root = scratch.join("verify-root.pem");
    std::fs::write(&root, root_pem).unwrap();
    let leaf = scratch.join("verify-leaf.pem");
    let text = std::fs::read_to_string(cert).unwrap();
    let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
    std::fs::write(&leaf, &text[..end.min(text.len())]).unwrap();
    Command::new("openssl")
        .args(["verify", "-CAfile", root.to_str().unwrap(), leaf.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn openssl(args: &[&str]) {
    let o = Command::new("openssl").args(args).output().unwrap();
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// The "done when": 3 managers and 2 workers under a stream of secret
/// writes; `ca rotate` (showing progress) finishes with every node's
/// certificate verifying against the new root alone and every node trusting
/// only it; no write failed and every acknowledged one is there; no worker's
/// session dropped; the old join token is refused and a new worker joins with
/// the new one.
#[test]
fn a_rotation_under_writes_converges_every_node_and_changes_the_tokens() {
    let mut env = Env::new();
    let ([m1, m2, m3], _) = env.three_managers(&[]);
    let old_worker_token = m1.token("worker");
    let old_manager_token = m1.token("manager");
    let w1 = env.join_worker("w1", &old_worker_token, &m1.addr);
    let w2 = env.join_worker("w2", &old_worker_token, &m2.addr);
    m1.wait_ready(5);
    let old_root = m1.ctl_ok(&["ca", "show"]);

    // A stream of writes through a follower-or-leader, all the rotation long.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, sock) = (stop.clone(), m2.socket());
        std::thread::spawn(move || {
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("rot{i}");
                let mut child = Command::new(secretctl_bin())
                    .arg("--host")
                    .arg(format!("unix://{}", sock.display()))
                    .args(["create", &name, "-"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                use std::io::Write;
                child.stdin.take().unwrap().write_all(format!("value {i}").as_bytes()).unwrap();
                let out = child.wait_with_output().unwrap();
                if out.status.success() {
                    acked.push(name);
                } else {
                    failed.push(format!("{name}: {}", String::from_utf8_lossy(&out.stderr)));
                }
                i += 1;
            }
            (acked, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    let out = rotate(&m1, &[], Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("nodes converged"), "no progress shown: {text}");
    assert!(text.contains("root CA rotated"), "{text}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.join().unwrap();
    assert!(failed.is_empty(), "writes failed during the rotation: {failed:?}");
    assert!(acked.len() > 3, "too few writes to mean anything: {}", acked.len());
    let listed = m3.ctl_ok(&["ls"]);
    for name in &acked {
        assert!(listed.contains(name.as_str()), "acknowledged secret {name} lost");
    }

    let new_root = m1.ctl_ok(&["ca", "show"]);
    assert_ne!(new_root, old_root);
    let v: serde_json::Value = serde_json::from_str(&m1.ctl_ok(&["--format", "json", "ca", "show"])).unwrap();
    assert!(v["rotation"].is_null(), "{v}");
    let scratch = env.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let data_dirs = [&m1.data, &m2.data, &m3.data, &w1.data, &w2.data];
    for dir in data_dirs {
        // Nodes learn the new bundle from their session or their own state.
        wait_for(&format!("{} to trust only the new root", dir.display()), DEADLINE, || {
            (std::fs::read_to_string(dir.join("certs/ca.crt")).unwrap() == new_root).then_some(())
        });
        let cert = dir.join("certs/node.crt");
        assert!(verifies(&new_root, &cert, &scratch), "{} does not verify against the new root", cert.display());
        assert!(!verifies(&old_root, &cert, &scratch), "{} still verifies against the old root", cert.display());
    }
    // All five stay ready; no worker lost its session along the way.
    m1.wait_ready(5);
    for w in [&w1, &w2] {
        let log = env.proc(w.proc_idx).log_text();
        assert_eq!(log.matches("session established").count(), 1, "{} lost its session:\n{log}", w.name);
    }

    // Both old tokens are refused, with a line that says why.
    for (name, token) in [("old-w", &old_worker_token), ("old-m", &old_manager_token)] {
        let refused = env.join_worker(name, token, &m1.addr);
        let status =
            wait_for(&format!("{name} to give up"), DEADLINE, || env.proc(refused.proc_idx).child.try_wait().unwrap());
        assert!(!status.success());
        let log = env.proc(refused.proc_idx).log_text();
        assert!(log.contains("before a root CA rotation"), "{log}");
    }
    let new_token = m1.token("worker");
    assert_ne!(new_token, old_worker_token);
    let w3 = env.join_worker("w3", &new_token, &m3.addr);
    m1.wait_ready(6);
    assert!(verifies(&new_root, &w3.data.join("certs/node.crt"), &scratch));
}

/// An operator's own root (made with openssl) as the new root, after a
/// detached rotation toward a generated one: rotating again starts over toward
/// the newest, and the cluster ends on the operator's root. A certificate that
/// is not a CA, or a key that is not the certificate's, is refused and nothing
/// starts.
#[test]
fn a_rotation_to_an_operators_root_starts_over_a_running_one() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let w = env.join_worker("w1", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let dir = env.path("org");
    std::fs::create_dir_all(&dir).unwrap();
    let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("k.sec1")]);
    openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", &p("k.sec1"), "-out", &p("root.key")]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("root.key"),
        "-subj",
        "/CN=Example Org Root/O=Example",
        "-days",
        "365",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        &p("root.pem"),
    ]);
    // A leaf (not a CA) and a mismatched key are refused; nothing starts.
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("other.sec1")]);
    openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", &p("other.sec1"), "-out", &p("other.key")]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("other.key"),
        "-subj",
        "/CN=leaf",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-out",
        &p("leaf.pem"),
    ]);
    for (cert, key, why) in [("leaf.pem", "other.key", "not a CA"), ("root.pem", "other.key", "does not belong")] {
        let out = rotate(&m, &["--ca-cert", &p(cert), "--ca-key", &p(key)], DEADLINE);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
        let v: serde_json::Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "ca", "show"])).unwrap();
        assert!(v["rotation"].is_null(), "a refused rotation started: {v}");
    }

    // The worker, stopped (still READY for a few heartbeats), holds the
    // detached rotation open: it cannot renew.
    let pid = env.proc(w.proc_idx).pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let out = rotate(&m, &["--detach"], DEADLINE);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let show =
        || -> serde_json::Value { serde_json::from_str(&m.ctl_ok(&["--format", "json", "ca", "show"])).unwrap() };
    let first = wait_for("the manager to converge", DEADLINE, || {
        let v = show();
        (v["rotation"]["converged"].as_array()?.len() == 1).then_some(v)
    });
    assert_eq!(first["rotation"]["unconverged"][0], w.node_id().as_str(), "{first}");
    let generated = first["rotation"]["target_sha256"].as_str().unwrap().to_owned();
    let rotating = {
        let sock = m.socket();
        let (cert, key) = (p("root.pem"), p("root.key"));
        std::thread::spawn(move || {
            Command::new(secretctl_bin())
                .arg("--host")
                .arg(format!("unix://{}", sock.display()))
                .args(["ca", "rotate", "--ca-cert", &cert, "--ca-key", &key])
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };
    // Started over: toward the operator's root, nobody converged yet.
    wait_for("the rotation to start over", DEADLINE, || {
        let v = show();
        (v["rotation"]["target_sha256"].as_str()? != generated).then_some(())
    });
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let start = Instant::now();
    while !rotating.is_finished() {
        assert!(start.elapsed() < Duration::from_secs(120), "ca rotate did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = rotating.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let org_root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    assert_eq!(m.ctl_ok(&["ca", "show"]), org_root);
    wait_for("the worker to trust only the operator's root", DEADLINE, || {
        (std::fs::read_to_string(w.data.join("certs/ca.crt")).unwrap() == org_root).then_some(())
    });
    for d in [&m.data, &w.data] {
        assert!(verifies(&org_root, &d.join("certs/node.crt"), &dir), "{}", d.display());
    }
    m.wait_ready(2);
    // A node joins with the new token, pinned to the operator's root.
    let w2 = env.join_worker("w2", &m.token("worker"), &m.addr);
    m.wait_ready(3);
    assert!(verifies(&org_root, &w2.data.join("certs/node.crt"), &dir));
}

/// A worker that was off for a whole rotation trusts only the old root, and
/// its certificate was signed by it: as it starts it verifies the new root
/// through the old root's cross-signature, recovers its certificate (no token)
/// and comes back ready under the new root.
#[test]
fn a_node_that_was_off_during_a_rotation_converges_when_it_returns() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let token = m.token("worker");
    let w1 = env.join_worker("w1", &token, &m.addr);
    let w2 = env.join_worker("w2", &token, &m.addr);
    m.wait_ready(3);
    let id2 = w2.node_id();
    env.proc(w2.proc_idx).terminate();
    wait_for("w2 to be down", Duration::from_secs(60), || m.node(&id2).filter(|n| n["status"] == "down").map(|_| ()));
    let out = rotate(&m, &[], Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_root = m.ctl_ok(&["ca", "show"]);
    assert_ne!(std::fs::read_to_string(w2.data.join("certs/ca.crt")).unwrap(), new_root);

    let back = env.run_node("w2-back", &w2.data);
    m.wait_ready(3);
    assert_eq!(std::fs::read_to_string(w2.data.join("certs/ca.crt")).unwrap(), new_root);
    let scratch = env.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert!(verifies(&new_root, &w2.data.join("certs/node.crt"), &scratch));
    assert!(env.proc(back).log_text().contains("recovered"), "{}", env.proc(back).log_text());
    let _ = w1;
}
