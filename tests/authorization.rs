//! Invariants 1–3 with raw tonic clients (not the CLI): mutual TLS after the
//! join RPCs, the role from the certificate, workers kept off the control API
//! and raft, TLS 1.3 negotiated.

mod common;

use std::sync::Arc;

use common::*;
use swarmd_certs::dial;
use swarmd_certs::tls::{anonymous_client_config, client_config};
use swarmd_certs::NodeIdentity;
use swarmd_proto::ca::ca_client::CaClient;
use swarmd_proto::ca::{GetRootCaRequest, IssueNodeCertificateRequest, RenewNodeCertificateRequest};
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::ListNodesRequest;
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::{HeartbeatRequest, SessionRequest};
use tonic::transport::Channel;
use tonic::Code;

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Every RPC of the manager-only services — all of `Control`, `Raft` and
/// `Cluster`, enumerated from the generated service descriptors, so an RPC
/// added later is covered — called with default (empty) requests.
async fn all_node_rpcs_code(ch: Channel) -> Vec<(String, Code)> {
    let mut out = Vec::new();
    for service in ["swarmd.control.Control", "swarmd.raft.Raft", "swarmd.cluster.Cluster"] {
        for path in grpc::methods(service) {
            let c = code(grpc::call(ch.clone(), &path, Vec::new()).await);
            out.push((path, c));
        }
    }
    assert!(out.len() >= 30, "the descriptors list every RPC: {out:?}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn rpcs_are_authorized_by_certificate_role() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let token = m.token("worker");
    let w1 = env.join_worker("w1", &token, &m.addr);
    m.wait_ready(2);
    let ca_pem = std::fs::read_to_string(m.data.join("certs/ca.crt")).unwrap();

    // Anonymous (verified server, no client certificate): only the join RPCs answer.
    let anon = dial::connect(&m.addr, Arc::new(anonymous_client_config(&ca_pem).unwrap())).await.unwrap();
    let root = CaClient::new(anon.clone()).get_root_ca(GetRootCaRequest {}).await.unwrap().into_inner();
    assert_eq!(root.ca_bundle_pem, ca_pem);
    for (rpc, c) in all_node_rpcs_code(anon.clone()).await {
        assert_eq!(c, Code::Unauthenticated, "anonymous {rpc}");
    }
    assert_eq!(
        code(DispatcherClient::new(anon.clone()).session(SessionRequest { hostname: "x".into() }).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            DispatcherClient::new(anon.clone())
                .heartbeat(HeartbeatRequest { session_id: "x".into(), assignments_seq: 0 })
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            CaClient::new(anon.clone())
                .renew_node_certificate(RenewNodeCertificateRequest { csr_pem: "x".into() })
                .await
        ),
        Code::Unauthenticated
    );
    // A garbage CSR with a valid token is refused and adds no node.
    let before = m.nodes().len();
    let r = CaClient::new(anon.clone())
        .issue_node_certificate(IssueNodeCertificateRequest {
            token: token.clone(),
            csr_pem: "garbage".into(),
            role: "worker".into(),
            hostname: "h".into(),
        })
        .await;
    let err = r.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("certificate signing request"), "{}", err.message());
    assert_eq!(m.nodes().len(), before);

    // A worker certificate: session RPCs yes, control API and raft no.
    let wid = NodeIdentity::load(&w1.data.join("certs")).unwrap();
    let wch = dial::connect(&m.addr, Arc::new(client_config(&wid).unwrap())).await.unwrap();
    for (rpc, c) in all_node_rpcs_code(wch.clone()).await {
        assert_eq!(c, Code::PermissionDenied, "worker {rpc}");
    }
    // Allowed to heartbeat (its own, unknown session → NOT_FOUND, not denied).
    assert_eq!(
        code(
            DispatcherClient::new(wch.clone())
                .heartbeat(HeartbeatRequest { session_id: "nope".into(), assignments_seq: 0 })
                .await
        ),
        Code::NotFound
    );

    // The manager's own certificate may use the control API over TCP.
    let mid = NodeIdentity::load(&m.data.join("certs")).unwrap();
    let mch = dial::connect(&m.addr, Arc::new(client_config(&mid).unwrap())).await.unwrap();
    let nodes = ControlClient::new(mch).list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.len(), 2);

    // An admin certificate, issued through the control socket: the control API
    // over mTLS (secretctl --host tcp://), nothing a node does.
    let dir = env.path("admin");
    let said = m.ctl_ok(&["admin-cert", "--out", dir.to_str().unwrap(), "--expiry", "1h"]);
    assert!(said.contains("secretctl --host tcp://"), "{said}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join("admin.key")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let remote = |args: &[&str], input: &[u8]| {
        use std::io::Write;
        let mut c = std::process::Command::new(secretctl_bin())
            .arg("--host")
            .arg(format!("tcp://{}", m.addr))
            .args(["--tls-cert", dir.join("admin.crt").to_str().unwrap()])
            .args(["--tls-key", dir.join("admin.key").to_str().unwrap()])
            .args(["--tls-ca", dir.join("ca.crt").to_str().unwrap()])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input).unwrap();
        c.wait_with_output().unwrap()
    };
    let o = remote(&["create", "remote-secret"], b"from afar");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = remote(&["ls", "-q"], b"");
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    let o = remote(&["admin-cert", "--out", env.path("admin2").to_str().unwrap()], b"");
    assert!(!o.status.success(), "an admin certificate minted another");
    assert!(String::from_utf8_lossy(&o.stderr).contains("control socket"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = m.ctl(&["admin-cert", "--out", env.path("admin3").to_str().unwrap(), "--expiry", "90d"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("at most 30 days"));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let aid = NodeIdentity::new(read("ca.crt"), read("admin.crt"), zeroize::Zeroizing::new(read("admin.key"))).unwrap();
    let ach = dial::connect(&m.addr, Arc::new(client_config(&aid).unwrap())).await.unwrap();
    for (rpc, c) in all_node_rpcs_code(ach.clone()).await {
        // Every control RPC but the minting of admin certificates (control
        // socket only) gets past authorization; raft and cluster none.
        let control = rpc.starts_with("/swarmd.control.Control/") && !rpc.ends_with("/IssueAdminCertificate");
        if control {
            assert!(!matches!(c, Code::PermissionDenied | Code::Unauthenticated), "admin {rpc}: {c:?}");
        } else {
            assert_eq!(c, Code::PermissionDenied, "admin {rpc}");
        }
    }
    assert_eq!(
        code(DispatcherClient::new(ach.clone()).session(SessionRequest { hostname: "x".into() }).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            CaClient::new(ach.clone())
                .renew_node_certificate(RenewNodeCertificateRequest { csr_pem: "x".into() })
                .await
        ),
        Code::PermissionDenied
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_of_another_cluster_fail_the_handshake() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let ours = env.start_manager("ours", &[]);
    let theirs = env.start_manager("theirs", &[]);
    let their_id = NodeIdentity::load(&theirs.data.join("certs")).unwrap();
    // Their manager certificate, trusting our CA so the server check passes.
    let mut mixed = their_id.clone();
    mixed.ca_pem = std::fs::read_to_string(ours.data.join("certs/ca.crt")).unwrap();
    let cfg = client_config(&mixed).unwrap();
    // With TLS 1.3 the refusal may only surface on the first RPC.
    let result = match dial::connect(&ours.addr, Arc::new(cfg)).await {
        Err(_) => Code::Unavailable,
        Ok(ch) => code(ControlClient::new(ch).list_nodes(ListNodesRequest {}).await),
    };
    assert_ne!(result, Code::Ok, "a foreign manager certificate was accepted");
    assert_eq!(ours.nodes().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_negotiate_tls13_with_an_aead_suite() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let id = NodeIdentity::load(&m.data.join("certs")).unwrap();
    let stream = dial::tls_connect(&m.addr, Arc::new(client_config(&id).unwrap())).await.unwrap();
    let conn = stream.get_ref().1;
    assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let suite = format!("{:?}", conn.negotiated_cipher_suite().unwrap().suite());
    assert!(suite.contains("GCM") || suite.contains("CHACHA20_POLY1305"), "{suite}");
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));

    // A TLS 1.2-only client still connects (1.2 is the minimum).
    let mut cfg12 = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(id.roots().unwrap())
        .with_no_client_auth();
    cfg12.alpn_protocols = vec![b"h2".to_vec()];
    let s12 = dial::tls_connect(&m.addr, Arc::new(cfg12)).await.unwrap();
    assert_eq!(s12.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
}
