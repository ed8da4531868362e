//! Benchmark `ca_rotate`: a root CA rotation of a 3-manager cluster with N
//! simulated workers (default 1,000), each holding a session over its own mTLS
//! connection and renewing when its session asks, as `swarmd worker` does.
//! Measures the time from `RotateCa` to the swap (every live node converged,
//! the new root the only trust root, new join tokens), and how many nodes
//! renewed per second. The peer for context, in the same run, is
//! `docker swarm ca --rotate` on this machine's Docker Engine in swarm mode
//! (one node: itself).
//!
//! Run: `cargo bench --bench ca_rotate` (env: NODES=1000).

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
use swarmd_proto::control::{GetCaRequest, ListNodesRequest, RotateCaRequest};

/// `docker swarm ca --rotate` on a single-node swarm: seconds, or why not.
fn swarm_rotate() -> Result<f64, String> {
    let _swarm = swarm_peer::SwarmMode::enter().ok_or("no Docker Engine in swarm mode")?;
    let t = Instant::now();
    let o = std::process::Command::new("docker")
        .args(["swarm", "ca", "--rotate", "--quiet"])
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_owned());
    }
    Ok(t.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    swarmd_certs::install_crypto_provider();
    let smoke = smoke();
    let n = env_or("NODES", if smoke { 20 } else { 1_000 });
    let mut env = Env::new();
    let (managers, leader) = env.three_managers(&[]);
    let addrs: Vec<String> = managers.iter().map(|m| m.addr.clone()).collect();
    let worker_token = managers[leader].token("worker");
    let ctl = connect(&Host::Unix(managers[leader].socket())).await.unwrap();

    // Workers spread over the three managers, as their joins spread them.
    let t = Instant::now();
    let nodes = sim::join_many(&worker_token, &addrs[leader], n, 64).await;
    // Sessions go to every manager: each must have applied the joins first.
    for m in &managers {
        let ctl = connect(&Host::Unix(m.socket())).await.unwrap();
        loop {
            let listed = ControlClient::new(ctl.clone()).list_nodes(ListNodesRequest {}).await;
            if listed.is_ok_and(|r| r.into_inner().nodes.iter().filter(|x| x.role == "worker").count() >= n) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "{} has not applied the joins", m.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let sessions: Vec<_> = {
        use futures::StreamExt;
        futures::stream::iter(nodes.iter().enumerate())
            .map(|(i, node)| {
                let addr = addrs[i % addrs.len()].clone();
                async move {
                    sim::open_session_renewing(sim::channel(node, &addr).await, format!("sim-{i}"), true).await
                }
            })
            .buffer_unordered(64)
            .collect()
            .await
    };
    loop {
        let nodes = ControlClient::new(ctl.clone()).list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
        let ready = nodes.iter().filter(|x| x.role == "worker" && x.status == "ready").count();
        if ready >= n {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(600), "only {ready} of {n} workers ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(if smoke { 1 } else { 5 })).await;

    let t0 = Instant::now();
    let mut control = ControlClient::new(ctl.clone());
    control.rotate_ca(RotateCaRequest::default()).await.expect("start the rotation");
    let mut half = None;
    loop {
        let ca = control.get_ca(GetCaRequest {}).await.unwrap().into_inner();
        match ca.rotation {
            None => break,
            Some(r) if half.is_none() && r.converged.len() * 2 >= r.converged.len() + r.unconverged.len() => {
                half = Some(t0.elapsed());
            }
            Some(_) => {}
        }
        assert!(t0.elapsed() < Duration::from_secs(900), "the rotation did not finish in 15 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    let alive = sessions.iter().filter(|s| !s.is_finished()).count();
    assert_eq!(alive, n, "sessions ended during the rotation");
    let total = n + 3;
    let swarm = if peers_on() { Some(swarm_rotate()) } else { None };

    println!("ca_rotate: {n} simulated workers with sessions spread over 3 managers (and the 3 managers)");
    println!(
        "rotation to the swap         {:>8.2} s   ({:.0} nodes/s)",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64()
    );
    println!("half the nodes converged in  {:>8.2} s", half.unwrap_or(took).as_secs_f64());
    match &swarm {
        Some(Ok(s)) => println!("peer: docker swarm ca --rotate, a single-node swarm: {s:.2} s"),
        Some(Err(e)) => println!("peer: docker swarm ca --rotate not measured: {e}"),
        None => println!("peer: docker swarm ca --rotate not measured in this run"),
    }
    println!(
        "{{\"bench\":\"ca_rotate\",\"managers\":3,\"nodes\":{n},\"rotation_s\":{:.3},\"half_converged_s\":{:.3},\"nodes_per_s\":{:.1},\"peer_swarm_single_node_rotate_s\":{}}}",
        took.as_secs_f64(),
        half.unwrap_or(took).as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        match swarm {
            Some(Ok(s)) => format!("{s:.3}"),
            _ => "null".into(),
        }
    );
    for s in sessions {
        s.abort();
    }
}
