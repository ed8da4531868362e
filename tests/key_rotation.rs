//! `secretctl keys rotate` on three managers while clients create secrets,
//! with one manager down throughout: every acknowledged secret opens under the
//! new key on every manager afterwards (the one that was down fetches the key
//! when it returns), and the old key is gone from every manager's disk.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn rotation_under_concurrent_creates_reseals_everything_and_deletes_the_old_key() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &[]);
    let m2 = env.join_manager("m2", &m1.token("manager"), &m1);
    let m3 = env.join_manager("m3", &m1.token("manager"), &m1);
    for i in 0..20 {
        let o = m1.ctl_stdin(&["create", &format!("before-{i}")], format!("value {i}").as_bytes());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    wait_for("m3 to apply the secrets", Duration::from_secs(30), || {
        (m3.ctl_ok(&["ls", "-q"]).lines().count() == 20).then_some(())
    });
    // m3 is down during the whole rotation.
    let exit = env.proc(m3.proc_idx).terminate();
    assert!(exit.success(), "{exit:?}");
    let old = swarmd_manager::keys::KeyDir::new(&m3.data).load_keyring().unwrap();
    assert_eq!(old.ids(), vec![1]);
    let old_key = old.get(1).unwrap().expose().to_vec();

    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::new());
    let rotated = std::thread::scope(|s| {
        for w in 0..2 {
            let (stop, acked, m) = (&stop, &acked, if w == 0 { &m1 } else { &m2 });
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("during-{w}-{i}");
                    let o = m.ctl_stdin(&["create", &name], name.as_bytes());
                    if o.status.success() {
                        acked.lock().unwrap().push(name);
                    } else {
                        eprintln!("create {name}: {}", String::from_utf8_lossy(&o.stderr));
                    }
                    i += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        // Through the follower: forwarded to the leader.
        let follower = if m2.is_leader() { &m1 } else { &m2 };
        let o = follower.ctl(&["keys", "rotate"]);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        o
    });
    assert!(rotated.status.success(), "rotate failed: {}", String::from_utf8_lossy(&rotated.stderr));
    let said = String::from_utf8_lossy(&rotated.stdout).into_owned();
    assert!(said.contains("Data key 2 is active"), "{said}");
    let acked = acked.into_inner().unwrap();
    assert!(acked.len() >= 4, "too few creates ran during the rotation: {}", acked.len());

    // m3 comes back, fetches the new key over mTLS, drops the old one.
    env.run_node("m3", &m3.data);
    for m in [&m1, &m2, &m3] {
        wait_for(&format!("{} to open everything under key 2", m.name), Duration::from_secs(60), || {
            let o = m.ctl(&["--format", "json", "keys", "verify"]);
            if !o.status.success() {
                return None;
            }
            let checks: Value = serde_json::from_slice(&o.stdout).ok()?;
            let checks = checks.as_array()?;
            (checks.len() == 20 + acked.len() && checks.iter().all(|c| c["data_key"] == 2)).then_some(())
        });
        let names = m.ctl_ok(&["ls"]);
        for n in &acked {
            assert!(names.contains(n.as_str()), "{}: acknowledged secret {n} is missing", m.name);
        }
    }
    // Token rotation still works (the tokens were re-sealed too), and a new
    // secret lands under key 2.
    m3.ctl_ok(&["join-token", "worker", "--rotate"]);
    assert!(m3.ctl_stdin(&["create", "after"], b"after").status.success());

    let procs: Vec<usize> = (0..env.procs.len()).collect();
    for i in procs.into_iter().rev() {
        if env.procs[i].child.try_wait().unwrap().is_none() {
            env.proc(i).terminate();
        }
    }
    for m in [&m1, &m2, &m3] {
        let ring = swarmd_manager::keys::KeyDir::new(&m.data).load_keyring().unwrap();
        assert_eq!(ring.ids(), vec![2], "{} still holds retired keys", m.name);
    }
    for needle in [old_key.clone(), hex::encode(&old_key).into_bytes()] {
        let hits = grep_dir(env.dir.path(), &needle);
        assert!(hits.is_empty(), "the old data key is on disk in plaintext: {hits:?}");
    }
}
