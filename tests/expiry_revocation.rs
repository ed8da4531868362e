//! Invariant 10, certificate expiry and revocation on connections that are
//! already open: an admin certificate stops working when it expires, even on a
//! connection opened before; `secretctl admin-cert revoke` refuses one on every
//! manager at once, closing its connections; `admin-cert ls` shows both.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use swarmd_certs::dial;
use swarmd_certs::tls::client_config;
use swarmd_certs::NodeIdentity;
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::{GetJoinTokenRequest, ListNodesRequest};
use tonic::transport::Channel;

fn admin_identity(dir: &std::path::Path) -> NodeIdentity {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    NodeIdentity::new(read("ca.crt"), read("admin.crt"), zeroize::Zeroizing::new(read("admin.key"))).unwrap()
}

async fn lists_nodes(ch: &Channel) -> bool {
    ControlClient::new(ch.clone()).list_nodes(ListNodesRequest {}).await.is_ok()
}

async fn fresh(addr: &str, id: &NodeIdentity) -> Option<Channel> {
    dial::connect(addr, Arc::new(client_config(id).unwrap())).await.ok()
}

fn admin_certs(m: &Manager) -> Vec<Value> {
    serde_json::from_str(&m.ctl_ok(&["--format", "json", "admin-cert", "ls"])).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_10_an_expired_admin_certificate_stops_working_on_open_connections() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m", &[]);
    let dir = env.path("short");
    m.ctl_ok(&["admin-cert", "--out", dir.to_str().unwrap(), "--expiry", "30s"]);
    let id = admin_identity(&dir);
    let open = fresh(&m.addr, &id).await.expect("an admin connection");
    assert!(lists_nodes(&open).await);

    // Past its NotAfter (webpki allows no slack): the connection opened before is useless.
    let wait = (id.info.not_after - swarmd_now()).max(0) as u64 + 2;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert!(!lists_nodes(&open).await, "an expired admin certificate listed nodes on an open connection");
    let mut control = ControlClient::new(open.clone());
    let token = control.get_join_token(GetJoinTokenRequest { role: "manager".into(), rotate: false }).await;
    assert!(token.is_err(), "an expired admin certificate read the manager token");
    match fresh(&m.addr, &id).await {
        None => {}
        Some(ch) => assert!(!lists_nodes(&ch).await, "an expired admin certificate passed a new handshake"),
    }
    let listed = admin_certs(&m);
    assert!(listed.is_empty(), "admin-cert ls lists an expired certificate: {listed:?}");
    // A fresh one is listed, with its serial.
    let dir2 = env.path("long");
    m.ctl_ok(&["admin-cert", "--out", dir2.to_str().unwrap(), "--expiry", "1h"]);
    let listed = admin_certs(&m);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["serial"], admin_identity(&dir2).info.serial.as_str());
}

fn swarmd_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_10_a_revoked_admin_certificate_is_refused_cluster_wide_at_once() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &[]);
    let m2 = env.join_manager("m2", &m1.token("manager"), &m1);
    let dir = env.path("admin");
    let said = m1.ctl_ok(&["admin-cert", "--out", dir.to_str().unwrap(), "--expiry", "1h"]);
    let id = admin_identity(&dir);
    assert!(said.contains(&id.info.serial), "{said}");
    let keep_dir = env.path("other");
    m1.ctl_ok(&["admin-cert", "--out", keep_dir.to_str().unwrap(), "--expiry", "1h"]);
    let other = admin_identity(&keep_dir);

    // Connections on both managers, open before the revocation.
    let on1 = fresh(&m1.addr, &id).await.unwrap();
    let on2 = wait_for_async_channel(&m2.addr, &id).await;
    assert!(lists_nodes(&on1).await && lists_nodes(&on2).await);

    let listed = admin_certs(&m1);
    let me = listed.iter().find(|c| c["serial"] == id.info.serial.as_str()).expect("listed");
    assert_eq!(me["revoked"], false);
    // Revoked through m2 (a follower): the leader records it, every manager enforces it.
    m2.ctl_ok(&["admin-cert", "revoke", &id.info.serial]);
    for (name, ch) in [("m1", &on1), ("m2", &on2)] {
        wait_for_async(&format!("the open connection on {name} to be refused"), || async { !lists_nodes(ch).await })
            .await;
    }
    for m in [&m1, &m2] {
        if let Some(ch) = fresh(&m.addr, &id).await {
            assert!(!lists_nodes(&ch).await, "{}: a revoked certificate passed a new handshake", m.name);
        }
    }
    let listed = admin_certs(&m2);
    let me = listed.iter().find(|c| c["serial"] == id.info.serial.as_str()).unwrap();
    assert_eq!(me["revoked"], true);
    // The other admin certificate keeps working.
    let ch = fresh(&m1.addr, &other).await.unwrap();
    assert!(lists_nodes(&ch).await, "revoking one admin certificate broke another");
    // Bad serials are refused clearly and change nothing.
    for bad in ["zz", "", "00112233445566778899aabbccddeeff00"] {
        let o = m1.ctl(&["admin-cert", "revoke", bad]);
        assert!(!o.status.success(), "revoke {bad:?} succeeded");
    }
    assert_eq!(admin_certs(&m1).len(), 2);
}

async fn wait_for_async_channel(addr: &str, id: &NodeIdentity) -> Channel {
    // A follower may not have applied the certificate's record yet.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(ch) = fresh(addr, id).await {
            if lists_nodes(&ch).await {
                return ch;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no admin connection to {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + DEADLINE;
    while !f().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
