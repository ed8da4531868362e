//! Issue 15: a node whose certificate expired while it was off comes back
//! without a token (moby#24132) — within the recovery window, if it was not
//! removed; otherwise it stops with one line that says to rejoin.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// The NotAfter (unix seconds) and serial of a data dir's node certificate.
fn cert_of(data: &Path) -> (i64, String) {
    let pem = std::fs::read_to_string(data.join("certs/node.crt")).unwrap();
    let info = swarmd_certs::CertInfo::parse(&pem).unwrap();
    (info.not_after, info.serial)
}

fn now() -> i64 {
    swarmd_certs::now_unix()
}

/// Waits (up to two minutes: certificates live 30 s) until every `data` dir's
/// certificate has expired.
fn wait_expired(dirs: &[&Path]) {
    let until = dirs.iter().map(|d| cert_of(d).0).max().unwrap();
    wait_for("the certificates to expire", Duration::from_secs(120), || (now() > until + 1).then_some(()));
}

/// The one error line a node printed, once it has exited (unsuccessfully).
fn exit_line(env: &mut Env, idx: usize) -> String {
    let status = wait_for("the node to give up", DEADLINE, || env.proc(idx).child.try_wait().unwrap());
    assert!(!status.success());
    let log = env.proc(idx).log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("swarmd: error")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    errors[0].to_owned()
}

/// Three workers of a cluster with 30 s certificates are stopped until their
/// certificates expire. One comes back with `swarmd run` alone: same node ID,
/// a new certificate, ready, no token. One was removed meanwhile, and one
/// finds the recovery window closed (0s): each stops with one clear line.
#[test]
fn a_worker_whose_certificate_expired_offline_comes_back_without_a_token() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--cert-expiry", "30s"]);
    let token = m.token("worker");
    let w1 = env.join_worker("w1", &token, &m.addr);
    let w2 = env.join_worker("w2", &token, &m.addr);
    m.wait_ready(3);
    let (id1, id2) = (w1.node_id(), w2.node_id());
    for w in [&w1, &w2] {
        env.proc(w.proc_idx).terminate();
    }
    m.ctl_ok(&["node", "rm", "--force", &id2]);
    let (_, old_serial) = cert_of(&w1.data);
    // Review finding: the first address a node asks answered unauthenticated,
    // and a server with another root was fatal (or, vouching for itself,
    // adopted). Now a manager of another cluster there is skipped.
    let foreign = env.start_manager("foreign", &[]);
    let cfg_path = w1.data.join("worker.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["remotes"] = serde_json::json!([foreign.addr, m.addr]);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let ca_before = std::fs::read_to_string(w1.data.join("certs/ca.crt")).unwrap();
    wait_expired(&[&w1.data, &w2.data]);

    let back = env.run_node("w1-back", &w1.data);
    wait_for("w1 to be ready again", Duration::from_secs(60), || {
        m.node(&id1).filter(|n| n["status"] == "ready").map(|_| ())
    });
    let (not_after, serial) = cert_of(&w1.data);
    assert_ne!(serial, old_serial, "the certificate was not replaced");
    assert!(not_after > now(), "the new certificate is expired");
    assert!(env.proc(back).log_text().contains("recovered"), "{}", env.proc(back).log_text());
    assert_eq!(std::fs::read_to_string(w1.data.join("certs/ca.crt")).unwrap(), ca_before);

    let removed = env.run_node("w2-back", &w2.data);
    let line = exit_line(&mut env, removed);
    assert!(line.contains("removed") && line.contains("join"), "{line}");

    // The window closed: w1, stopped again until it expires, is refused.
    env.proc(back).terminate();
    m.ctl_ok(&["cluster", "update", "--cert-recovery-window", "0s"]);
    wait_expired(&[&w1.data]);
    let late = env.run_node("w1-late", &w1.data);
    let line = exit_line(&mut env, late);
    assert!(line.contains("recovery window") && line.contains("rejoin"), "{line}");
    // A window longer than a year is refused, and changes nothing.
    let o = m.ctl(&["cluster", "update", "--cert-recovery-window", "400d"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("maximum"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A manager of three, off until its 30 s certificate expired, recovers it
/// from a peer and raft resumes: it catches up with a write made while it
/// was away and serves the control API again.
#[test]
fn a_manager_whose_certificate_expired_offline_recovers_and_raft_resumes() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--cert-expiry", "30s"]);
    let token = m1.token("manager");
    let m2 = env.join_manager("m2", &token, &m1);
    let m3 = env.join_manager("m3", &token, &m1);
    m1.wait_ready(3);
    env.proc(m3.proc_idx).terminate();
    wait_expired(&[&m3.data]);
    let (_, old_serial) = cert_of(&m3.data);
    let writer = if m1.is_leader() || !m2.is_leader() { &m1 } else { &m2 };
    let created = {
        let o = writer.ctl_stdin(&["create", "while-away", "-"], b"v");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_owned()
    };
    let back = env.run_node("m3-back", &m3.data);
    wait_for("m3 to catch up", Duration::from_secs(60), || {
        let o = m3.try_ctl(&["ls", "-q"])?;
        String::from_utf8_lossy(&o.stdout).contains(&created).then_some(())
    });
    let (not_after, serial) = cert_of(&m3.data);
    assert_ne!(serial, old_serial);
    assert!(not_after > now());
    assert!(env.proc(back).log_text().contains("recovered"), "{}", env.proc(back).log_text());
    m1.wait_ready(3);
}

/// A lone manager (no peer to ask) whose certificate expired while it was off
/// signs itself a new one with the CA it holds and serves again; with the
/// window closed it stops with one line that says to rejoin.
#[test]
fn a_lone_manager_whose_certificate_expired_offline_signs_itself_a_new_one_within_the_window() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--cert-expiry", "30s"]);
    env.proc(m.proc_idx).terminate();
    wait_expired(&[&m.data]);
    let back = env.run_node("m1-back", &m.data);
    wait_for("m1 to serve again", Duration::from_secs(60), || {
        m.try_ctl(&["node", "ls", "-q"]).filter(|o| o.status.success())
    });
    assert!(cert_of(&m.data).0 > now());
    assert!(env.proc(back).log_text().contains("signed a new one"), "{}", env.proc(back).log_text());
    m.wait_ready(1);

    m.ctl_ok(&["cluster", "update", "--cert-recovery-window", "0s"]);
    env.proc(back).terminate();
    wait_expired(&[&m.data]);
    let late = env.run_node("m1-late", &m.data);
    let line = exit_line(&mut env, late);
    assert!(line.contains("recovery window") && line.contains("rejoin"), "{line}");
}

/// Anonymous recovery requests that must get nothing, and change nothing: a
/// made-up nonce, another node's certificate with the asker's own key, an
/// admin certificate, and a certificate that is still good (it renews; it is
/// not recovered outside its node's renewal budget).
#[tokio::test(flavor = "multi_thread")]
async fn hostile_recovery_requests_are_refused_and_change_nothing() {
    use swarmd_certs::recover::{proof_message, sign_proof};
    use swarmd_proto::ca::ca_client::CaClient;
    use swarmd_proto::ca::{GetRecoveryNonceRequest, RecoverNodeCertificateRequest};
    use tonic::Code;
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let w = env.join_worker("w1", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let admin_dir = env.path("admin");
    m.ctl_ok(&["admin-cert", "--out", admin_dir.to_str().unwrap()]);
    let victim = swarmd_certs::NodeIdentity::load(&w.data.join("certs")).unwrap();
    let ca_pem = std::fs::read_to_string(m.data.join("certs/ca.crt")).unwrap();
    let cfg = std::sync::Arc::new(swarmd_certs::tls::anonymous_client_config(&ca_pem).unwrap());
    let ch = swarmd_certs::dial::connect(&m.addr, cfg).await.unwrap();
    let nonce = || async {
        CaClient::new(ch.clone()).get_recovery_nonce(GetRecoveryNonceRequest {}).await.unwrap().into_inner().nonce
    };
    let ask = |cert: String, nonce: Vec<u8>, key: String| {
        let ch = ch.clone();
        async move {
            let (_k, csr) = swarmd_certs::generate_key_and_csr().unwrap();
            let signature = sign_proof(&key, &proof_message(&nonce, &csr)).unwrap();
            let req = RecoverNodeCertificateRequest { certificate_pem: cert, csr_pem: csr, nonce, signature };
            CaClient::new(ch).recover_node_certificate(req).await.map(|_| ()).unwrap_err()
        }
    };
    let before = m.ctl_ok(&["--format", "json", "node", "inspect", &w.node_id()]);
    let (attacker_key, _) = swarmd_certs::generate_key_and_csr().unwrap();
    let attacker_key = attacker_key.to_string();
    // A made-up nonce.
    let s = ask(victim.cert_pem.clone(), vec![7; 56], victim.key_pem.to_string()).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // The victim's certificate, signed with another key.
    let s = ask(victim.cert_pem.clone(), nonce().await, attacker_key).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("proof"), "{s:?}");
    // An admin certificate, with its own key.
    let read = |f: &str| std::fs::read_to_string(admin_dir.join(f)).unwrap();
    let s = ask(read("admin.crt"), nonce().await, read("admin.key")).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // The victim's own, still good certificate with its own key.
    let s = ask(victim.cert_pem.clone(), nonce().await, victim.key_pem.to_string()).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("still valid"), "{s:?}");
    // Nothing was issued: the node's latest certificate is the one it holds.
    assert_eq!(m.ctl_ok(&["--format", "json", "node", "inspect", &w.node_id()]), before);
}
