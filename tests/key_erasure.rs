//! Invariant 11 on disk: a key that is replaced or deleted is overwritten in
//! place first, so the blocks of its unlinked inode do not keep it. Each test
//! holds a descriptor on the old key file's inode from before the operation —
//! what an attacker reading the raw disk would see — and reads through it
//! afterwards: only zeros are left.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

/// A descriptor on the inode `path` names now, with the content it holds now.
struct OldInode {
    what: String,
    file: fs::File,
    len: usize,
}

impl OldInode {
    fn open(what: &str, path: &Path) -> Self {
        let file = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let len = file.metadata().unwrap().len() as usize;
        let me = Self { what: what.to_owned(), file, len };
        assert!(me.read().iter().any(|b| *b != 0), "{what} is empty to begin with");
        me
    }

    fn read(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.len];
        self.file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    /// Waits (deadline) until only zeros are left in the old inode.
    fn wait_zeroed(&self, deadline: std::time::Duration) {
        wait_for(&format!("the old {} to be overwritten with zeros", self.what), deadline, || {
            let now = self.read();
            (now.len() == self.len && now.iter().all(|b| *b == 0)).then_some(())
        });
    }
}

#[test]
fn invariant_11_autolock_overwrites_the_plain_kek_and_node_key() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &[]);
    let kek = OldInode::open("plain KEK", &m1.data.join("keys/kek"));
    let key = OldInode::open("plain node key", &m1.data.join("certs/node.key"));
    m1.ctl_ok(&["cluster", "update", "--autolock=true"]);
    wait_for("the node key to be sealed", DEADLINE, || {
        let text = fs::read_to_string(m1.data.join("certs/node.key")).ok()?;
        (text.contains("SWARMD SEALED PRIVATE KEY") && !m1.data.join("keys/kek").exists()).then_some(())
    });
    kek.wait_zeroed(DEADLINE);
    key.wait_zeroed(DEADLINE);
}

#[test]
fn invariant_11_a_renewal_overwrites_the_replaced_node_keys() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--cert-expiry", "30s"]);
    let w1 = env.join_worker("w1", &m1.token("worker"), &m1.addr);
    m1.wait_ready(2);
    let worker_key = OldInode::open("worker's node key", &w1.data.join("certs/node.key"));
    let manager_key = OldInode::open("manager's node key", &m1.data.join("certs/node.key"));
    // Renewal comes at 50-80 % of a 30 s certificate.
    let renewal = std::time::Duration::from_secs(60);
    worker_key.wait_zeroed(renewal);
    manager_key.wait_zeroed(renewal);
    // The file itself holds the new key.
    let now = fs::read(w1.data.join("certs/node.key")).unwrap();
    assert!(String::from_utf8_lossy(&now).contains("PRIVATE KEY"), "the worker's key file is not a key");
}

#[test]
fn invariant_11_a_demoted_manager_overwrites_its_keys() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--heartbeat", "1s"]);
    let m2 = env.join_manager("m2", &m1.token("manager"), &m1);
    let olds: Vec<OldInode> =
        [("KEK", "keys/kek"), ("sealed data keys", "keys/dek"), ("manager node key", "certs/node.key")]
            .iter()
            .map(|(what, p)| OldInode::open(&format!("demoted manager's {what}"), &m2.data.join(p)))
            .collect();
    let id = m2.node_id();
    wait_for("m2 to be a voter", DEADLINE, || {
        let i = info(&m1)?;
        (i["voters"].as_array()?.len() == 2).then_some(())
    });
    m1.ctl_ok(&["node", "demote", &id]);
    wait_for("m2 to be a worker on disk", DEADLINE, || {
        (m2.data.join("worker.json").exists() && !m2.data.join("keys").exists()).then_some(())
    });
    for old in &olds {
        old.wait_zeroed(DEADLINE);
    }
    wait_for("m2 to be a ready worker", DEADLINE, || {
        let n = m1.node(&id)?;
        (n["role"] == "worker" && n["status"] == "ready").then_some(())
    });
}
