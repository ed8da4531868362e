//! Benchmark `sessions`: the leader of a 3-manager cluster holds N simulated
//! worker sessions (default 10,000), each heartbeating at the cluster's period
//! (default 5 s) over its own mTLS connection. Measures the leader's resident
//! memory and CPU over a window in steady state, after every node is READY.
//! The peer for context is dockerd in swarm mode with no nodes, measured in
//! the same run when a Docker Engine is there.
//!
//! Run: `cargo bench --bench sessions` (env: NODES=10000, WINDOW=30 seconds).

#[path = "../tests/common/mod.rs"]
mod common;
mod sim;
mod stats;
mod swarm_peer;

use std::time::{Duration, Instant};

use common::*;
use stats::*;
use swarmd::secretctl::{connect, Host};
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::ListNodesRequest;

#[tokio::main]
async fn main() {
    swarmd_certs::install_crypto_provider();
    let smoke = smoke();
    let n = env_or("NODES", if smoke { 20 } else { 10_000 });
    let window = Duration::from_secs(env_or("WINDOW", if smoke { 2 } else { 30 }) as u64);
    let mut env = Env::new();
    let (managers, leader) = env.three_managers(&[]);
    let pid = env.procs[managers[leader].proc_idx].pid();
    let addr = managers[leader].addr.clone();
    let worker_token = managers[leader].token("worker");
    let ctl = connect(&Host::Unix(managers[leader].socket())).await.unwrap();
    let rss_idle = sim::rss_bytes(pid);

    let t = Instant::now();
    let nodes = sim::join_many(&worker_token, &addr, n, 64).await;
    let joined_in = t.elapsed();
    let mut sessions = Vec::with_capacity(n);
    {
        use futures::StreamExt;
        let opened: Vec<_> = futures::stream::iter(nodes.iter().enumerate())
            .map(|(i, node)| {
                let addr = addr.clone();
                async move { sim::open_session(sim::channel(node, &addr).await, format!("sim-{i}")).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        sessions.extend(opened);
    }
    loop {
        let nodes = ControlClient::new(ctl.clone()).list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
        let ready = nodes.iter().filter(|x| x.role == "worker" && x.status == "ready").count();
        if ready >= n {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(600), "only {ready} of {n} workers ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Steady state: let the status writes settle, then measure a window.
    tokio::time::sleep(Duration::from_secs(if smoke { 1 } else { 10 })).await;
    let cpu0 = sim::cpu_time(pid);
    let t0 = Instant::now();
    let mut rss_max = 0;
    while t0.elapsed() < window {
        rss_max = rss_max.max(sim::rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu = (sim::cpu_time(pid) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let alive = sessions.iter().filter(|s| !s.is_finished()).count();
    assert_eq!(alive, n, "sessions ended during the window");

    let dockerd = if peers_on() { swarm_peer::idle_rss() } else { None };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("sessions: {n} simulated workers heartbeating at the default 5 s, all on the leader of 3 managers");
    println!("joined in {:.1} s", joined_in.as_secs_f64());
    println!("leader RSS before the nodes {:>8.1} MiB", mib(rss_idle));
    println!("leader RSS with them (max)  {:>8.1} MiB   (goal < 1024 MiB)", mib(rss_max));
    println!("leader CPU over {:>3} s       {:>8.1} % of one core   (goal < 25 %)", window.as_secs(), cpu * 100.0);
    match dockerd {
        Some(b) => println!("peer: dockerd in swarm mode, no nodes: RSS {:.1} MiB", mib(b)),
        None => println!("peer: dockerd in swarm mode not measured in this run"),
    }
    println!(
        "{{\"bench\":\"sessions\",\"managers\":3,\"nodes\":{n},\"heartbeat_s\":5,\"rss_idle_mib\":{:.1},\"rss_mib\":{:.1},\"cpu_pct_one_core\":{:.2},\"window_s\":{},\"peer_dockerd_swarm_idle_rss_mib\":{}}}",
        mib(rss_idle),
        mib(rss_max),
        cpu * 100.0,
        window.as_secs(),
        dockerd.map_or("null".to_owned(), |b| format!("{:.1}", mib(b)))
    );
    for s in sessions {
        s.abort();
    }
}
