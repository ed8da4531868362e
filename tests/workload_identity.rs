//! Workload identities end to end, with real runc containers (root, runc and
//! busybox: skipped loudly without them, mandatory under
//! SWARMD_REQUIRE_ROOT/SWARMD_REQUIRE_RUNC=1).
//!
//! Two services on two workers do mutual TLS with each other using only
//! `/run/secrets/identity/{cert,key,bundle}.pem`: the host's `openssl` binary
//! (and the shared libraries it needs) is copied into the busybox image and
//! runs *inside* the containers — `s_server` in one task, `s_client` in the
//! other. The test then checks the files from the host (URI SAN, verify
//! against the bundle, owners and modes), that a worker cannot get an
//! identity for another node's task, an ended task or with a bad CSR, that a
//! workload certificate is refused as a node certificate at the manager, that
//! a short-lived identity is renewed in place while its task runs, and that
//! the identity is gone once the task ends.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use swarmd_certs::tls::client_config;
use swarmd_certs::{dial, NodeIdentity};
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::{IssueTaskIdentityRequest, SessionRequest};
use tonic::Code;

fn tasks(m: &Manager, service: &str) -> Vec<Value> {
    let o = m.ctl(&["--format", "json", "service", "ps", service]);
    serde_json::from_slice::<Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn running_task(m: &Manager, service: &str) -> Option<Value> {
    tasks(m, service).into_iter().find(|t| t["desired"] == "running" && t["state"] == "running")
}

fn logs(m: &Manager, service: &str) -> String {
    m.ctl_ok(&["service", "logs", service])
}

fn cluster_id(m: &Manager) -> String {
    info(m).expect("secretctl info")["cluster_id"].as_str().unwrap().to_owned()
}

/// Where a worker keeps task `task`'s tmpfs (`SWARMD_RUN_DIR`, default /run/swarmd).
fn task_dir(node: &str, task: &str) -> PathBuf {
    let run = PathBuf::from(std::env::var("SWARMD_RUN_DIR").unwrap_or_else(|_| "/run/swarmd".into()));
    run.join(node).join("tasks").join(task)
}

fn identity_dir(node: &str, task: &str) -> PathBuf {
    task_dir(node, task).join("secrets/identity")
}

fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl").args(args).output().expect("openssl")
}

/// A busybox image with the host's `openssl` and the libraries it loads,
/// at the same paths (so the dynamic loader finds them).
fn image_with_openssl(env: &Env) -> Result<PathBuf, String> {
    let image = busybox_rootfs(&env.path("openssl-rootfs"));
    let bin = String::from_utf8_lossy(&Command::new("sh").args(["-c", "command -v openssl"]).output().unwrap().stdout)
        .trim()
        .to_owned();
    if bin.is_empty() {
        return Err("needs openssl".into());
    }
    let ldd = Command::new("ldd").arg(&bin).output().map_err(|e| format!("needs ldd: {e}"))?;
    let mut files = vec![PathBuf::from(&bin)];
    for l in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        if let Some(p) = l.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in &files {
        let to = image.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f, &to).map_err(|e| format!("copy {}: {e}", f.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for tool in ["printf", "sleep", "cat", "sha256sum"] {
        let _ = std::os::unix::fs::symlink("busybox", image.join("bin").join(tool));
    }
    Ok(image)
}

fn skip(test: &str, why: &str) {
    if std::env::var("SWARMD_REQUIRE_RUNC").is_ok_and(|v| v == "1") {
        panic!("{test}: {why}");
    }
    eprintln!("\n!!!!! SKIPPED {test}: {why}\n");
}

/// One manager (1 s heartbeats, `extra` flags), workers A and B.
fn cluster(extra: &[&str]) -> (Env, Manager, Worker, Worker) {
    let mut env = Env::new();
    let mut flags = vec!["--heartbeat", "1s"];
    flags.extend_from_slice(extra);
    let m = env.start_manager("m1", &flags);
    let token = m.token("worker");
    let a = env.join_worker("wa", &token, &m.addr);
    let b = env.join_worker("wb", &token, &m.addr);
    m.wait_ready(3);
    (env, m, a, b)
}

/// Creates service `name` with one task on `node`, host network, running `script`.
fn service_on(m: &Manager, name: &str, image: &str, node: &str, script: &str) -> Value {
    let constraint = format!("node.id=={node}");
    let args = ["service", "create", name, "--image", image, "--network", "host", "--constraint", &constraint];
    let mut args = args.to_vec();
    args.extend(["--", "sh", "-c", script]);
    m.ctl_ok(&args);
    let t = wait_for(&format!("{name} to run"), Duration::from_secs(60), || running_task(m, name));
    assert_eq!(t["node_id"], node);
    t
}

/// `openssl x509 -text` of a PEM file.
fn x509_text(pem: &Path) -> String {
    let o = openssl(&["x509", "-noout", "-text", "-in", pem.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn two_services_do_mutual_tls_with_their_identities_only_and_lose_them_when_they_end() {
    let test = "workload_identity::two_services_do_mutual_tls_with_their_identities_only_and_lose_them_when_they_end";
    if !can_run_containers(test) {
        return;
    }
    let (env, m, a, b) = cluster(&[]);
    let image = match image_with_openssl(&env) {
        Ok(rootfs) => load_rootfs(&env, &m, &rootfs, "openssl:1"),
        Err(why) => return skip(test, &why),
    };
    let (a_id, b_id) = (a.node_id(), b.node_id());
    let cluster = cluster_id(&m);
    let port = free_port();
    let files = "-cert /run/secrets/identity/cert.pem -key /run/secrets/identity/key.pem \
                 -CAfile /run/secrets/identity/bundle.pem -verify_return_error";
    // Alpha serves TLS and demands a client certificate that chains to the bundle.
    let server =
        format!("while true; do openssl s_server -accept 127.0.0.1:{port} {files} -Verify 1 -www; sleep 1; done");
    let alpha = service_on(&m, "alpha", &image, &a_id, &server);
    // Beta connects with its own identity; the page alpha serves back shows
    // the client certificate alpha verified.
    let client = format!(
        "while true; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect 127.0.0.1:{port} {files} \
         -quiet -brief >/tmp/out 2>/tmp/err; rc=$?; grep -E 'Peer certificate|Verification' /tmp/err; \
         grep -E 'HTTP/1.0 200|Subject:|URI:' /tmp/out; echo \"mtls rc=$rc\"; sleep 2; done"
    );
    let beta = service_on(&m, "beta", &image, &b_id, &client);
    let (alpha_task, beta_task) = (alpha["id"].as_str().unwrap(), beta["id"].as_str().unwrap());

    let out = wait_for("beta's mTLS exchange with alpha", Duration::from_secs(60), || {
        let l = logs(&m, "beta");
        l.contains("mtls rc=0").then_some(l)
    });
    // Beta verified alpha's certificate against the bundle; alpha verified
    // beta's and saw its SPIFFE ID.
    for want in [
        format!("Peer certificate: CN = {alpha_task}, OU = swarm-workload"),
        "Verification: OK".to_string(),
        "HTTP/1.0 200 ok".to_string(),
        format!("Subject: CN={beta_task}, OU=swarm-workload"),
        format!("URI:spiffe://{cluster}/service/beta"),
    ] {
        assert!(out.contains(&want), "missing {want:?} in beta's output:\n{out}");
    }

    // The files as the host sees them in alpha's tmpfs.
    let dir = identity_dir(&a_id, alpha_task);
    let (cert, key, bundle) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("bundle.pem"));
    let text = x509_text(&cert);
    assert!(text.contains(&format!("URI:spiffe://{cluster}/service/alpha")), "{text}");
    assert!(text.contains(&format!("Subject: CN = {alpha_task}, OU = swarm-workload")), "{text}");
    assert!(!text.contains("DNS:"), "a DNS SAN in a workload certificate:\n{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    let o = openssl(&["verify", "-CAfile", bundle.to_str().unwrap(), cert.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    // The bundle is the cluster's root, as GetRootCa serves it.
    let root = std::fs::read_to_string(m.data.join("certs/ca.crt")).unwrap();
    assert_eq!(std::fs::read_to_string(&bundle).unwrap(), root);
    // Lifetime: the default hour.
    let dates = String::from_utf8_lossy(
        &openssl(&["x509", "-noout", "-checkend", "3300", "-in", cert.to_str().unwrap()]).stdout,
    )
    .into_owned();
    assert!(dates.contains("will not expire"), "{dates}");
    assert!(openssl(&["x509", "-noout", "-checkend", "3700", "-in", cert.to_str().unwrap()]).status.code() == Some(1));
    // key.pem: 0400, the task's user (65534 in its user namespace: base + 65534
    // on the host); the tmpfs root is 0700 root, so no other host user reaches it.
    let km = std::fs::metadata(&key).unwrap();
    assert_eq!(km.permissions().mode() & 0o7777, 0o400);
    assert_ne!(km.uid(), 0);
    assert_eq!(km.uid() % 65536, 65534, "key owner {}", km.uid());
    let root_mode = std::fs::metadata(task_dir(&a_id, alpha_task)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(root_mode, 0o700);
    // A client without a certificate is refused by alpha.
    let bare = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect 127.0.0.1:{port} -CAfile {} -quiet 2>&1",
            bundle.display()
        ))
        .output()
        .unwrap();
    let bare = String::from_utf8_lossy(&bare.stdout);
    assert!(!bare.contains("HTTP/1.0 200"), "a client without a certificate was served:\n{bare}");

    // The tasks end: their identities are wiped with their tmpfs.
    m.ctl_ok(&["service", "rm", "alpha"]);
    m.ctl_ok(&["service", "rm", "beta"]);
    for (node, task) in [(&a_id, alpha_task), (&b_id, beta_task)] {
        wait_for("the task's tmpfs to go", Duration::from_secs(60), || {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let mounted = mounts.lines().any(|l| l.contains(task));
            (!mounted && !task_dir(node, task).exists()).then_some(())
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_gets_identities_for_its_own_live_tasks_only() {
    let test = "workload_identity::a_worker_gets_identities_for_its_own_live_tasks_only";
    if !can_run_containers(test) {
        return;
    }
    swarmd_certs::install_crypto_provider();
    let (env, m, a, b) = cluster(&[]);
    let image = busybox_image(&env, &m);
    let (a_id, b_id) = (a.node_id(), b.node_id());
    let mine = service_on(&m, "mine", &image, &a_id, "while true; do sleep 1; done");
    let theirs = service_on(&m, "theirs", &image, &b_id, "while true; do sleep 1; done");
    let (mine, theirs) = (mine["id"].as_str().unwrap().to_owned(), theirs["id"].as_str().unwrap().to_owned());

    // A's own certificate, from its data dir, on a raw client.
    let wid = NodeIdentity::load(&a.data.join("certs")).unwrap();
    let ch = dial::connect(&m.addr, Arc::new(client_config(&wid).unwrap())).await.unwrap();
    let ask = |task: &str, csr: String| {
        let ch = ch.clone();
        let req = IssueTaskIdentityRequest { task_id: task.to_owned(), csr_pem: csr };
        async move { DispatcherClient::new(ch).issue_task_identity(req).await }
    };
    let csr = || swarmd_certs::generate_key_and_csr().unwrap().1;

    // Another node's live task: PERMISSION_DENIED, nothing issued.
    let e = ask(&theirs, csr()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not a live task"), "{}", e.message());
    // Its own live task: issued (the control that the request was well formed).
    let (key, own_csr) = swarmd_certs::generate_key_and_csr().unwrap();
    let ok = ask(&mine, own_csr).await.unwrap().into_inner();
    let cert = swarmd_certs::workload::check_issued(&ok.certificate_pem, &key, &mine).unwrap();
    assert_eq!(cert.spiffe_id, format!("spiffe://{}/service/mine", cluster_id(&m)));
    // Bad requests: malformed task ID, a CSR for a P-384 key, an oversized CSR.
    assert_eq!(ask("nope", csr()).await.unwrap_err().code(), Code::InvalidArgument);
    let p384 = {
        let k = rcgen_p384_csr();
        ask(&mine, k).await.unwrap_err()
    };
    assert_eq!(p384.code(), Code::InvalidArgument, "{p384:?}");
    assert!(p384.message().contains("P-256"), "{}", p384.message());
    assert_eq!(ask(&mine, "A".repeat(20_000)).await.unwrap_err().code(), Code::InvalidArgument);
    // A manager's certificate runs no tasks: refused by role.
    let mid = NodeIdentity::load(&m.data.join("certs")).unwrap();
    let mch = dial::connect(&m.addr, Arc::new(client_config(&mid).unwrap())).await.unwrap();
    let req = IssueTaskIdentityRequest { task_id: mine.clone(), csr_pem: csr() };
    assert_eq!(DispatcherClient::new(mch).issue_task_identity(req).await.unwrap_err().code(), Code::PermissionDenied);

    // The workload certificate presented as a node certificate: refused at
    // the handshake, so no RPC of the manager's answers it.
    let wl = workload_client_config(&ok.certificate_pem, &key, &ok.bundle_pem);
    match dial::connect(&m.addr, Arc::new(wl)).await {
        Err(_) => {}
        Ok(ch) => {
            let r = DispatcherClient::new(ch.clone()).session(SessionRequest { hostname: "x".into() }).await;
            assert!(r.is_err(), "a workload certificate opened a session");
            let req = IssueTaskIdentityRequest { task_id: mine.clone(), csr_pem: csr() };
            assert!(DispatcherClient::new(ch).issue_task_identity(req).await.is_err());
        }
    }

    // `identity` is reserved below /run/secrets: a secret cannot take it.
    assert!(m.ctl_stdin(&["create", "identity"], b"v").status.success());
    let img = image.as_str();
    for spec in ["identity", "identity,target=/run/secrets/identity"] {
        let o = m.ctl(&["service", "create", "clash", "--image", img, "--secret", spec, "--", "true"]);
        assert!(!o.status.success(), "{spec} was accepted");
        assert!(String::from_utf8_lossy(&o.stderr).contains("reserved"), "{}", String::from_utf8_lossy(&o.stderr));
    }
    m.ctl_ok(&["service", "create", "fine", "--image", img, "--secret", "identity,target=id", "--", "true"]);

    // An ended task: refused too.
    m.ctl_ok(&["service", "rm", "mine"]);
    wait_for("mine's task to end", Duration::from_secs(60), || tasks(&m, "mine").is_empty().then_some(()));
    assert_eq!(ask(&mine, csr()).await.unwrap_err().code(), Code::PermissionDenied);
}

/// A CSR for a P-384 key, from the host's openssl.
fn rcgen_p384_csr() -> String {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl ecparam -name secp384r1 -genkey -noout -out {k} && openssl req -new -key {k} -subj /CN=x",
            k = key.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// A rustls client configuration presenting a workload certificate, trusting the cluster root.
fn workload_client_config(cert_pem: &str, key_pem: &str, bundle: &str) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

#[test]
fn a_short_lived_identity_is_renewed_in_place_while_its_task_runs() {
    let test = "workload_identity::a_short_lived_identity_is_renewed_in_place_while_its_task_runs";
    if !can_run_containers(test) {
        return;
    }
    // Out of bounds: refused with the range, at init and at update.
    let env0 = Env::new();
    let o = env0.swarmd(&["manager", "init", "--data-dir", env0.path("x").to_str().unwrap(), "--identity-ttl", "10s"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("30s to 30d"), "{}", String::from_utf8_lossy(&o.stderr));

    let (env, m, a, _b) = cluster(&["--identity-ttl", "30s"]);
    let o = m.ctl(&["cluster", "update", "--identity-ttl", "31d"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("30s to 30d"));
    let image = busybox_image(&env, &m);
    let a_id = a.node_id();
    // The task prints the certificate's hash whenever it changes.
    let script = "last=; while true; do h=$(cat /run/secrets/identity/cert.pem | sha256sum); \
                  if [ \"$h\" != \"$last\" ]; then echo \"cert $h\"; last=$h; fi; sleep 0.5; done";
    let t = service_on(&m, "short", &image, &a_id, script);
    let task = t["id"].as_str().unwrap().to_owned();
    let dir = identity_dir(&a_id, &task);
    let first = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let first_key = std::fs::read(dir.join("key.pem")).unwrap();
    // Renewed at half of 30 s: a new certificate (and key) in place.
    let second = wait_for("the identity to be renewed", Duration::from_secs(40), || {
        let now = std::fs::read_to_string(dir.join("cert.pem")).ok()?;
        (now != first).then_some(now)
    });
    assert_ne!(std::fs::read(dir.join("key.pem")).unwrap(), first_key, "the key was not replaced");
    let o = openssl(&[
        "verify",
        "-CAfile",
        dir.join("bundle.pem").to_str().unwrap(),
        dir.join("cert.pem").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(second.contains("BEGIN CERTIFICATE"));
    // The task saw both, inside its container, and is the same task, still running.
    let seen = wait_for("the task to see the renewal", Duration::from_secs(20), || {
        let l = logs(&m, "short");
        let seen: std::collections::HashSet<&str> =
            l.lines().filter_map(|x| x.split_once("cert ").map(|(_, h)| h)).collect();
        (seen.len() >= 2).then_some(l.clone())
    });
    let now = running_task(&m, "short").expect("still running");
    assert_eq!(now["id"], task.as_str(), "the task was replaced:\n{seen}");
    // Only one generation of files is left behind the link.
    let gens = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("..g"))
        .count();
    assert_eq!(gens, 1);
    let o = m.ctl(&["cluster", "update", "--identity-ttl", "1h"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
