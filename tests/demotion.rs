//! Invariant 10: a node's power is what the cluster says now, not what its
//! certificate says. A demoted manager keeps a valid manager certificate for a
//! while; with it (and with any manager certificate the cluster does not list
//! as a current manager) every RPC of the Control, Cluster and Raft services is
//! refused, connections opened before the demotion are closed, a forwarded
//! write is re-authorized by the leader, and workers stop trusting the demoted
//! manager as a server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use swarmd_certs::dial;
use swarmd_certs::tls::client_config;
use swarmd_certs::{generate_key_and_csr, CertValidity, NodeId, NodeIdentity, Role, RootCa};
use swarmd_proto::cluster::cluster_client::ClusterClient;
use swarmd_proto::cluster::{GetDataKeyRequest, ProposeRequest};
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::ListNodesRequest;
use tonic::Code;

/// Codes that mean the handler ran past authorization.
fn authorized(code: Code) -> bool {
    matches!(code, Code::Ok | Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists)
}

/// Calls every RPC of the three manager services at `addr` with `id`'s
/// certificate; returns those that were not refused.
async fn sweep(addr: &str, id: &NodeIdentity) -> Vec<(String, Code)> {
    let mut let_through = Vec::new();
    for service in ["swarmd.control.Control", "swarmd.cluster.Cluster", "swarmd.raft.Raft"] {
        for path in grpc::methods(service) {
            let code = match dial::connect(addr, Arc::new(client_config(id).unwrap())).await {
                Err(_) => Code::Unavailable,
                Ok(ch) => match grpc::call(ch, &path, Vec::new()).await {
                    Ok(_) => Code::Ok,
                    Err(s) => s.code(),
                },
            };
            if authorized(code) {
                let_through.push((path, code));
            }
        }
    }
    let_through
}

/// A manager certificate for `node` that the cluster never recorded, signed
/// with the cluster's CA key (read from a stopped manager's data dir).
fn forged_manager_identity(ca: &RootCa, node: &NodeId) -> NodeIdentity {
    let (key, csr) = generate_key_and_csr().unwrap();
    let issued =
        ca.sign_node(&csr, node, Role::Manager, CertValidity::new(Duration::from_secs(3600)).unwrap()).unwrap();
    NodeIdentity::new(ca.cert_pem().to_owned(), issued.pem, key).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_10_a_demoted_managers_certificate_is_refused_by_every_manager_rpc() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let ([m1, m2, m3], _) = env.three_managers(&[]);
    let w = env.join_worker("w", &m1.token("worker"), &m1.addr);
    m1.wait_ready(4);
    let m3_id: NodeId = m3.node_id().parse().unwrap();

    // The CA key, from m2 stopped for a moment, to forge certificates the
    // cluster never issued (the RPC checks must stand on their own).
    let m2_idx = m2.proc_idx;
    assert!(env.proc(m2_idx).terminate().success());
    let ca_key = swarmd_manager::open_ca_key_offline(&m2.data).unwrap();
    let ca = RootCa::from_pem(&std::fs::read_to_string(m2.data.join("certs/ca.crt")).unwrap(), &ca_key).unwrap();
    env.run_node("m2", &m2.data);
    wait_for("m2 back", DEADLINE, || info(&m2).filter(|i| i["leader_raft_id"] != "").map(|_| ()));

    // Before: m3's certificate drives the control API and a connection stays open.
    let old = NodeIdentity::load(&m3.data.join("certs")).unwrap();
    assert_eq!(old.info.role, Role::Manager);
    let before = dial::connect(&m1.addr, Arc::new(client_config(&old).unwrap())).await.unwrap();
    ControlClient::new(before.clone()).list_nodes(ListNodesRequest {}).await.expect("a manager lists nodes");

    m1.ctl_ok(&["node", "demote", &m3.node_id()]);
    wait_for("m3 to run as a worker", Duration::from_secs(60), || m3.data.join("worker.json").exists().then_some(()));
    wait_for("m3's demotion applied on m1 and m2", DEADLINE, || {
        [&m1, &m2].iter().all(|m| m.node(m3_id.as_str()).is_some_and(|n| n["role"] == "worker")).then_some(())
    });

    // The connection opened before the demotion is closed or refused.
    let r = ControlClient::new(before).list_nodes(ListNodesRequest {}).await;
    assert!(r.is_err(), "an open connection kept the demoted manager's powers");

    // Every RPC of Control, Cluster and Raft, on both remaining managers.
    for m in [&m1, &m2] {
        let through = sweep(&m.addr, &old).await;
        assert!(through.is_empty(), "{} let the demoted certificate through: {through:?}", m.name);
    }
    // The same with a manager certificate the deny-list does not know: the
    // store's current role decides, RPC by RPC.
    let forged = forged_manager_identity(&ca, &m3_id);
    for m in [&m1, &m2] {
        let through = sweep(&m.addr, &forged).await;
        assert!(
            through.is_empty(),
            "{} let an unrecorded certificate of the demoted node through: {through:?}",
            m.name
        );
    }
    let stranger = forged_manager_identity(&ca, &NodeId::random());
    let through = sweep(&m1.addr, &stranger).await;
    assert!(through.is_empty(), "a manager certificate of no member was let through: {through:?}");

    // A hand-built SetRole{Manager} forwarded with it is refused, and the data key stays out of reach.
    let cmd = swarmd_manager::state::Command::SetRole { node: m3_id.clone(), role: Role::Manager };
    let ch = dial::connect(&m1.addr, Arc::new(client_config(&forged).unwrap())).await.unwrap();
    let r = ClusterClient::new(ch.clone()).propose(ProposeRequest { command: bincode::serialize(&cmd).unwrap() }).await;
    assert_eq!(r.unwrap_err().code(), Code::PermissionDenied);
    assert!(ClusterClient::new(ch).get_data_key(GetDataKeyRequest {}).await.is_err());
    assert_eq!(m1.node(m3_id.as_str()).unwrap()["role"], "worker");

    // Workers drop the demoted manager from what they dial and trust.
    let m3_addr = m3.addr.clone();
    let trusted: Vec<NodeId> = wait_for("the worker to forget m3", DEADLINE, || {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(w.data.join("worker.json")).ok()?).ok()?;
        let remotes: Vec<&str> = cfg["remotes"].as_array()?.iter().filter_map(|v| v.as_str()).collect();
        let ids: Vec<&str> = cfg["managers"].as_array()?.iter().filter_map(|v| v.as_str()).collect();
        (ids.len() == 2 && !ids.contains(&m3_id.as_str()) && !remotes.contains(&m3_addr.as_str()))
            .then(|| ids.iter().map(|i| i.parse().unwrap()).collect())
    });
    // And refuse it as a server: a listener presenting m3's old manager
    // certificate, dialed with the worker's own identity and what it trusts.
    let wid = NodeIdentity::load(&w.data.join("certs")).unwrap();
    let impostor = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor_addr = impostor.local_addr().unwrap().to_string();
    let server = Arc::new(swarmd_certs::tls::server_config(&old, Default::default()).unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = impostor.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    let checked = |ids: Vec<NodeId>| {
        let managers = swarmd_certs::tls::ManagerSet::default();
        managers.replace(ids.into_iter().collect());
        let checks = swarmd_certs::tls::ServerChecks { deny: None, managers: Some(managers) };
        Arc::new(swarmd_certs::tls::client_config_checked(&wid, &checks).unwrap())
    };
    assert!(
        dial::tls_connect(&impostor_addr, checked(trusted)).await.is_err(),
        "the worker trusted the demoted manager"
    );
    // (The control: before any session said who the managers are, it would.)
    assert!(dial::tls_connect(&impostor_addr, checked(Vec::new())).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_10_the_leader_reauthorizes_forwarded_writes() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let (ms, leader) = env.three_managers(&[]);
    let (l, f) = (&ms[leader], &ms[(leader + 1) % 3]);
    // A current manager's own certificate: a raft member, fully trusted — and
    // still, only the writes a follower makes for a client or a node it serves.
    let fid = NodeIdentity::load(&f.data.join("certs")).unwrap();
    let lid: NodeId = l.node_id().parse().unwrap();
    let ch = dial::connect(&l.addr, Arc::new(client_config(&fid).unwrap())).await.unwrap();
    use swarmd_manager::state::{Command, NodeStatus, StatusChange};
    let refused = [
        Command::SetRaftMember { node: lid.clone(), raft_id: 42, addr: "127.0.0.1:1".into() },
        Command::Batch(vec![Command::SetRole { node: lid.clone(), role: Role::Worker }]),
        Command::SetRole { node: lid.clone(), role: Role::Worker },
        Command::RetireDataKeys { below: 9 },
        Command::SetStatus(vec![StatusChange {
            node: lid.clone(),
            status: NodeStatus::Down,
            addr: None,
            reporter: lid.clone(),
        }]),
    ];
    let before = info(l).unwrap()["state_digest"].clone();
    for cmd in refused {
        let what = format!("{cmd:?}");
        let r =
            ClusterClient::new(ch.clone()).propose(ProposeRequest { command: bincode::serialize(&cmd).unwrap() }).await;
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied, "forwarded {what}");
    }
    assert_eq!(info(l).unwrap()["state_digest"], before, "a refused forward changed the state");
}

/// A manager demoted while it was down never hears of it through raft (its
/// peers refuse its certificate): when it comes back it asks them, learns it
/// from their `certificate_revoked`, and becomes a worker of the cluster
/// instead of a manager that retries elections forever.
#[tokio::test(flavor = "multi_thread")]
async fn invariant_10_a_manager_demoted_while_down_becomes_a_worker_when_it_returns() {
    let mut env = Env::new();
    let ([m1, m2, m3], _) = env.three_managers(&[]);
    let m3_id = m3.node_id();
    assert!(env.proc(m3.proc_idx).terminate().success());
    let live = wait_for("a leader among m1 and m2", DEADLINE, || [&m1, &m2].into_iter().find(|m| m.is_leader()));
    // (A new leader counts a peer reachable once it has replicated to it.)
    wait_for("m1 and m2 to demote m3", DEADLINE, || {
        live.ctl(&["node", "demote", &m3_id]).status.success().then_some(())
    });
    wait_for("m3's demotion applied", DEADLINE, || (live.node(&m3_id)?["role"] == "worker").then_some(()));

    let again = env.run_node("m3-again", &m3.data);
    wait_for("m3 to turn itself into a worker", Duration::from_secs(90), || {
        m3.data.join("worker.json").exists().then_some(())
    });
    wait_for("m3 to be a ready worker", DEADLINE, || {
        let n = live.node(&m3_id)?;
        (n["role"] == "worker" && n["status"] == "ready").then_some(())
    });
    assert!(
        !m3.data.join("keys").exists() || std::fs::read_dir(m3.data.join("keys")).unwrap().next().is_none(),
        "the demoted manager kept its keys"
    );
    assert!(!m3.data.join("raft").exists(), "the demoted manager kept its raft store");
    assert!(env.proc(again).child.try_wait().unwrap().is_none(), "m3 exited instead of running as a worker");
    assert!(env.proc(again).log_text().contains("demoted"));
}
