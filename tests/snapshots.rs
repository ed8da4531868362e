//! A manager that joins after more than 20,000 entries is brought up to date
//! through a snapshot (the leader has compacted its log), and ends with the
//! same state digest.

mod common;

use common::*;
use swarmd::secretctl::{connect, Host};
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::UpdateNodeRequest;

#[tokio::test(flavor = "multi_thread")]
async fn a_late_manager_catches_up_through_a_snapshot() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &[]);
    let me = m1.node_id();
    let channel = connect(&Host::Unix(m1.socket())).await.unwrap();

    // 20,500 committed entries from 64 concurrent clients.
    const WRITES: usize = 20_500;
    const CLIENTS: usize = 64;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = ControlClient::new(channel.clone());
        let me = me.clone();
        tasks.push(tokio::spawn(async move {
            for i in (c..WRITES).step_by(CLIENTS) {
                let req = UpdateNodeRequest {
                    id_or_prefix: me.clone(),
                    labels_add: [(format!("c{c}"), i.to_string())].into(),
                    ..Default::default()
                };
                client.update_node(req).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("{WRITES} writes from {CLIENTS} clients in {:?}", started.elapsed());
    let i1 = wait_for("a snapshot on the leader", DEADLINE, || {
        let i = info(&m1)?;
        (i["snapshot_index"].as_u64()? >= 20_000).then_some(i)
    });
    assert!(i1["last_log_index"].as_u64().unwrap() > 20_000);

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
    assert_eq!(labels.len(), CLIENTS);
}
