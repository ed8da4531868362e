//! End-to-end: three managers. Leader failure during writes, catch-up after a
//! restart, worker failover, full-cluster restart, and quorum loss.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn labels_of(m: &Manager, node: &str) -> Option<serde_json::Map<String, Value>> {
    m.node(node)?["labels"].as_object().cloned()
}

fn three_managers(env: &mut Env) -> (Manager, Manager, Manager) {
    let m1 = env.start_manager("m1", &["--heartbeat", "1s"]);
    let token = m1.token("manager");
    let m2 = env.join_manager("m2", &token, &m1);
    let m3 = env.join_manager("m3", &token, &m1);
    for m in [&m1, &m2, &m3] {
        wait_for("every manager to list three raft members", DEADLINE, || {
            let n = m.nodes();
            (n.iter().filter(|n| n["role"] == "manager" && n["raft_id"].is_string()).count() == 3).then_some(())
        });
    }
    (m1, m2, m3)
}

#[test]
fn leader_killed_during_writes_loses_no_acknowledged_write() {
    let mut env = Env::new();
    let (m1, m2, m3) = three_managers(&mut env);
    let w1 = env.join_worker("w1", &m1.token("worker"), &m1.addr);
    m1.wait_ready(4);
    let worker = w1.node_id();

    let managers = [&m1, &m2, &m3];
    let leader = wait_for("a leader", DEADLINE, || managers.iter().position(|m| m.is_leader()));
    let survivors: Vec<&Manager> = managers.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, m)| *m).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let sockets = managers.iter().map(|m| m.socket()).collect();
    let writer = {
        let (stop, node) = (stop.clone(), worker.clone());
        std::thread::spawn(move || write_stream(sockets, node, stop))
    };
    std::thread::sleep(Duration::from_millis(1500));
    env.proc(managers[leader].proc_idx).kill9();
    let killed_at = Instant::now();
    // A survivor becomes leader and takes writes.
    let new_leader = wait_for("a new leader", DEADLINE, || survivors.iter().position(|m| m.is_leader()));
    let probe = format!("probe={}", killed_at.elapsed().as_millis());
    wait_for("a write after failover", DEADLINE, || {
        survivors[new_leader].ctl(&["node", "update", &worker, "--label-add", &probe]).status.success().then_some(())
    });
    eprintln!("failover: first write {:?} after kill -9", killed_at.elapsed());
    let failover = killed_at.elapsed();
    assert!(failover < Duration::from_secs(20), "failover took {failover:?}");
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(acked.len() > 10, "too few writes acknowledged: {}", acked.len());

    // Every acknowledged write is on both survivors.
    for m in &survivors {
        let labels = wait_for("survivor to apply every acknowledged write", DEADLINE, || {
            let l = labels_of(m, &worker)?;
            acked.iter().all(|i| l.contains_key(&format!("k{i}"))).then_some(l)
        });
        assert!(labels.contains_key("probe"));
    }

    // The worker keeps a session through a surviving manager.
    wait_for("worker session on a survivor", DEADLINE, || {
        survivors
            .iter()
            .any(|m| m.node(&worker).is_some_and(|n| n["status"] == "ready" && n["session"].is_object()))
            .then_some(())
    });

    // The killed manager restarts from its data dir and catches up.
    let killed = managers[leader];
    env.run_node("restarted", &killed.data);
    wait_for("restarted manager to catch up", DEADLINE, || {
        let l = labels_of(killed, &worker)?;
        (acked.iter().all(|i| l.contains_key(&format!("k{i}"))) && l.contains_key("probe")).then_some(())
    });
    wait_for("restarted manager ready again", DEADLINE, || {
        let id = killed.node_id();
        survivors[0].nodes().iter().any(|n| n["id"] == id && n["status"] == "ready").then_some(())
    });
}

#[test]
fn full_cluster_restart_keeps_state_and_elects_a_leader() {
    let mut env = Env::new();
    let (m1, m2, m3) = three_managers(&mut env);
    let w1 = env.join_worker("w1", &m1.token("worker"), &m1.addr);
    m1.wait_ready(4);
    m2.ctl_ok(&["node", "update", &w1.node_id(), "--label-add", "zone=a"]);
    let before: Vec<String> = {
        let mut v: Vec<String> =
            m3.nodes().iter().map(|n| format!("{} {} {}", n["id"], n["role"], n["labels"])).collect();
        v.sort();
        v
    };
    for m in [&m1, &m2, &m3] {
        let status = env.proc(m.proc_idx).terminate();
        assert!(status.success(), "{} did not stop cleanly", m.name);
    }
    for m in [&m1, &m2, &m3] {
        env.run_node(&format!("{}-again", m.name), &m.data);
    }
    wait_for("a leader after full restart", DEADLINE, || [&m1, &m2, &m3].iter().any(|m| m.is_leader()).then_some(()));
    for m in [&m1, &m2, &m3] {
        let after = wait_for("state on every manager", DEADLINE, || {
            let mut v: Vec<String> =
                m.nodes().iter().map(|n| format!("{} {} {}", n["id"], n["role"], n["labels"])).collect();
            v.sort();
            (!v.is_empty()).then_some(v)
        });
        assert_eq!(before, after, "state differs on {}", m.name);
    }
    // Writable again, through any manager.
    wait_for("a write after restart", DEADLINE, || {
        m3.ctl(&["node", "update", &w1.node_id(), "--label-add", "after=1"]).status.success().then_some(())
    });
    m1.wait_ready(4);
}

#[test]
fn without_quorum_writes_fail_fast_with_a_clear_error() {
    let mut env = Env::new();
    let (m1, m2, m3) = three_managers(&mut env);
    let me = m1.node_id();
    env.proc(m2.proc_idx).kill9();
    env.proc(m3.proc_idx).kill9();
    // Give raft time to notice, then every write attempt must fail quickly.
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..3 {
        let t = Instant::now();
        let o = m1.ctl(&["node", "update", &me, "--label-add", "x=1"]);
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a write succeeded without quorum");
        assert!(err.contains("no quorum"), "unclear error: {err}");
        assert!(took < Duration::from_secs(10), "write hung for {took:?}");
    }
    // Reads still work (local state).
    assert_eq!(m1.nodes().len(), 3);
}

#[test]
fn force_new_cluster_recovers_from_quorum_loss() {
    let mut env = Env::new();
    let (m1, m2, m3) = three_managers(&mut env);
    let w1 = env.join_worker("w1", &m1.token("worker"), &m1.addr);
    m1.wait_ready(4);
    let worker = w1.node_id();
    for i in 0..5 {
        m2.ctl_ok(&["node", "update", &worker, "--label-add", &format!("before{i}=1")]);
    }
    // Lose two of three managers for good.
    env.proc(m2.proc_idx).kill9();
    env.proc(m3.proc_idx).kill9();
    env.proc(m1.proc_idx).terminate();

    // Recovery on the stopped survivor, then it serves as a one-manager cluster.
    let idx = env
        .spawn("m1-recovered", &["manager", "recover", "--force-new-cluster", "--data-dir", m1.data.to_str().unwrap()]);
    wait_for("a write on the recovered manager", DEADLINE, || {
        m1.ctl(&["node", "update", &worker, "--label-add", "after=1"]).status.success().then_some(())
    });
    let labels = labels_of(&m1, &worker).unwrap();
    for i in 0..5 {
        assert!(labels.contains_key(&format!("before{i}")), "committed write before{i} lost");
    }
    // The lost managers are gone from the cluster and their certificates refused.
    wait_for("old managers removed", DEADLINE, || {
        let n = m1.nodes();
        (n.iter().filter(|n| n["role"] == "manager").count() == 1).then_some(())
    });
    // The worker carries on with the recovered manager.
    wait_for("worker ready on the recovered cluster", DEADLINE, || {
        (m1.node(&worker)?["status"] == "ready").then_some(())
    });
    // A new manager can join again with the manager token.
    let m4 = env.join_manager("m4", &m1.token("manager"), &m1);
    wait_for("two raft members", DEADLINE, || {
        (m4.nodes().iter().filter(|n| n["role"] == "manager" && n["raft_id"].is_string()).count() == 2).then_some(())
    });
    assert!(env.procs[idx].child.try_wait().unwrap().is_none(), "recovered manager exited");
}
