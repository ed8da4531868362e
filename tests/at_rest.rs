//! Invariant 5: no secret value, CA key, data key or join token on disk in
//! plaintext. The cluster rotates its root CA first, so the CA key is one
//! that travelled through raft as a rotation's target (sealed) and replaced
//! the one init wrote. The test opens the sealed CA key with the manager's own keys
//! (proving it is there, encrypted), creates and updates a secret holding a
//! canary, forces a snapshot past it, restarts every manager, then greps every
//! file of every data dir and every log for all of them (raw, base64, hex).

mod common;

use base64::Engine;
use common::*;

#[test]
fn no_secret_value_key_or_token_touches_disk_in_plaintext() {
    let mut env = Env::new();
    // Snapshots every 10 entries, so the snapshot file is among what is grepped.
    let m = env.start_manager("m1", &["--heartbeat", "1s", "--snapshot-interval", "10"]);
    // A second manager receives the data key over mTLS and keeps it sealed.
    let m2 = env.join_manager_with("m2", &m.token("manager"), &m, &["--snapshot-interval", "10"]);
    let first_worker_token = m.token("worker");
    let _w1 = env.join_worker("w1", &first_worker_token, &m.addr);
    m.wait_ready(3);
    // A root CA rotation, to the end: its new key (and new tokens) are sealed
    // everywhere they are written — the rotation's record, the swap, the log.
    let first_root = m.ctl_ok(&["ca", "show"]);
    m.ctl_ok(&["ca", "rotate"]);
    assert_ne!(m.ctl_ok(&["ca", "show"]), first_root, "the root did not change");
    let worker_token = m.token("worker");
    assert_ne!(worker_token, first_worker_token, "the rotation kept the token");
    m.ctl_ok(&["join-token", "worker", "--rotate"]);
    let rotated = m.token("worker");
    let manager_token = m.token("manager");

    // A secret with a canary value, and a second version with another one,
    // written through the follower (forwarded to the leader).
    let canary = format!("CANARY-{}-{}", std::process::id(), rand_suffix());
    let canary2 = format!("CANARY2-{}-{}", std::process::id(), rand_suffix());
    let o = m2.ctl_stdin(&["create", "canary"], canary.as_bytes());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = m2.ctl_stdin(&["update", "canary"], canary2.as_bytes());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Force a snapshot that covers them: more writes, then wait for it.
    let covered = info(&m).unwrap()["last_applied"].as_u64().unwrap();
    let mut i = 0;
    wait_for("a snapshot covering the secret", std::time::Duration::from_secs(60), || {
        i += 1;
        m.ctl_ok(&["node", "update", &m.node_id(), "--label-add", &format!("n={i}")]);
        (info(&m)?["snapshot_index"].as_u64()? >= covered && info(&m2)?["snapshot_index"].as_u64()? >= covered)
            .then_some(())
    });
    // Restart every manager: the secret must still open everywhere.
    for mgr in [&m2, &m] {
        let exit = env.proc(mgr.proc_idx).terminate();
        assert!(exit.success(), "{} did not shut down cleanly: {exit:?}", mgr.name);
    }
    let i1 = env.run_node("m1", &m.data);
    let i2 = env.run_node("m2", &m2.data);
    for mgr in [&m, &m2] {
        wait_for("the secret to open after the restart", std::time::Duration::from_secs(60), || {
            mgr.ctl(&["keys", "verify"]).status.success().then_some(())
        });
    }
    for idx in [i2, i1] {
        let exit = env.proc(idx).terminate();
        assert!(exit.success(), "a restarted manager did not shut down cleanly: {exit:?}");
    }
    let ring = swarmd_manager::keys::KeyDir::new(&m.data).load_keyring().unwrap();
    let ring2 = swarmd_manager::keys::KeyDir::new(&m2.data).load_keyring().unwrap();
    assert_eq!(*ring.encode(), *ring2.encode(), "the joined manager holds other data keys");
    let dek = ring.get(1).expect("data key 1");
    let key2 = swarmd_manager::open_ca_key_offline(&m2.data).unwrap();

    let key_pem = swarmd_manager::open_ca_key_offline(&m.data).expect("open the sealed CA key");
    assert!(key_pem.contains("PRIVATE KEY"));
    // It is the rotated root's key.
    let root = m.data.join("certs/ca.crt");
    let root_pem = std::fs::read_to_string(&root).unwrap();
    assert_ne!(root_pem, first_root, "the node still pins the first root");
    swarmd_certs::RootCa::from_pem(&root_pem, &key_pem).expect("the CA key is the rotated root's");
    let body: String = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(&body).unwrap();

    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("CA key PEM body".into(), body.as_bytes().to_vec()),
        ("CA key DER".into(), der.clone()),
        ("CA key hex".into(), hex::encode(&der).into_bytes()),
    ];
    // Each line of the key's PEM, but those that are also the certificate's:
    // PKCS#8 carries the public key too, and a line of it can fall on the same
    // base64 alignment in both (public, not a leak).
    let root_body: String = root_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    for line in key_pem.lines().filter(|l| l.len() >= 32 && !l.starts_with("-----") && !root_body.contains(*l)) {
        needles.push(("CA key PEM line".into(), line.as_bytes().to_vec()));
    }
    // The private scalar itself: ECPrivateKey's OCTET STRING (04 20 …32 bytes).
    let at = der.windows(2).position(|w| w == [0x04, 0x20]).expect("an EC private key");
    let scalar = der[at + 2..at + 34].to_vec();
    needles.push(("CA private scalar".into(), scalar.clone()));
    needles.push(("CA private scalar hex".into(), hex::encode(&scalar).into_bytes()));
    for (what, t) in [
        ("first worker token", &first_worker_token),
        ("worker token", &worker_token),
        ("rotated worker token", &rotated),
        ("manager token", &manager_token),
    ] {
        let secret = t.rsplit('-').next().unwrap();
        needles.push((format!("{what} secret"), secret.as_bytes().to_vec()));
        needles.push((format!("{what} secret bytes"), hex::decode(secret).unwrap()));
    }
    for (what, c) in [("canary", &canary), ("canary v2", &canary2)] {
        let b = c.as_bytes();
        needles.push((what.into(), b.to_vec()));
        needles.push((format!("{what} hex"), hex::encode(b).into_bytes()));
        needles.push((format!("{what} HEX"), hex::encode_upper(b).into_bytes()));
        for engine in [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::URL_SAFE_NO_PAD] {
            // Every alignment of the value inside a larger base64 stream has one
            // of three encodings; the middle part of each is stable.
            for skip in 0..3 {
                let enc = engine.encode(&b[skip..]);
                needles.push((format!("{what} base64+{skip}"), enc.as_bytes()[4..enc.len() - 4].to_vec()));
            }
        }
    }
    assert_eq!(*key2, *key_pem, "the joined manager opens another CA key");
    needles.push(("data key".into(), dek.expose().to_vec()));
    needles.push(("data key hex".into(), hex::encode(dek.expose()).into_bytes()));
    assert!(m.data.join("raft/snapshot.bin").exists(), "no snapshot was written to grep");
    let log_segments =
        files_below(&m.data.join("raft/wal")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "log"));
    assert!(log_segments.count() > 0, "no raft log segment to grep");
    let scanned = files_below(env.dir.path()).len();
    assert!(scanned > 10, "scanned only {scanned} files");
    for (what, needle) in &needles {
        let hits = grep_dir(env.dir.path(), needle);
        assert!(hits.is_empty(), "{what} found in plaintext in {hits:?}");
    }
}

/// A few random characters, so canaries differ between runs.
fn rand_suffix() -> String {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).unwrap();
    hex::encode(b)
}
