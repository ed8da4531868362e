//! Autolock: a restarted manager serves nothing until `swarmd unlock` gets its
//! key; a wrong key changes nothing; a rotated key replaces the old one; the
//! keys on disk are sealed while it is on and plain again once it is off.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

fn unlock(env: &Env, data: &Path, key: &str) -> Output {
    env.swarmd_stdin(&["unlock", "--data-dir", data.to_str().unwrap()], key.as_bytes())
}

fn wait_locked(m: &Manager) {
    wait_for("the restarted manager to answer locked", Duration::from_secs(30), || {
        let o = m.ctl(&["ls"]);
        (!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("locked: run swarmd unlock")).then_some(())
    });
}

fn wait_serving(m: &Manager) {
    wait_for("the manager to serve", Duration::from_secs(30), || m.ctl(&["ls", "-q"]).status.success().then_some(()));
}

fn restart(env: &mut Env, m: &mut Manager) {
    let exit = env.proc(m.proc_idx).terminate();
    assert!(exit.success(), "{exit:?}");
    m.proc_idx = env.run_node(&m.name, &m.data);
}

fn key_in(text: &str) -> String {
    let at = text.find("SWDKEY-1-").expect("an unlock key was printed");
    text[at..at + 9 + 64].to_owned()
}

#[test]
fn an_autolocked_manager_restarts_locked_and_unlocks_with_its_key_only() {
    let mut env = Env::new();
    let mut m = env.start_manager("m1", &["--autolock"]);
    let key = key_in(&env.procs[m.proc_idx].log_text());
    assert_eq!(m.ctl_ok(&["unlock-key", "-q"]).trim(), key);
    assert!(m.ctl_stdin(&["create", "s"], b"locked-away").status.success());

    // On disk: the KEK only sealed, the node key sealed, the unlock key nowhere.
    assert!(!m.data.join("keys/kek").exists() && m.data.join("keys/kek.locked").exists());
    let node_key = std::fs::read_to_string(m.data.join("certs/node.key")).unwrap();
    assert!(node_key.starts_with("-----BEGIN SWARMD SEALED PRIVATE KEY-----"), "{node_key}");
    let hexkey = &key[9..];
    for needle in [key.as_bytes().to_vec(), hexkey.as_bytes().to_vec(), hex::decode(hexkey).unwrap()] {
        let hits = grep_dir(&m.data, &needle);
        assert!(hits.is_empty(), "the unlock key is on disk: {hits:?}");
    }

    restart(&mut env, &mut m);
    wait_locked(&m);
    let o = m.ctl(&["node", "ls"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("locked"), "node ls while locked");

    // Wrong and malformed keys: refused, still locked.
    let o = unlock(&env, &m.data, &format!("SWDKEY-1-{}", "0".repeat(64)));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrong unlock key"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = unlock(&env, &m.data, "not-a-key");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("SWDKEY-1-"));
    wait_locked(&m);

    // The right key: serving, with the secret intact.
    let o = unlock(&env, &m.data, &key);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_serving(&m);
    m.ctl_ok(&["keys", "verify"]);
    let o = unlock(&env, &m.data, &key);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not locked"), "unlocking a running manager");

    // Rotation: the new key unlocks, the old one no longer does.
    let rotated = m.ctl_ok(&["unlock-key", "-q", "--rotate"]).trim().to_owned();
    assert_ne!(rotated, key);
    let parsed = swarmd_manager::keys::UnlockKey::parse(&rotated).unwrap();
    wait_for("the KEK to be re-sealed under the new key", Duration::from_secs(30), || {
        swarmd_manager::keys::KeyDir::new(&m.data).unlock(&parsed).ok()
    });
    restart(&mut env, &mut m);
    wait_locked(&m);
    let o = unlock(&env, &m.data, &key);
    assert!(!o.status.success(), "the old unlock key still works");
    let o = unlock(&env, &m.data, &rotated);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_serving(&m);

    // Off: plain keys again, and a restart needs no unlock.
    let said = m.ctl_ok(&["cluster", "update", "--autolock=false"]);
    assert!(said.contains("Autolock is off"), "{said}");
    // The sealed KEK is erased (zero-filled and synced) after the plain one is written.
    wait_for("the KEK in the clear again and the sealed one gone", Duration::from_secs(30), || {
        (m.data.join("keys/kek").exists() && !m.data.join("keys/kek.locked").exists()).then_some(())
    });
    let o = m.ctl(&["unlock-key"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("autolock is off"));
    restart(&mut env, &mut m);
    wait_serving(&m);
    assert_eq!(m.ctl_ok(&["ls", "-q"]).lines().count(), 1);

    // And on again later: a new key is printed.
    let said = m.ctl_ok(&["cluster", "update", "--autolock=true"]);
    let again = key_in(&said);
    assert_ne!(again, rotated);
    wait_for("the KEK sealed again", Duration::from_secs(30), || (!m.data.join("keys/kek").exists()).then_some(()));
    restart(&mut env, &mut m);
    wait_locked(&m);
    assert!(unlock(&env, &m.data, &again).status.success());
    wait_serving(&m);

    // A manager that joins an autolocked cluster seals its own keys with the
    // cluster's unlock key.
    let m2 = env.join_manager("m2", &m.token("manager"), &m);
    let again = swarmd_manager::keys::UnlockKey::parse(&again).unwrap();
    wait_for("the joined manager to seal its keys", Duration::from_secs(30), || {
        swarmd_manager::keys::KeyDir::new(&m2.data).unlock(&again).ok()
    });
    assert!(!m2.data.join("keys/kek").exists());
    let node_key = std::fs::read_to_string(m2.data.join("certs/node.key")).unwrap();
    assert!(node_key.starts_with("-----BEGIN SWARMD SEALED PRIVATE KEY-----"));
}
