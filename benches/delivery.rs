//! Benchmark: `secretctl update` → the new content visible inside a running
//! container (one manager, one worker, real runc). The task's secret file is
//! watched through its tmpfs, which the container has bind-mounted: what is
//! there is what the workload reads. Prints p50/p99 and one JSON line.
//!
//! Run: `cargo bench --bench delivery` as root with runc and busybox
//! (env: UPDATES=100).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if !can_run_containers("bench delivery") {
        return;
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let updates: usize =
        std::env::var("UPDATES").ok().and_then(|v| v.parse().ok()).unwrap_or(if smoke { 3 } else { 100 });
    let mut env = Env::new();
    let image = busybox_rootfs(&env.path("image"));
    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let w = env.join_worker("w1", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    assert!(m.ctl_stdin(&["create", "db_pass"], b"v0").status.success());
    m.ctl_ok(&[
        "service",
        "create",
        "web",
        "--image",
        image.to_str().unwrap(),
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
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("delivery: secretctl update → new content in the running container (n={})", lat.len());
    println!(
        "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap())
    );
    println!(
        "{{\"bench\":\"delivery\",\"n\":{},\"p50_ms\":{:.2},\"p99_ms\":{:.2}}}",
        lat.len(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );
}
