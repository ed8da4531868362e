//! Simulated nodes for the load benches: each one joins with the real join
//! protocol (root CA pinned by the token, a fresh P-256 key, a certificate from
//! `IssueNodeCertificate`) and then speaks to the managers over mTLS with its
//! own certificate, exactly as `swarmd worker` does, without running tasks.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use swarmd_certs::tls::client_config;
use swarmd_certs::{JoinToken, NodeIdentity, Role};
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::{HeartbeatRequest, SessionRequest};
use tonic::transport::Channel;

/// A joined node: its identity and the TLS configuration it dials with.
pub struct SimNode {
    pub identity: NodeIdentity,
    pub tls: Arc<ClientConfig>,
}

/// Joins one worker through the manager at `addr`.
pub async fn join(token: &str, addr: &str, hostname: &str) -> Result<SimNode, String> {
    let token: JoinToken = token.parse().map_err(|e| format!("{e}"))?;
    let issued = swarmd_certs::join::request_certificate(&token, &[addr.to_owned()], hostname, Role::Worker)
        .await
        .map_err(|e| e.to_string())?;
    let tls = Arc::new(client_config(&issued.identity).map_err(|e| e.to_string())?);
    Ok(SimNode { identity: issued.identity, tls })
}

/// Joins `n` workers, `parallel` at a time.
pub async fn join_many(token: &str, addr: &str, n: usize, parallel: usize) -> Vec<SimNode> {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|i| async move { join(token, addr, &format!("sim-{i}")).await.expect("simulated join") })
        .buffer_unordered(parallel)
        .collect()
        .await
}

/// An mTLS channel to `addr` with `node`'s certificate, connected now.
pub async fn channel(node: &SimNode, addr: &str) -> Channel {
    swarmd_certs::dial::connect(addr, node.tls.clone()).await.expect("mTLS connection to the manager")
}

/// A session kept by a background task.
pub struct Session(tokio::task::JoinHandle<()>);

impl Session {
    /// Whether the session ended (the manager cut it or a heartbeat failed).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Ends it.
    pub fn abort(&self) {
        self.0.abort();
    }
}

/// Opens `node`'s session on `ch` and keeps it: reads the session stream,
/// acknowledges its assignments as a worker does (the first complete set at
/// once: the manager counts the node ready only then) and heartbeats at the
/// period the manager asks for, until the stream ends. Returns once the
/// session is open (its first message arrived).
pub async fn open_session(ch: Channel, hostname: String) -> Session {
    open_session_renewing(ch, hostname, false).await
}

/// [`open_session`], and with `renew` the node renews its certificate (a fresh
/// key, on the session's connection, retried each second up to five times)
/// whenever the session asks, as a worker does during a root CA rotation.
pub async fn open_session_renewing(ch: Channel, hostname: String, renew: bool) -> Session {
    let ca = ch.clone();
    let renew_now = move || {
        let ca = ca.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                let (_key, csr) = swarmd_certs::generate_key_and_csr().expect("a key and CSR");
                let req = swarmd_proto::ca::RenewNodeCertificateRequest { csr_pem: csr };
                if swarmd_proto::ca::ca_client::CaClient::new(ca.clone()).renew_node_certificate(req).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    };
    let mut client = DispatcherClient::new(ch);
    let mut stream = client.session(SessionRequest { hostname }).await.expect("open a session").into_inner();
    let first = stream.message().await.expect("first session message").expect("session stream ended at once");
    let session_id = first.session_id.clone();
    let period = Duration::from_millis(first.heartbeat_period_ms.max(100));
    Session(tokio::spawn(async move {
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let (mut received, mut acked) = (0u64, 0u64);
        loop {
            let ack_now = received > acked && acked == 0;
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(m)) => {
                        if m.assignments.as_ref().is_some_and(|a| !a.more) {
                            received = m.seq;
                        }
                        if renew && m.renew_certificate {
                            renew_now();
                        }
                    }
                    _ => return,
                },
                _ = async { if !ack_now { beat.tick().await; } } => {
                    let req = HeartbeatRequest { session_id: session_id.clone(), assignments_seq: received };
                    if client.heartbeat(req).await.is_err() {
                        return;
                    }
                    acked = received;
                }
            }
        }
    }))
}

/// Resident set size of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) of process `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat(5): 11 and 12 after the name.
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}
