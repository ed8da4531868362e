//! Benchmark `secret-create`: `secretctl create` through the control API of a 3-manager
//! cluster on 127.0.0.1 (real processes, real TLS between managers, durable
//! raft: a create is acknowledged once a majority has it on disk). Measures
//! sequential create latency and throughput at 1, 16 and 64 concurrent
//! clients; prints a table and one JSON line.
//!
//! Run: `cargo bench --bench secret_create` (env: CREATES=500 sequential creates,
//! SECONDS_PER_LEVEL=5, VALUE_BYTES=64).

#[path = "../tests/common/mod.rs"]
mod common;
mod etcd_peer;
mod stats;
mod swarm_peer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use stats::*;
use swarmd::secretctl::{connect, Host};
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::CreateSecretRequest;
use tonic::transport::Channel;

/// A peer's sequential latencies and its throughput per client count.
type PeerResult = (Vec<Duration>, Vec<(usize, f64)>);

async fn create(ch: &Channel, name: String, bytes: usize) -> Result<(), tonic::Status> {
    let req = CreateSecretRequest { name, data: vec![b'x'; bytes].into(), labels: Default::default() };
    ControlClient::new(ch.clone()).create_secret(req).await.map(|_| ())
}

#[tokio::main]
async fn main() {
    swarmd_certs::install_crypto_provider();
    let smoke = smoke();
    let creates = env_or("CREATES", if smoke { 20 } else { 500 });
    let seconds = env_or("SECONDS_PER_LEVEL", if smoke { 1 } else { 5 }) as u64;
    let bytes = env_or("VALUE_BYTES", 64);
    let mut env = Env::new();
    let (managers, leader) = env.three_managers(&[]);
    let sock = managers[leader].socket();

    let ch = connect(&Host::Unix(sock.clone())).await.unwrap();
    for i in 0..20 {
        create(&ch, format!("warm-{i}"), bytes).await.unwrap();
    }
    let mut lat = Vec::with_capacity(creates);
    for i in 0..creates {
        let t = Instant::now();
        create(&ch, format!("seq-{i}"), bytes).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();

    let mut levels = Vec::new();
    for clients in [1usize, 16, 64] {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let ch = connect(&Host::Unix(sock.clone())).await.unwrap();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < stop {
                    create(&ch, format!("c{clients}-{c}-{i}"), bytes).await.expect("create");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }));
        }
        let t = Instant::now();
        for task in tasks {
            task.await.unwrap();
        }
        let n = done.load(Ordering::Relaxed);
        levels.push((clients, n as f64 / t.elapsed().as_secs_f64()));
    }

    // The peers, in the same run (not in the smoke run under `cargo test`).
    let peers_on = peers_on();
    let mut swarm: Option<PeerResult> = None;
    let mut etcd: Option<PeerResult> = None;
    if peers_on {
        match swarm_peer::SwarmMode::enter() {
            None => eprintln!("Swarm peer skipped: no Docker Engine that can enter swarm mode"),
            Some(_swarm) => {
                swarm = measure(
                    "Swarm",
                    |c| async move { swarm_peer::throughput(c, seconds, bytes).await },
                    swarm_peer::sequential(creates, bytes),
                )
                .await
            }
        }
        match etcd_peer::Etcd::start().await {
            None => eprintln!("etcd peer skipped: no etcd (Debian's etcd-server) or it did not start"),
            Some(e) => {
                let e = &e;
                etcd = measure(
                    "etcd",
                    |c| async move { etcd_peer::throughput(e, c, seconds, bytes).await },
                    etcd_peer::sequential(e, creates, bytes),
                )
                .await
            }
        }
    }

    println!("secret create, 3 managers, {bytes}-byte values");
    println!(
        "sequential  n={:<5} p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        lat.len(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap())
    );
    for (c, rate) in &levels {
        println!("{c:>3} clients  {rate:>8.0} creates/s");
    }
    if let Some(p) = &swarm {
        report_peer(
            "docker-swarm",
            "Docker Swarm (this engine, single manager, Engine API over its socket)",
            p,
            &lat,
            &levels,
        );
    }
    if let Some(p) = &etcd {
        report_peer("etcd", "etcd (3 members on 127.0.0.1, 64-byte puts over gRPC)", p, &lat, &levels);
    }
    println!(
        "{{\"bench\":\"secret-create\",\"managers\":3,\"value_bytes\":{bytes},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"per_s_1\":{:.0},\"per_s_16\":{:.0},\"per_s_64\":{:.0}}}",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        levels[0].1,
        levels[1].1,
        levels[2].1
    );
}

/// A peer's sequential run, then its throughput at 1, 16 and 64 clients; `None` (said why) on failure.
async fn measure<F, Fut>(
    name: &str,
    throughput: F,
    sequential: impl std::future::Future<Output = Result<Vec<Duration>, String>>,
) -> Option<PeerResult>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<f64, String>>,
{
    let run = async {
        let lat = sequential.await?;
        let mut levels = Vec::new();
        for c in [1usize, 16, 64] {
            levels.push((c, throughput(c).await?));
        }
        Ok::<_, String>((lat, levels))
    };
    match run.await {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("{name} peer failed: {e}");
            None
        }
    }
}

/// Prints a peer's table rows, the ratios to ours, and its JSON line.
fn report_peer(id: &str, what: &str, (plat, plevels): &PeerResult, lat: &[Duration], levels: &[(usize, f64)]) {
    println!("peer: {what}");
    println!(
        "sequential  n={:<5} p50 {:.2} ms  p99 {:.2} ms   swarmd/{id} p50 ratio {:.2}",
        plat.len(),
        ms(pct(plat, 0.5)),
        ms(pct(plat, 0.99)),
        ms(pct(lat, 0.5)) / ms(pct(plat, 0.5))
    );
    for ((c, rate), (_, ours)) in plevels.iter().zip(levels) {
        println!("{c:>3} clients  {rate:>8.0} per s   swarmd/{id} {:.2}x", ours / rate);
    }
    println!(
        "{{\"bench\":\"secret-create-peer\",\"peer\":\"{id}\",\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"per_s_1\":{:.0},\"per_s_16\":{:.0},\"per_s_64\":{:.0}}}",
        ms(pct(plat, 0.5)),
        ms(pct(plat, 0.99)),
        plevels[0].1,
        plevels[1].1,
        plevels[2].1
    );
}
