//! End-to-end: a manager and workers as real processes — join, status,
//! certificates on disk, restart, heartbeat loss, certificate rotation.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

fn openssl(args: &[&str]) -> String {
    let o = Command::new("openssl").args(args).output().expect("openssl is needed (apt-get install openssl)");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn manager_and_two_workers_are_ready_with_valid_certificates() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let token = m.token("worker");
    let w1 = env.join_worker("w1", &token, &m.addr);
    let w2 = env.join_worker("w2", &token, &m.addr);
    let nodes = m.wait_ready(3);

    let roles: Vec<_> = nodes.iter().map(|n| n["role"].as_str().unwrap().to_owned()).collect();
    assert_eq!(roles.iter().filter(|r| *r == "manager").count(), 1);
    assert_eq!(roles.iter().filter(|r| *r == "worker").count(), 2);
    for w in [&w1, &w2] {
        let n = m.node(&w.node_id()).expect("worker listed");
        assert!(n["cert_not_after"].as_i64().unwrap() > 0);
        assert!(!n["addr"].as_str().unwrap().is_empty());
    }

    // Certificates are plain X.509 that openssl verifies, subject chosen by the CA.
    let certs = w1.data.join("certs");
    let ca = certs.join("ca.crt");
    let crt = certs.join("node.crt");
    let verify = openssl(&["verify", "-CAfile", ca.to_str().unwrap(), crt.to_str().unwrap()]);
    assert!(verify.contains(": OK"), "{verify}");
    let subject = openssl(&["x509", "-in", crt.to_str().unwrap(), "-noout", "-subject", "-nameopt", "RFC2253"]);
    let cluster_id = openssl(&["x509", "-in", ca.to_str().unwrap(), "-noout", "-subject", "-nameopt", "RFC2253"]);
    let cluster_id = cluster_id.trim().split("O=").nth(1).unwrap().split(',').next().unwrap().to_owned();
    assert_eq!(subject.trim(), format!("subject=O={cluster_id},OU=swarm-worker,CN={}", w1.node_id()));
    let mode = std::fs::metadata(certs.join("node.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "node.key must be 0600");
    let sock_mode = std::fs::metadata(m.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(sock_mode, 0o600, "control socket must be 0600");

    // Table output names the same nodes.
    let table = m.ctl_ok(&["node", "ls"]);
    assert!(table.starts_with("ID"));
    assert!(table.contains(&w2.node_id()));
    let inspect = m.ctl_ok(&["--format", "json", "node", "inspect", &w1.node_id()]);
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["role"], "worker");
    assert!(v["session"]["id"].as_str().is_some());
}

#[test]
fn restarted_manager_keeps_its_nodes_and_workers_reconnect() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let token = m.token("worker");
    let w1 = env.join_worker("w1", &token, &m.addr);
    let w2 = env.join_worker("w2", &token, &m.addr);
    let before = m.wait_ready(3);
    let summary = |nodes: &[serde_json::Value]| {
        let mut v: Vec<_> =
            nodes.iter().map(|n| (n["id"].to_string(), n["role"].to_string(), n["cert_serial"].to_string())).collect();
        v.sort();
        v
    };
    let old_sessions: Vec<_> =
        [&w1, &w2].iter().map(|w| m.node(&w.node_id()).unwrap()["session"]["id"].clone()).collect();

    env.proc(m.proc_idx).kill9();
    env.run_node("m1-restarted", &m.data);
    let after = wait_for("workers to reconnect with new sessions", DEADLINE, || {
        let nodes = m.nodes();
        let fresh = [&w1, &w2].iter().zip(&old_sessions).all(|(w, old)| {
            nodes.iter().any(|n| n["id"] == w.node_id() && n["session"]["id"].is_string() && n["session"]["id"] != *old)
        });
        (fresh && nodes.iter().all(|n| n["status"] == "ready")).then_some(nodes)
    });
    assert_eq!(summary(&before), summary(&after), "node list changed across a restart");

    // A worker restarted with `swarmd run` reconnects with its certificate, no token.
    env.proc(w1.proc_idx).kill9();
    env.run_node("w1-restarted", &w1.data);
    wait_for("w1 to reopen a session", DEADLINE, || {
        let n = m.node(&w1.node_id())?;
        (n["status"] == "ready" && n["session"].is_object()).then_some(())
    });
}

#[test]
fn a_worker_that_stops_heartbeating_goes_down() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--heartbeat", "300ms"]);
    let token = m.token("worker");
    let w1 = env.join_worker("w1", &token, &m.addr);
    m.wait_ready(2);
    env.proc(w1.proc_idx).kill9();
    wait_for("w1 to be marked down", DEADLINE, || (m.node(&w1.node_id())?["status"] == "down").then_some(()));
    // The manager itself stays ready.
    assert!(m.nodes().iter().any(|n| n["role"] == "manager" && n["status"] == "ready"));
    // It comes back as ready when restarted.
    env.run_node("w1-restarted", &w1.data);
    wait_for("w1 ready again", DEADLINE, || (m.node(&w1.node_id())?["status"] == "ready").then_some(()));
}

#[test]
fn certificates_rotate_without_dropping_the_session() {
    let mut env = Env::new();
    // Default heartbeat (5 s, 15 s grace): a loaded machine must not drop the
    // session for reasons that have nothing to do with rotation.
    let m = env.start_manager("m1", &["--cert-expiry", "30s"]);
    let token = m.token("worker");
    let w1 = env.join_worker("w1", &token, &m.addr);
    m.wait_ready(2);
    let certs = w1.data.join("certs");
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
    let (cert0, key0) = (read("node.crt"), read("node.key"));
    let node0 = m.node(&w1.node_id()).unwrap();
    let session0 = node0["session"]["id"].clone();
    let serial0 = node0["cert_serial"].clone();
    let mgr_serial0 = m.nodes().into_iter().find(|n| n["role"] == "manager").unwrap()["cert_serial"].clone();

    // Renewal happens between 50 % and 80 % of 30 s.
    let (cert1, key1) = wait_for("the worker certificate to rotate", Duration::from_secs(60), || {
        let c = read("node.crt");
        (c != cert0).then(|| (c, read("node.key")))
    });
    assert_ne!(key1, key0, "renewal must use a new key");
    let ca = certs.join("ca.crt");
    assert!(
        openssl(&["verify", "-CAfile", ca.to_str().unwrap(), certs.join("node.crt").to_str().unwrap()]).contains("OK")
    );
    let node1 = wait_for("the manager to record the new serial", DEADLINE, || {
        let n = m.node(&w1.node_id())?;
        (n["cert_serial"] != serial0).then_some(n)
    });
    let serial_on_disk = openssl(&["x509", "-in", certs.join("node.crt").to_str().unwrap(), "-noout", "-serial"]);
    assert_eq!(
        serial_on_disk.trim().trim_start_matches("serial=").to_lowercase(),
        node1["cert_serial"].as_str().unwrap(),
        "store and disk disagree"
    );
    assert!(cert1.contains("BEGIN CERTIFICATE"));
    assert_eq!(node1["session"]["id"], session0, "the session must survive the rotation");
    assert_eq!(node1["status"], "ready");
    let established = env.procs[w1.proc_idx].log_text().matches("session established").count();
    assert_eq!(established, 1, "the worker re-registered during rotation");
    // The manager rotates its own certificate too.
    wait_for("the manager certificate to rotate", Duration::from_secs(60), || {
        let mgr = m.nodes().into_iter().find(|n| n["role"] == "manager")?;
        (mgr["cert_serial"] != mgr_serial0).then_some(())
    });
    // And still serves new connections with it.
    m.wait_ready(2);
}
