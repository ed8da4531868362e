//! Benchmark `issue-cert`: node certificates issued per second through the
//! real `RenewNodeCertificate` RPC of a 3-manager cluster on 127.0.0.1. Each
//! renewal is a CSR check, a signature and a durable raft write of the new
//! serial. CSRs are generated ahead of time. (a) over established mTLS
//! sessions; (b) with a fresh TCP connection and mTLS handshake per issuance.
//! The peer, in the same run, is the crypto limit of the same provider in this
//! process: verify the CSR and sign the certificate (`RootCa::sign_node`),
//! on one core and on every core.
//!
//! Run: `cargo bench --bench issue_cert` (env: SECONDS=10, CLIENTS=64).

#[path = "../tests/common/mod.rs"]
mod common;
mod sim;
mod stats;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use stats::*;
use swarmd_certs::{CertValidity, ClusterId, NodeId, Role, RootCa};
use swarmd_proto::ca::ca_client::CaClient;
use swarmd_proto::ca::RenewNodeCertificateRequest;

/// Runs `clients` loops of `one` for `seconds`; returns issuances per second.
async fn rate<F, Fut>(clients: usize, seconds: u64, one: F) -> f64
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_secs(seconds);
    let t = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (one, done) = (one.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < stop {
                    one(c, i).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// Verify + sign in this process on `threads` threads for `seconds`: per second.
fn crypto_limit(threads: usize, seconds: u64, csrs: &Arc<Vec<String>>) -> f64 {
    let ca = Arc::new(RootCa::generate(&ClusterId::random()).unwrap());
    let validity = CertValidity::new(Duration::from_secs(90 * 86400)).unwrap();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let (ca, csrs) = (ca.clone(), csrs.clone());
            std::thread::spawn(move || {
                let node = NodeId::random();
                let mut n = 0usize;
                while Instant::now() < stop {
                    ca.sign_node(&csrs[(k + n) % csrs.len()], &node, Role::Worker, validity).unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let n: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    n as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    swarmd_certs::install_crypto_provider();
    let smoke = smoke();
    let seconds = env_or("SECONDS", if smoke { 1 } else { 10 }) as u64;
    let clients = env_or("CLIENTS", if smoke { 4 } else { 64 });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut env = Env::new();
    // One simulated node renews about 70 times a second here, far past the
    // per-node budget a real node never comes near: lift the budgets.
    env.set_env("SWARMD_NODE_RATE_LIMITS", "off");
    let (managers, leader) = env.three_managers(&[]);
    let addr = managers[leader].addr.clone();
    let worker_token = managers[leader].token("worker");

    // One joined node per client, and CSRs made ahead of time.
    let nodes = Arc::new(sim::join_many(&worker_token, &addr, clients, 16).await);
    let csrs: Arc<Vec<String>> = Arc::new((0..512).map(|_| swarmd_certs::generate_key_and_csr().unwrap().1).collect());

    // (a) Established sessions: one mTLS connection per client, kept.
    let mut chans = Vec::new();
    for n in nodes.iter() {
        chans.push(sim::channel(n, &addr).await);
    }
    let chans = Arc::new(chans);
    let established = {
        let csrs = csrs.clone();
        rate(clients, seconds, move |c, i| {
            let (chans, csrs) = (chans.clone(), csrs.clone());
            async move {
                let csr_pem = csrs[(c * 7 + i) % csrs.len()].clone();
                CaClient::new(chans[c].clone())
                    .renew_node_certificate(RenewNodeCertificateRequest { csr_pem })
                    .await
                    .expect("renewal");
            }
        })
        .await
    };

    // (b) A new TCP connection and mTLS handshake for every issuance.
    let fresh = {
        let (csrs, nodes, addr) = (csrs.clone(), nodes.clone(), addr.clone());
        rate(clients, seconds, move |c, i| {
            let (csrs, nodes, addr) = (csrs.clone(), nodes.clone(), addr.clone());
            async move {
                let ch = sim::channel(&nodes[c], &addr).await;
                let csr_pem = csrs[(c * 7 + i) % csrs.len()].clone();
                CaClient::new(ch)
                    .renew_node_certificate(RenewNodeCertificateRequest { csr_pem })
                    .await
                    .expect("renewal");
            }
        })
        .await
    };

    // The peer: the same crypto in this process, nothing else.
    let one_core = crypto_limit(1, seconds, &csrs);
    let all_cores = crypto_limit(cores, seconds, &csrs);

    println!("issue-cert, 3 managers, {clients} clients, {seconds} s each, P-256");
    println!("(a) renewals over established mTLS sessions   {established:>8.0} per s");
    println!("(b) renewals with a fresh mTLS handshake each  {fresh:>8.0} per s");
    println!("peer: verify CSR + sign in-process, 1 core     {one_core:>8.0} per s");
    println!("peer: verify CSR + sign in-process, {cores} cores    {all_cores:>8.0} per s");
    println!(
        "ratios: (a) {:.2} and (b) {:.2} of the {cores}-core crypto limit",
        established / all_cores,
        fresh / all_cores
    );
    println!(
        "{{\"bench\":\"issue-cert\",\"managers\":3,\"clients\":{clients},\"established_per_s\":{established:.0},\"fresh_handshake_per_s\":{fresh:.0},\"peer\":\"crypto-limit\",\"peer_1_core_per_s\":{one_core:.0},\"peer_all_cores_per_s\":{all_cores:.0},\"cores\":{cores}}}"
    );
}
