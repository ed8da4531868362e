//! Benchmark `join-storm`: N simulated workers (default 1,000) join a
//! 3-manager cluster on 127.0.0.1 at once and open their sessions, as
//! `swarmd worker join` does: root CA pinned by the token, a fresh key, a
//! certificate from the CA (a durable raft write), an mTLS session. Measures
//! the time until the leader lists every one of them READY.
//!
//! Run: `cargo bench --bench join_storm` (env: NODES=1000).

#[path = "../tests/common/mod.rs"]
mod common;
mod sim;
mod stats;

use std::time::{Duration, Instant};

use common::*;
use stats::*;
use swarmd::secretctl::{connect, Host};
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::ListNodesRequest;

#[tokio::main]
async fn main() {
    swarmd_certs::install_crypto_provider();
    let n = env_or("NODES", if smoke() { 20 } else { 1000 });
    let mut env = Env::new();
    // Every simulated worker joins from 127.0.0.1, one source to the join
    // budget (a burst of 500, then 20 a second): lifted, as in a real storm of
    // machines, each its own source (the global budget is lifted with it).
    env.set_env("SWARMD_NODE_RATE_LIMITS", "off");
    let (managers, leader) = env.three_managers(&[]);
    let addr = managers[leader].addr.clone();
    let worker_token = managers[leader].token("worker");
    let ctl = connect(&Host::Unix(managers[leader].socket())).await.unwrap();

    let start = Instant::now();
    let storm: Vec<_> = (0..n)
        .map(|i| {
            let (t, a) = (worker_token.clone(), addr.clone());
            tokio::spawn(async move {
                let node = sim::join(&t, &a, &format!("storm-{i}")).await.expect("join");
                let joined = start.elapsed();
                let ch = sim::channel(&node, &a).await;
                let session = sim::open_session(ch, format!("storm-{i}")).await;
                (joined, start.elapsed(), session)
            })
        })
        .collect();
    // Poll the leader's node list until every simulated worker is ready.
    let ready_at = loop {
        let nodes = ControlClient::new(ctl.clone()).list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
        let ready = nodes.iter().filter(|x| x.role == "worker" && x.status == "ready").count();
        if ready >= n {
            break start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(300), "only {ready} of {n} workers ready after 300 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut joined = Vec::new();
    let mut opened = Vec::new();
    let mut sessions = Vec::new();
    for t in storm {
        let (j, o, s) = t.await.unwrap();
        joined.push(j);
        opened.push(o);
        sessions.push(s);
    }
    joined.sort();
    opened.sort();

    println!("join-storm: {n} simulated workers join a 3-manager cluster at once");
    println!(
        "certificates issued (joins)   p50 {:>7.0} ms  last {:>7.0} ms",
        ms(pct(&joined, 0.5)),
        ms(*joined.last().unwrap())
    );
    println!(
        "sessions open                 p50 {:>7.0} ms  last {:>7.0} ms",
        ms(pct(&opened, 0.5)),
        ms(*opened.last().unwrap())
    );
    println!("all READY on the leader            {:>7.0} ms   (goal < 5000 ms)", ms(ready_at));
    println!(
        "{{\"bench\":\"join-storm\",\"managers\":3,\"nodes\":{n},\"joined_last_ms\":{:.0},\"sessions_last_ms\":{:.0},\"all_ready_ms\":{:.0}}}",
        ms(*joined.last().unwrap()),
        ms(*opened.last().unwrap()),
        ms(ready_at)
    );
    for s in sessions {
        s.abort();
    }
}
