//! Benchmark `delivery`: `secretctl update` → the new content visible inside a
//! running container (one manager, one worker, real runc). The task's secret
//! file is watched through its tmpfs, which the container has bind-mounted:
//! what is there is what the workload reads. The peer in the same run is
//! Docker Swarm's only way to change a running service's secret, `docker
//! service update --secret-rm/--secret-add`, timed until the new task has read
//! the new value, with `--update-order start-first` (its best) and the default.
//! Prints p50/p99 and one JSON line.
//!
//! Run: `cargo bench --bench delivery` as root with runc and busybox
//! (env: UPDATES=100, SWARM_TRIALS=10, PEERS=0 to skip Swarm).

#[path = "../tests/common/mod.rs"]
mod common;
mod stats;
mod swarm_peer;

use std::time::{Duration, Instant};

use common::*;
use stats::*;

fn main() {
    if !can_run_containers("bench delivery") {
        return;
    }
    let updates = env_or("UPDATES", if smoke() { 3 } else { 100 });
    let swarm_trials = env_or("SWARM_TRIALS", 10);
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let image = busybox_image(&env, &m);
    let w = env.join_worker("w1", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    assert!(m.ctl_stdin(&["create", "db_pass"], b"v0").status.success());
    m.ctl_ok(&[
        "service",
        "create",
        "web",
        "--image",
        image.as_str(),
        "--secret",
        "db_pass",
        "--",
        "sh",
        "-c",
        "while true; do sleep 1; done",
    ]);
    let node = w.node_id();
    let file = wait_for("the task's secret file", DEADLINE, || {
        let tasks = std::fs::read_dir(std::path::Path::new("/run/swarmd").join(&node).join("tasks")).ok()?;
        let t = tasks.flatten().next()?;
        let f = t.path().join("secrets/db_pass");
        f.exists().then_some(f)
    });
    let mut lat = Vec::with_capacity(updates);
    for i in 1..=updates {
        let value = format!("v{i}");
        let t = Instant::now();
        let o = m.ctl_stdin(&["update", "db_pass"], value.as_bytes());
        assert!(o.status.success());
        loop {
            if std::fs::read(&file).map(|c| c == value.as_bytes()).unwrap_or(false) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "update {i} never arrived");
            std::thread::sleep(Duration::from_micros(500));
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    drop(env);

    // The peer: Docker Swarm, best case and default.
    let mut swarm = Vec::new();
    if peers_on() {
        let rootfs = tempfile::tempdir().unwrap();
        let rootfs = busybox_rootfs(rootfs.path());
        for start_first in [true, false] {
            match swarm_peer::delivery(&rootfs, swarm_trials, start_first) {
                Ok(l) => swarm.push((start_first, l)),
                Err(e) => eprintln!("Swarm delivery peer failed: {e}"),
            }
        }
    }

    println!("delivery: secretctl update → new content in the running container (n={})", lat.len());
    println!(
        "swarmd                                 p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap())
    );
    let mut peers = Vec::new();
    for (start_first, l) in &swarm {
        let order = if *start_first { "start-first" } else { "stop-first" };
        println!(
            "peer: Swarm service update, {order:<11} p50 {:>8.1} ms  p99 {:>8.1} ms  (n={})   Swarm/swarmd p50 {:.0}x",
            ms(pct(l, 0.5)),
            ms(pct(l, 0.99)),
            l.len(),
            ms(pct(l, 0.5)) / ms(pct(&lat, 0.5))
        );
        peers.push(format!(
            "\"peer_swarm_{}\":{{\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"n\":{}}}",
            order.replace('-', "_"),
            ms(pct(l, 0.5)),
            ms(pct(l, 0.99)),
            l.len()
        ));
    }
    if swarm.is_empty() {
        println!("peer: Docker Swarm not measured in this run");
    }
    let peers = if peers.is_empty() { String::new() } else { format!(",{}", peers.join(",")) };
    println!(
        "{{\"bench\":\"delivery\",\"n\":{},\"p50_ms\":{:.2},\"p99_ms\":{:.2}{peers}}}",
        lat.len(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );
}
