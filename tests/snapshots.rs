//! A manager that joins after more than 20,000 entries is brought up to date
//! through a snapshot (the leader has compacted its log), and ends with the
//! same state digest.

mod common;

use common::*;
use swarmd::secretctl::{connect, Host};
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::UpdateNodeRequest;

/// The two tests here each load the machine (64 writers; 100 MiB of state):
/// they take turns instead of starving each other's deadlines.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn a_late_manager_catches_up_through_a_snapshot() {
    let _turn = HEAVY.lock().await;
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    // A snapshot every 1,000 entries (the default is 10,000; concurrent writes
    // share entries, so entries are what counts here, not writes).
    let m1 = env.start_manager("m1", &["--snapshot-interval", "1000"]);
    let me = m1.node_id();

    // 64 concurrent clients write until the log holds more than 2,050 entries.
    const ENTRIES: u64 = 2_050;
    const CLIENTS: usize = 64;
    let started = std::time::Instant::now();
    let writes = fill_log(&m1, ENTRIES, CLIENTS).await;
    eprintln!("{writes} writes from {CLIENTS} clients in {:?}", started.elapsed());
    // One snapshot at or past 1,000 means the log behind it is gone, so the
    // joiner can only catch up through a snapshot.
    let i1 = wait_snapshot_covering(&m1, 1_000);
    assert!(i1["last_log_index"].as_u64().unwrap() > ENTRIES);

    let m2 = env.join_manager("m2", &m1.token("manager"), &m1);
    let target = info(&m1).unwrap();
    wait_for("m2 to reach the leader's state", DEADLINE, || {
        let i = info(&m2)?;
        (i["last_applied"] == target["last_applied"]
            || i["last_applied"].as_u64()? > target["last_applied"].as_u64()?)
        .then_some(())
    });
    let log = env.procs[m2.proc_idx].log_text();
    assert!(log.contains("installed a snapshot"), "m2 was not brought up through a snapshot:\n{log}");
    wait_for("equal state digests", DEADLINE, || {
        let (a, b) = (info(&m1)?, info(&m2)?);
        (a["last_applied"] == b["last_applied"] && a["state_digest"] == b["state_digest"]).then_some(())
    });
    let labels = m2.node(&me).unwrap()["labels"].as_object().unwrap().clone();
    assert!((0..CLIENTS).all(|c| labels.contains_key(&format!("c{c}"))), "a client's labels are missing on m2");
}

/// A 100 MiB state (100 nodes with 256 labels of 4,000 bytes each, written
/// through the control API) reaches a new manager as a chunked snapshot, while
/// writes keep within their deadline (snapshots are cut on a blocking thread;
/// the managers' own loops read a small index, never every node record).
#[tokio::test(flavor = "multi_thread")]
async fn a_100_mib_state_reaches_a_new_manager_as_a_snapshot() {
    use swarmd_proto::ca::ca_client::CaClient;
    use swarmd_proto::ca::IssueNodeCertificateRequest;
    let _turn = HEAVY.lock().await;
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let interval = std::env::var("SNAP_EVERY").unwrap_or_else(|_| "50".into());
    let m1 = env.start_manager("m1", &["--snapshot-interval", &interval]);
    let t0 = std::time::Instant::now();
    let token = m1.token("worker");
    let ca = std::fs::read_to_string(m1.data.join("certs/ca.crt")).unwrap();
    let anon = swarmd_certs::dial::connect(
        &m1.addr,
        std::sync::Arc::new(swarmd_certs::tls::anonymous_client_config(&ca).unwrap()),
    )
    .await
    .unwrap();
    let control = connect(&Host::Unix(m1.socket())).await.unwrap();
    const NODES: usize = 100;
    let mut filler = 0u64;
    for n in 0..NODES {
        let (_key, csr) = swarmd_certs::generate_key_and_csr().unwrap();
        let id = CaClient::new(anon.clone())
            .issue_node_certificate(IssueNodeCertificateRequest {
                token: token.clone(),
                csr_pem: csr,
                hostname: format!("fake{n}"),
                role: "worker".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .node_id;
        let labels = (0..256)
            .map(|l| {
                filler += 1;
                // Distinct, incompressible-looking content.
                let v: String = (0..500).map(|i| format!("{:08x}", (filler * 2654435761 + i) % 0xffff_ffff)).collect();
                (format!("l{l}"), v)
            })
            .collect();
        // Setting the same labels again is idempotent: retry a write whose
        // confirmation timed out on this busy machine.
        let req = UpdateNodeRequest { id_or_prefix: id, labels_add: labels, ..Default::default() };
        let mut attempts = 0;
        loop {
            match ControlClient::new(control.clone()).update_node(req.clone()).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::DeadlineExceeded && attempts < 3 => attempts += 1,
                Err(s) => panic!("update_node: {s}"),
            }
        }
    }
    eprintln!("{NODES} x 1 MiB writes in {:?}", t0.elapsed());
    let covered = info(&m1).unwrap()["last_applied"].as_u64().unwrap();
    let i1 = wait_snapshot_covering(&m1, covered);
    eprintln!("leader: {i1}");
    let raft_bytes: u64 = files_below(&m1.data.join("raft")).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert!(raft_bytes > 100 << 20, "state smaller than intended: {raft_bytes} bytes");

    // The new manager can only catch up through the snapshot: the log behind it is gone.
    let data = env.path("m2");
    let addr = format!("127.0.0.1:{}", free_port());
    let mtoken = m1.token("manager");
    let idx = env.spawn(
        "m2",
        &[
            "manager",
            "join",
            &mtoken,
            "--remote",
            &m1.addr,
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-addr",
            &addr,
        ],
    );
    let m2 = Manager { name: "m2".into(), data, addr, proc_idx: idx };
    wait_for("m2 to join", std::time::Duration::from_secs(180), || m2.data.join("manager.json").exists().then_some(()));
    wait_for("equal state digests", std::time::Duration::from_secs(60), || {
        let (a, b) = (info(&m1)?, info(&m2)?);
        (a["last_applied"] == b["last_applied"] && a["state_digest"] == b["state_digest"]).then_some(())
    });
    let log = env.procs[m2.proc_idx].log_text();
    assert!(log.contains("installed a snapshot"), "no snapshot was installed:\n{log}");
    let (n1, n2) = (m1.nodes().len(), m2.nodes().len());
    assert_eq!((n1, n2), (NODES + 2, NODES + 2), "node lists differ: m1 {n1}, m2 {n2}");
}
