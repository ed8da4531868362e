//! Benchmark `failover`: a 3-manager cluster on 127.0.0.1 (real processes,
//! real TLS, durable raft). Measures sequential write latency, then leader
//! failover: kill -9 the leader → first successful write through another
//! manager, each attempt with a 0.1 s client timeout. The peer in the same run
//! is etcd (3 members, default timings) under the same measurement.
//!
//! Run: `cargo bench --bench failover` (env: WRITES=500, TRIALS=20, PEERS=0 to
//! skip etcd, and MANAGER_ARGS, e.g. "--election-timeout 500ms", passed to
//! every manager).

#[path = "../tests/common/mod.rs"]
mod common;
mod etcd_peer;
mod stats;

use std::time::{Duration, Instant};

use common::*;
use stats::*;
use swarmd::secretctl::{connect, Host};
use swarmd_proto::control::control_client::ControlClient;
use swarmd_proto::control::UpdateNodeRequest;
use tonic::transport::Channel;

/// Each write attempt after the kill gives up after this long, as etcd's client does in the peer run.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(100);

async fn write(ch: &Channel, node: &str, k: &str, v: usize) -> Result<(), tonic::Status> {
    let req = UpdateNodeRequest {
        id_or_prefix: node.to_owned(),
        labels_add: [(k.to_owned(), v.to_string())].into(),
        ..Default::default()
    };
    ControlClient::new(ch.clone()).update_node(req).await.map(|_| ())
}

#[tokio::main]
async fn main() {
    swarmd_certs::install_crypto_provider();
    let smoke = smoke();
    let writes = env_or("WRITES", if smoke { 20 } else { 500 });
    let trials = env_or("TRIALS", if smoke { 2 } else { 20 });
    let extra = std::env::var("MANAGER_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let mut env = Env::new();
    let mut init_args = vec!["--heartbeat", "1s"];
    init_args.extend(&extra);
    let m1 = env.start_manager("m1", &init_args);
    let token = m1.token("manager");
    let m2 = env.join_manager_with("m2", &token, &m1, &extra);
    let m3 = env.join_manager_with("m3", &token, &m1, &extra);
    let managers = [m1, m2, m3];
    let target = managers[0].node_id();

    // Sequential writes through the leader's control socket.
    let leader = wait_for("a leader", DEADLINE, || managers.iter().position(|m| m.is_leader()));
    let ch = connect(&Host::Unix(managers[leader].socket())).await.unwrap();
    for i in 0..20 {
        write(&ch, &target, "warm", i).await.unwrap();
    }
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let t = Instant::now();
        write(&ch, &target, "seq", i).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();

    // Failover trials.
    let mut fo = Vec::new();
    for trial in 0..trials {
        let leader = wait_for("a leader", DEADLINE, || managers.iter().position(|m| m.is_leader()));
        let survivors: Vec<Channel> = {
            let mut v = Vec::new();
            for (i, m) in managers.iter().enumerate() {
                if i != leader {
                    v.push(connect(&Host::Unix(m.socket())).await.unwrap());
                }
            }
            v
        };
        let idx = managers[leader].proc_idx;
        env.proc(idx).kill9();
        let killed = Instant::now();
        let mut k = 0usize;
        loop {
            let ch = &survivors[k % survivors.len()];
            let attempt = tokio::time::timeout(CLIENT_TIMEOUT, write(ch, &target, "fo", trial));
            if matches!(attempt.await, Ok(Ok(()))) {
                break;
            }
            k += 1;
            assert!(killed.elapsed() < Duration::from_secs(30), "no write within 30 s of the kill");
        }
        fo.push(killed.elapsed());
        let new_idx = env.run_node(&format!("restart{trial}"), &managers[leader].data);
        env.procs.swap(idx, new_idx);
        wait_for("the restarted manager to catch up", DEADLINE, || {
            let infos: Vec<_> = managers.iter().map(info).collect::<Option<Vec<_>>>()?;
            infos.windows(2).all(|w| w[0]["last_applied"] == w[1]["last_applied"]).then_some(())
        });
    }
    fo.sort();
    drop(env);

    // The peer: etcd, same trials, same client timeout.
    let mut etcd_fo = Vec::new();
    if peers_on() {
        match etcd_peer::Etcd::start().await {
            None => eprintln!("etcd peer skipped: no etcd (Debian's etcd-server) or it did not start"),
            Some(mut e) => {
                for _ in 0..trials {
                    match e.failover(CLIENT_TIMEOUT).await {
                        Ok(d) => etcd_fo.push(d),
                        Err(why) => {
                            eprintln!("etcd failover trial failed: {why}");
                            break;
                        }
                    }
                }
            }
        }
        etcd_fo.sort();
    }

    println!("scenario                         n      p50 ms    p99 ms    max ms");
    println!(
        "sequential write (3 managers)  {:>4}  {:>9.2} {:>9.2} {:>9.2}",
        lat.len(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap())
    );
    println!(
        "failover kill -9 → write       {:>4}  {:>9.1} {:>9.1} {:>9.1}",
        fo.len(),
        ms(pct(&fo, 0.5)),
        ms(pct(&fo, 0.99)),
        ms(*fo.last().unwrap())
    );
    let etcd = if etcd_fo.is_empty() {
        println!("peer: etcd not measured in this run");
        "null".to_owned()
    } else {
        println!(
            "peer: etcd (3 members) kill -9 → put {:>4}  {:>9.1} {:>9.1} {:>9.1}   swarmd/etcd p50 {:.2}",
            etcd_fo.len(),
            ms(pct(&etcd_fo, 0.5)),
            ms(pct(&etcd_fo, 0.99)),
            ms(*etcd_fo.last().unwrap()),
            ms(pct(&fo, 0.5)) / ms(pct(&etcd_fo, 0.5))
        );
        format!(
            "{{\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"trials\":{}}}",
            ms(pct(&etcd_fo, 0.5)),
            ms(pct(&etcd_fo, 0.99)),
            etcd_fo.len()
        )
    };
    println!(
        "{{\"bench\":\"failover\",\"manager_args\":{:?},\"client_timeout_ms\":100,\"write_p50_ms\":{:.3},\"write_p99_ms\":{:.3},\"failover_p50_ms\":{:.1},\"failover_p99_ms\":{:.1},\"writes\":{},\"trials\":{},\"peer_etcd\":{etcd}}}",
        extra.join(" "),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&fo, 0.5)),
        ms(pct(&fo, 0.99)),
        lat.len(),
        fo.len()
    );
}
