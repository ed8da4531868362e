//! End-to-end: `node promote`, `node demote` and `node rm`, and the refusals
//! that keep a quorum.

mod common;

use std::process::Output;
use std::sync::Arc;

use common::*;

fn refused(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a refusal containing {needle:?}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn voters(m: &Manager) -> usize {
    info(m).and_then(|i| i["voters"].as_array().map(|v| v.len())).unwrap_or(0)
}

#[test]
fn a_worker_is_promoted_to_manager_and_demoted_back() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--heartbeat", "1s"]);
    let token = m1.token("worker");
    let w1 = {
        let data = env.path("w1");
        let listen = format!("127.0.0.1:{}", free_port());
        let idx = env.spawn(
            "w1",
            &[
                "worker",
                "join",
                &token,
                "--remote",
                &m1.addr,
                "--data-dir",
                data.to_str().unwrap(),
                "--listen-addr",
                &listen,
            ],
        );
        Worker { name: "w1".into(), data, proc_idx: idx }
    };
    m1.wait_ready(2);
    let id = w1.node_id();

    m1.ctl_ok(&["node", "promote", &id]);
    wait_for("two voters", DEADLINE, || (voters(&m1) == 2).then_some(()));
    wait_for("w1 to be a manager on disk", DEADLINE, || {
        (w1.data.join("manager.json").exists() && !w1.data.join("worker.json").exists()).then_some(())
    });
    let as_manager = Manager { name: "w1".into(), data: w1.data.clone(), addr: String::new(), proc_idx: w1.proc_idx };
    wait_for("w1 to serve the control API", DEADLINE, || (voters(&as_manager) == 2).then_some(()));
    assert_eq!(m1.node(&id).unwrap()["role"], "manager");
    // Writes through the promoted manager reach the cluster.
    wait_for("a write through w1", DEADLINE, || {
        as_manager.ctl(&["node", "update", &id, "--label-add", "promoted=yes"]).status.success().then_some(())
    });
    wait_for("the write on m1", DEADLINE, || (m1.node(&id)?["labels"]["promoted"] == "yes").then_some(()));

    m1.ctl_ok(&["node", "demote", &id]);
    wait_for("one voter", DEADLINE, || (voters(&m1) == 1).then_some(()));
    wait_for("w1 to be a worker on disk again", DEADLINE, || {
        let d = &w1.data;
        (d.join("worker.json").exists()
            && !d.join("manager.json").exists()
            && !d.join("keys").exists()
            && !d.join("raft").exists())
        .then_some(())
    });
    wait_for("w1 ready as a worker", DEADLINE, || {
        let n = m1.node(&id)?;
        (n["role"] == "worker" && n["status"] == "ready" && n["session"].is_object()).then_some(())
    });
    // Same process throughout (promotion in-process, demotion by re-exec).
    assert!(env.procs[w1.proc_idx].child.try_wait().unwrap().is_none(), "w1's process exited");

    // The last manager cannot be demoted.
    refused(&m1.ctl(&["node", "demote", &m1.node_id()]), "last manager");
}

#[test]
fn a_demotion_that_would_lose_quorum_is_refused() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--heartbeat", "500ms"]);
    let token = m1.token("manager");
    let m2 = env.join_manager("m2", &token, &m1);
    let m3 = env.join_manager("m3", &token, &m1);
    wait_for("three voters", DEADLINE, || (voters(&m1) == 3).then_some(()));
    let leader =
        wait_for("a leader", DEADLINE, || [&m1, &m2, &m3].into_iter().find(|m| m.is_leader()).map(|m| m.name.clone()));
    let (down, keep): (&Manager, &Manager) = match leader.as_str() {
        "m3" => (&m2, &m1),
        "m2" => (&m3, &m1),
        _ => (&m3, &m2),
    };
    env.proc(down.proc_idx).kill9();
    let down_id = down.node_id();
    wait_for("the killed manager marked down", DEADLINE, || {
        (m1.node(&down_id).or_else(|| keep.node(&down_id))?["status"] == "down").then_some(())
    });
    // Demoting a live manager would leave {leader, dead}: one of two reachable.
    refused(&keep.ctl(&["node", "demote", &keep.node_id()]), "needed for a quorum");
    assert_eq!(voters(keep), 3);
    // A manager that is a raft member cannot be removed; demote first.
    refused(&keep.ctl(&["node", "rm", "--force", &down_id]), "demote it first");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_worker_is_refused_at_the_handshake() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--heartbeat", "1s"]);
    let w1 = env.join_worker("w1", &m1.token("worker"), &m1.addr);
    m1.wait_ready(2);
    let id = w1.node_id();
    refused(&m1.ctl(&["node", "rm", &id]), "--force");
    assert!(m1.node(&id).is_some());
    m1.ctl_ok(&["node", "rm", "--force", &id]);
    assert!(m1.node(&id).is_none());
    // Its certificate no longer gets through: the handshake (or, with TLS 1.3,
    // the first RPC) fails.
    let identity = swarmd_certs::NodeIdentity::load(&w1.data.join("certs")).unwrap();
    let cfg = Arc::new(swarmd_certs::tls::client_config(&identity).unwrap());
    let outcome = match swarmd_certs::dial::connect(&m1.addr, cfg).await {
        Err(_) => false,
        Ok(ch) => {
            let mut c = swarmd_proto::dispatcher::dispatcher_client::DispatcherClient::new(ch);
            c.heartbeat(swarmd_proto::dispatcher::HeartbeatRequest { session_id: "x".into(), assignments_seq: 0 })
                .await
                .is_ok()
        }
    };
    assert!(!outcome, "a removed node's certificate was accepted");
    // And it does not come back by itself.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(m1.node(&id).is_none());
}

/// A worker removed while it was down learns it when it comes back — from the
/// manager's `certificate_revoked` alert, the only signal its reconnection can
/// meet — stops and says so, instead of retrying forever.
#[tokio::test(flavor = "multi_thread")]
async fn invariant_7_a_worker_removed_while_offline_learns_it_when_it_returns() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--heartbeat", "1s"]);
    let w1 = env.join_worker("w1", &m1.token("worker"), &m1.addr);
    m1.wait_ready(2);
    let id = w1.node_id();
    assert!(env.proc(w1.proc_idx).terminate().success());
    m1.ctl_ok(&["node", "rm", "--force", &id]);
    let again = env.spawn("w1-again", &["run", "--data-dir", w1.data.to_str().unwrap()]);
    let status =
        wait_for("the removed worker to stop by itself", DEADLINE, || env.proc(again).child.try_wait().unwrap());
    let log = env.proc(again).log_text();
    assert!(!status.success(), "the removed worker exited successfully:\n{log}");
    assert!(log.contains("removed from the cluster"), "the removed worker did not say why it stopped:\n{log}");
}

#[test]
fn bad_node_updates_are_refused_and_change_nothing() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &[]);
    let id = m1.node_id();
    // The manager records its own status just after it starts serving: the
    // state to compare with is the one that then holds still.
    let before = wait_for("the new manager's state to settle", DEADLINE, || {
        let first = info(&m1)?["state_digest"].clone();
        std::thread::sleep(std::time::Duration::from_millis(500));
        (info(&m1)?["state_digest"] == first).then_some(first)
    });
    let long = format!("k={}", "v".repeat(5000));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--label-add=-bad=1"], "invalid label key"),
        (vec!["--label-add", "a b=1"], "invalid label key"),
        (vec!["--label-add", &long], "limit"),
        (vec!["--label-add", "novalue"], "KEY=VALUE"),
        (vec!["--availability", "sometimes"], "invalid value"),
    ];
    for (args, needle) in cases {
        let mut a = vec!["node", "update", id.as_str()];
        a.extend(args);
        refused(&m1.ctl(&a), needle);
    }
    refused(&m1.ctl(&["node", "update", "nosuchnode", "--label-add", "a=1"]), "no node");
    refused(&m1.ctl(&["node", "promote", &id]), "already a manager");
    assert_eq!(info(&m1).unwrap()["state_digest"], before, "a refused update changed the state");
}
