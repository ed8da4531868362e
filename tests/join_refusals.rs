//! Bad input at join and init time: one clear line on stderr, a non-zero exit,
//! and nothing left behind.

mod common;

use std::process::Output;

use common::*;

/// Asserts failure with exactly one stderr line containing `needle`.
fn assert_refused(o: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, got success; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    assert!(lines[0].contains(needle), "expected {needle:?} in: {}", lines[0]);
}

/// `worker join` with the token on standard input, as README recommends.
fn join(env: &Env, token: &str, remote: &str, dir: &str) -> Output {
    let d = env.path(dir);
    env.swarmd_stdin(
        &["worker", "join", "--remote", remote, "--data-dir", d.to_str().unwrap()],
        format!(
            "{token}
"
        )
        .as_bytes(),
    )
}

/// Replaces the character at `i` with another hex digit.
fn flip_hex(s: &str, i: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    b[i] = if b[i] == b'0' { b'1' } else { b'0' };
    String::from_utf8(b).unwrap()
}

#[test]
fn bad_tokens_and_unreachable_managers_are_refused_cleanly() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let token = m.token("worker");
    let nodes_before = m.nodes().len();

    // Malformed.
    for bad in ["garbage", "SWDTKN-1-abc-def", &token[..token.len() - 2]] {
        let o = join(&env, bad, &m.addr, "w-malformed");
        assert_refused(&o, "malformed join token");
        assert!(is_absent_or_empty(&env.path("w-malformed")));
    }
    // Given as an argument (still accepted): a warning about its exposure,
    // then the same one-line refusal.
    let d = env.path("w-argv");
    let o = env.swarmd(&["worker", "join", "garbage", "--remote", &m.addr, "--data-dir", d.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!o.status.success());
    assert_eq!(lines.len(), 2, "expected a warning and an error, got: {stderr}");
    assert!(lines[0].starts_with("warning: a join token given as an argument"), "{stderr}");
    assert!(lines[1].contains("malformed join token"), "{stderr}");
    assert!(is_absent_or_empty(&d));

    // Tampered digest (position 9 is the first digest digit).
    let o = join(&env, &flip_hex(&token, 9), &m.addr, "w-digest");
    assert_refused(&o, "does not match the join token");
    assert!(is_absent_or_empty(&env.path("w-digest")));

    // Wrong secret (last digit).
    let o = join(&env, &flip_hex(&token, token.len() - 1), &m.addr, "w-secret");
    assert_refused(&o, "invalid join token");
    assert!(is_absent_or_empty(&env.path("w-secret")));

    // Unreachable manager.
    let dead = format!("127.0.0.1:{}", free_port());
    let o = join(&env, &token, &dead, "w-unreachable");
    assert_refused(&o, "cannot reach a manager");
    assert!(is_absent_or_empty(&env.path("w-unreachable")));

    // The manager token does not make a worker: the refusal names the right command.
    let o = join(&env, &m.token("manager"), &m.addr, "w-mgr");
    assert_refused(&o, "swarmd manager join");
    assert!(is_absent_or_empty(&env.path("w-mgr")));

    assert_eq!(m.nodes().len(), nodes_before, "a refused join added a node");
}

#[test]
fn a_manager_with_another_ca_is_not_trusted() {
    let mut env = Env::new();
    let ours = env.start_manager("ours", &[]);
    let theirs = env.start_manager("theirs", &[]);
    // Our token, their manager: the served CA does not match the digest.
    let o = join(&env, &ours.token("worker"), &theirs.addr, "w1");
    assert_refused(&o, "does not match the join token");
    assert!(is_absent_or_empty(&env.path("w1")));
    assert_eq!(theirs.nodes().len(), 1);
}

#[test]
fn rotated_tokens_are_refused_and_joined_nodes_unaffected() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let old = m.token("worker");
    let w1 = env.join_worker("w1", &old, &m.addr);
    m.wait_ready(2);
    let manager_old = m.token("manager");

    let out = m.ctl_ok(&["join-token", "worker", "--rotate"]);
    assert!(out.contains("rotated"));
    let new = m.token("worker");
    assert_ne!(new, old);
    assert_eq!(m.token("manager"), manager_old, "rotating the worker token changed the manager token");

    let o = join(&env, &old, &m.addr, "w-old");
    assert_refused(&o, "invalid join token");
    assert!(is_absent_or_empty(&env.path("w-old")));

    // The joined worker keeps working; a new join with the new token succeeds.
    let _w2 = env.join_worker("w2", &new, &m.addr);
    m.wait_ready(3);
    assert_eq!(m.node(&w1.node_id()).unwrap()["status"], "ready");
}

#[test]
fn initialised_data_dirs_are_refused_and_left_unchanged() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let token = m.token("worker");
    let w1 = env.join_worker("w1", &token, &m.addr);
    m.wait_ready(2);
    let snapshot = |d: &std::path::Path| {
        let mut v: Vec<_> = files_below(d)
            .into_iter()
            .filter(|p| p.extension().is_none_or(|e| e != "log") && !p.starts_with(d.join("raft")))
            .map(|p| (p.clone(), std::fs::read(&p).unwrap_or_default()))
            .collect();
        v.sort();
        v
    };

    let before = snapshot(&m.data);
    let port = format!("127.0.0.1:{}", free_port());
    let o = env.swarmd(&["manager", "init", "--data-dir", m.data.to_str().unwrap(), "--listen-addr", &port]);
    assert_refused(&o, "already holds a swarmd node");
    assert_eq!(before, snapshot(&m.data));

    let wbefore = snapshot(&w1.data);
    let o = join(&env, &token, &m.addr, "w1");
    assert_refused(&o, "already holds a swarmd node");
    assert_eq!(wbefore, snapshot(&w1.data));

    // `run` on an empty dir explains what to do.
    let empty = env.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = env.swarmd(&["run", "--data-dir", empty.to_str().unwrap()]);
    assert_refused(&o, "holds no swarmd node");

    // A bad option is refused before anything is created.
    let fresh = env.path("fresh");
    let o = env.swarmd(&["manager", "init", "--data-dir", fresh.to_str().unwrap(), "--cert-expiry", "10s"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("minimum of 30s"));
    assert!(is_absent_or_empty(&fresh));
}
