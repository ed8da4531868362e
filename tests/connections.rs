//! Invariant 12, connections: what a client that opens connections and sends
//! nothing can hold. Anonymous TLS clients that never send the HTTP/2 preface
//! are closed after the preface timeout; past the per-address cap new
//! connections are closed at once; the established session of a real worker
//! is not disturbed, and new connections are accepted again afterwards.

mod common;

use common::grpc;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use swarmd_certs::dial;
use swarmd_certs::tls::{anonymous_client_config, client_config};
use swarmd_certs::NodeIdentity;
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::ListNodesRequest;
use tokio::io::AsyncReadExt;

/// Whether the server closed `s` within `within` (EOF or an error on read).
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // (TLS 1.3 session tickets and the like.)
            Ok(Ok(_)) => continue,
        }
    }
}

/// The node's last heartbeat as `node ls` shows it (RFC 3339, to the second).
fn last_heartbeat(m: &Manager, id: &str) -> String {
    m.node(id).and_then(|n| n["session"]["last_heartbeat"].as_str().map(str::to_owned)).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_12_idle_and_excess_connections_are_closed_without_disturbing_sessions() {
    swarmd_certs::install_crypto_provider();
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let mut env = Env::new();
    let m = env.start_manager("m", &["--heartbeat", "1s"]);
    let w = env.join_worker("w", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let wid = w.node_id();
    let ca = std::fs::read_to_string(m.data.join("certs/ca.crt")).unwrap();
    let anon = Arc::new(anonymous_client_config(&ca).unwrap());

    // 300 clients that finish the TLS handshake and then send nothing.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(dial::tls_connect(&m.addr, anon.clone()).await.expect("a TLS handshake"));
    }
    let checks = idle.iter_mut().map(|s| closed_within(s, Duration::from_secs(60)));
    let closed = futures::future::join_all(checks).await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} of 300 silent TLS clients were kept open past the preface timeout");
    drop(idle);

    // Past the cap of unauthenticated connections from one source (2,048 here),
    // new ones are closed at once.
    let beat0 = last_heartbeat(&m, &wid);
    let mut flood = Vec::new();
    for _ in 0..4300 {
        match tokio::net::TcpStream::connect(&m.addr).await {
            Ok(s) => flood.push(s),
            Err(_) => break,
        }
    }
    let checks = flood.iter_mut().map(|s| closed_within(s, Duration::from_secs(3)));
    let refused = futures::future::join_all(checks).await.into_iter().filter(|c| *c).count();
    assert!(refused >= 100, "only {refused} of {} connections past the cap were refused", flood.len());
    assert!(refused < flood.len(), "every connection was refused: the cap is not per address");

    // The worker's session went on throughout.
    assert!(!beat0.is_empty(), "the worker has no session");
    wait_for("the worker to keep heartbeating", DEADLINE, || (last_heartbeat(&m, &wid) != beat0).then_some(()));
    assert_eq!(m.node(&wid).unwrap()["status"], "ready");
    drop(flood);

    // And once the flood is gone, new authenticated connections are accepted.
    let mid = NodeIdentity::load(&m.data.join("certs")).unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(ch) = dial::connect(&m.addr, Arc::new(client_config(&mid).unwrap())).await {
            if ControlClient::new(ch).list_nodes(ListNodesRequest {}).await.is_ok() {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no new connection was accepted after the flood");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_12_refused_callers_are_answered_before_their_request_body_is_read() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m", &[]);
    let w = env.join_worker("w", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let ca = std::fs::read_to_string(m.data.join("certs/ca.crt")).unwrap();
    let anon = Arc::new(anonymous_client_config(&ca).unwrap());
    let worker = Arc::new(client_config(&NodeIdentity::load(&w.data.join("certs")).unwrap()).unwrap());
    let managers = ["swarmd.control.Control", "swarmd.cluster.Cluster", "swarmd.raft.Raft"];
    let mut calls = Vec::new();
    for (who, cfg, services) in [
        ("anonymous", anon, [&managers[..], &["swarmd.dispatcher.Dispatcher"]].concat()),
        ("worker", worker, managers.to_vec()),
    ] {
        for service in services {
            let conn = dial::connect(&m.addr, cfg.clone()).await.expect("a connection");
            for path in grpc::methods(service) {
                let ch = conn.clone();
                calls.push(async move {
                    // An empty message is a valid request of every type: a
                    // server that decodes before it authorizes waits for the end.
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        grpc::call_with_endless_body(ch, &path, Vec::new()),
                    )
                    .await;
                    match r {
                        Err(_) => Some(format!("{who} {path}: no answer while the request body was still open")),
                        Ok(Ok(_)) => Some(format!("{who} {path}: accepted")),
                        Ok(Err(s))
                            if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) =>
                        {
                            None
                        }
                        Ok(Err(s)) => Some(format!("{who} {path}: {:?} {}", s.code(), s.message())),
                    }
                });
            }
        }
    }
    let n = calls.len();
    let failures: Vec<String> = futures::future::join_all(calls).await.into_iter().flatten().collect();
    assert!(
        failures.is_empty(),
        "{} of {n} refused calls were not refused before their body:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_12_a_flood_of_anonymous_connections_leaves_room_for_nodes() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    // 1,024 files: a global cap of 512 connections, at most 256 of them
    // anonymous, 128 from one source.
    env.limit_open_files(1024);
    let m = env.start_manager("m", &[]);
    let mid = Arc::new(client_config(&NodeIdentity::load(&m.data.join("certs")).unwrap()).unwrap());
    // 600 TCP connections that start no handshake (each counts as anonymous
    // until its handshake ends, for up to 10 s).
    let mut flood = Vec::new();
    for _ in 0..600 {
        match tokio::net::TcpStream::connect(&m.addr).await {
            Ok(s) => flood.push(s),
            Err(_) => break,
        }
    }
    assert_eq!(flood.len(), 600, "the flood could not open its connections");
    // While they are held, a certificate holder still gets in.
    let ch = tokio::time::timeout(Duration::from_secs(5), dial::connect(&m.addr, mid))
        .await
        .expect("no hang")
        .expect("the manager accepted no connection from a certificate holder during an anonymous flood");
    ControlClient::new(ch).list_nodes(ListNodesRequest {}).await.expect("node ls over the connection");
    let refused = futures::future::join_all(flood.iter_mut().map(|s| closed_within(s, Duration::from_millis(500))))
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    assert!(refused >= 400, "only {refused} of 600 anonymous connections were refused past the anonymous cap");
}

/// Opens `streams` requests to `path` on one HTTP/2 connection over `tls`,
/// each declaring a gRPC message of `len` bytes and sending all of it but the
/// last byte: a server that buffers messages before it decodes them holds
/// them all. Returns what keeps them open.
async fn hold_partial_requests(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
    streams: usize,
    len: usize,
) -> Vec<h2::SendStream<bytes::Bytes>> {
    let (client, conn) = h2::client::handshake(tls).await.expect("HTTP/2");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut held = Vec::new();
    for _ in 0..streams {
        let Ok(mut ready) = client.clone().ready().await else { break };
        let req = http::Request::post(format!("https://swarm-manager{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let Ok((_response, mut send)) = ready.send_request(req, false) else { break };
        let mut body = Vec::with_capacity(5 + len);
        body.push(0);
        body.extend_from_slice(&(len as u32).to_be_bytes());
        body.resize(5 + len - 1, b'x');
        let _ = send.send_data(bytes::Bytes::from(body), false);
        held.push(send);
    }
    held
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_12_a_worker_certificate_cannot_make_a_manager_hold_undecoded_requests() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m", &[]);
    let w = env.join_worker("w", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let worker = Arc::new(client_config(&NodeIdentity::load(&w.data.join("certs")).unwrap()).unwrap());
    let ca = std::fs::read_to_string(m.data.join("certs/ca.crt")).unwrap();
    let anon = Arc::new(anonymous_client_config(&ca).unwrap());
    let pid = env.procs[m.proc_idx].pid();
    let rss0 = rss_kib(pid);
    // 3 connections (the worker's session is the 4th its identity may have),
    // 64 streams each, of a 500 KB PushLogs request less one byte: 96 MB if
    // the manager held them.
    let mut held = Vec::new();
    for _ in 0..3 {
        let tls = dial::tls_connect(&m.addr, worker.clone()).await.expect("a connection");
        held.push(hold_partial_requests(tls, "/swarmd.dispatcher.Dispatcher/PushLogs", 64, 500_000).await);
    }
    // A 5th connection of the identity is refused.
    let mut fifth = dial::tls_connect(&m.addr, worker.clone()).await.expect("a TLS handshake");
    assert!(closed_within(&mut fifth, Duration::from_secs(5)).await, "a worker identity got a 5th connection");
    // And 200 anonymous connections of 4 join requests of 30 KB each (24 MB).
    for _ in 0..200 {
        let Ok(tls) = dial::tls_connect(&m.addr, anon.clone()).await else { break };
        held.push(hold_partial_requests(tls, "/swarmd.ca.Ca/IssueNodeCertificate", 4, 30_000).await);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let grew = rss_kib(pid).saturating_sub(rss0);
    assert!(grew < 64 * 1024, "the manager holds {} MiB of undecoded requests", grew / 1024);
    drop(held);
    // The worker's own session went on.
    assert_eq!(m.node(&w.node_id()).unwrap()["status"], "ready");
}
