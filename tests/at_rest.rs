//! Invariant 5 for the CA key and join tokens: never on disk in plaintext.
//! The test opens the sealed key with the manager's own keys (proving it is
//! there, encrypted), then greps every file of the data dir and every log for it.

mod common;

use base64::Engine;
use common::*;

#[test]
fn ca_key_and_join_tokens_never_touch_disk_in_plaintext() {
    let mut env = Env::new();
    // Snapshots every 10 entries, so the snapshot file is among what is grepped.
    let m = env.start_manager("m1", &["--heartbeat", "1s", "--snapshot-interval", "10"]);
    // A second manager receives the data key over mTLS and keeps it sealed.
    let m2 = env.join_manager("m2", &m.token("manager"), &m);
    let worker_token = m.token("worker");
    let _w1 = env.join_worker("w1", &worker_token, &m.addr);
    m.wait_ready(3);
    m.ctl_ok(&["join-token", "worker", "--rotate"]);
    let rotated = m.token("worker");
    let manager_token = m.token("manager");
    for mgr in [&m2, &m] {
        let exit = env.proc(mgr.proc_idx).terminate();
        assert!(exit.success(), "{} did not shut down cleanly: {exit:?}", mgr.name);
    }
    let ring = swarmd_manager::keys::KeyDir::new(&m.data).load_keyring().unwrap();
    let ring2 = swarmd_manager::keys::KeyDir::new(&m2.data).load_keyring().unwrap();
    assert_eq!(*ring.encode(), *ring2.encode(), "the joined manager holds other data keys");
    let dek = ring.get(1).expect("data key 1");
    let key2 = swarmd_manager::open_ca_key_offline(&m2.data).unwrap();

    let key_pem = swarmd_manager::open_ca_key_offline(&m.data).expect("open the sealed CA key");
    assert!(key_pem.contains("PRIVATE KEY"));
    let body: String = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(&body).unwrap();

    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("CA key PEM body".into(), body.as_bytes().to_vec()),
        ("CA key DER".into(), der.clone()),
        ("CA key hex".into(), hex::encode(&der).into_bytes()),
    ];
    for line in key_pem.lines().filter(|l| l.len() >= 32 && !l.starts_with("-----")) {
        needles.push(("CA key PEM line".into(), line.as_bytes().to_vec()));
    }
    for (what, t) in
        [("worker token", &worker_token), ("rotated worker token", &rotated), ("manager token", &manager_token)]
    {
        let secret = t.rsplit('-').next().unwrap();
        needles.push((format!("{what} secret"), secret.as_bytes().to_vec()));
        needles.push((format!("{what} secret bytes"), hex::decode(secret).unwrap()));
    }
    assert_eq!(*key2, *key_pem, "the joined manager opens another CA key");
    needles.push(("data key".into(), dek.expose().to_vec()));
    needles.push(("data key hex".into(), hex::encode(dek.expose()).into_bytes()));
    assert!(m.data.join("raft/snapshot.bin").exists(), "no snapshot was written to grep");
    let scanned = files_below(env.dir.path()).len();
    assert!(scanned > 10, "scanned only {scanned} files");
    for (what, needle) in &needles {
        let hits = grep_dir(env.dir.path(), needle);
        assert!(hits.is_empty(), "{what} found in plaintext in {hits:?}");
    }
}
