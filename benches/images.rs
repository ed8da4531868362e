//! Benchmark `images`: an image of ~100 MiB (busybox and 100 MiB that do not
//! compress) through swarmd, beside Docker in the same run.
//!
//! - `load`: `secretctl image load` of the OCI layout (verified by secretctl,
//!   then streamed to the manager, verified and stored) vs `docker load` of
//!   the same image as a docker-archive (skopeo converts it).
//! - `distribution`: a service of 3 replicas spread over 3 workers, from
//!   `service create` until all 3 run — each worker fetches the blobs from the
//!   manager, checks and unpacks them (no peer: Docker distributes through a
//!   registry).
//! - `second task`: one more replica on a worker that already ran the image
//!   starts from its cache (its tree count stays one: no fetch, no unpack).
//! - `cached start`: `service create` of a cached image until its task runs
//!   vs `docker run -d` of a loaded image (A/B alternated).
//!
//! Run: `cargo bench --bench images` as root with runc, busybox, skopeo and
//! a Docker Engine for the peer (env: IMAGE_MIB=100, TRIALS=5, PEERS=0).

#[path = "../tests/common/mod.rs"]
mod common;
mod stats;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use stats::*;

fn running(m: &Manager, service: &str) -> usize {
    let o = m.ctl(&["--format", "json", "service", "ps", service]);
    let tasks: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
    tasks.iter().filter(|t| t["state"] == "running" && t["desired"] == "running").count()
}

fn wait_running(m: &Manager, service: &str, n: usize) {
    wait_for(&format!("{n} tasks of {service} running"), DEADLINE, || (running(m, service) >= n).then_some(()));
}

/// `mib` MiB that gzip cannot shrink (xorshift).
fn noise(mib: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(mib << 20);
    while out.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn docker(args: &[&str]) -> Option<String> {
    let o = Command::new("docker").args(args).output().ok()?;
    if !o.status.success() {
        eprintln!("docker {args:?}: {}", String::from_utf8_lossy(&o.stderr).trim());
        return None;
    }
    Some(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn main() {
    if !can_run_containers("bench images") {
        return;
    }
    let mib = env_or("IMAGE_MIB", if smoke() { 2 } else { 100 });
    let workers = if smoke() { 1 } else { 3 };
    let trials = env_or("TRIALS", if smoke() { 1 } else { 5 });
    let mut env = Env::new();
    let rootfs = busybox_rootfs(&env.path("rootfs"));
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    std::fs::write(rootfs.join("data/blob"), noise(mib)).unwrap();
    let layout = env.path("big-oci");
    build_image(&rootfs, &layout, "big:1");
    let layout_bytes: u64 =
        files_below(&layout).iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();

    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let token = m.token("worker");
    let ws: Vec<Worker> = (0..workers).map(|i| env.join_worker(&format!("w{i}"), &token, &m.addr)).collect();
    m.wait_ready(1 + workers);
    let w0 = ws[0].node_id();

    // Docker's copy of the image, for the peer.
    let peer = peers_on() && docker(&["info", "--format", "{{.ServerVersion}}"]).is_some();
    let archive = env.path("big.tar");
    let peer = peer
        && Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                &format!("oci:{}:big:1", layout.display()),
                &format!("docker-archive:{}:big:1", archive.display()),
            ])
            .status()
            .is_ok_and(|s| s.success());

    // Load, A/B.
    let (mut ours_load, mut docker_load) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let t = Instant::now();
        m.ctl_ok(&["image", "load", layout.to_str().unwrap()]);
        ours_load.push(t.elapsed());
        if peer {
            let _ = docker(&["rmi", "-f", "big:1"]);
            let t = Instant::now();
            if docker(&["load", "-q", "-i", archive.to_str().unwrap()]).is_some() {
                docker_load.push(t.elapsed());
            }
        }
    }

    // Distribution to every worker, then a second task from the cache.
    let t = Instant::now();
    m.ctl_ok(&[
        "service",
        "create",
        "dist",
        "--image",
        "big:1",
        "--replicas",
        &workers.to_string(),
        "--",
        "sleep",
        "3600",
    ]);
    wait_running(&m, "dist", workers);
    let distribution = t.elapsed();
    let trees = |node: &str| std::fs::read_dir(image_dir(node).join("rootfs")).map(|d| d.count()).unwrap_or(0);
    let t = Instant::now();
    m.ctl_ok(&["service", "update", "dist", "--replicas", &(workers + 1).to_string()]);
    wait_running(&m, "dist", workers + 1);
    let second = t.elapsed();
    for w in &ws {
        assert_eq!(trees(&w.node_id()), 1, "a worker unpacked the image twice");
    }
    m.ctl_ok(&["service", "rm", "dist"]);
    wait_for("dist's tasks gone", DEADLINE, || (running(&m, "dist") == 0).then_some(()));

    // Cached start, A/B.
    let (mut ours_start, mut docker_start) = (Vec::new(), Vec::new());
    for i in 0..trials {
        let name = format!("c{i}");
        let t = Instant::now();
        let c = format!("node.id=={w0}");
        m.ctl_ok(&["service", "create", &name, "--image", "big:1", "--constraint", &c, "--", "sleep", "3600"]);
        wait_running(&m, &name, 1);
        ours_start.push(t.elapsed());
        m.ctl_ok(&["service", "rm", &name]);
        if peer {
            let t = Instant::now();
            if let Some(id) = docker(&["run", "-d", "--rm", "--network", "none", "big:1", "sleep", "3600"]) {
                docker_start.push(t.elapsed());
                let _ = docker(&["rm", "-f", &id]);
            }
        }
        wait_for("the task gone", DEADLINE, || (running(&m, &name) == 0).then_some(()));
    }
    if peer {
        let _ = docker(&["rmi", "-f", "big:1"]);
    }

    for v in [&mut ours_load, &mut docker_load, &mut ours_start, &mut docker_start] {
        v.sort();
    }
    let p50 = |v: &[Duration]| if v.is_empty() { f64::NAN } else { ms(pct(v, 0.5)) };
    println!(
        "images: a {:.1} MiB layout ({} MiB of noise), {workers} workers, {trials} trials",
        layout_bytes as f64 / 1048576.0,
        mib
    );
    println!("load            swarmd p50 {:>8.1} ms   docker load p50 {:>8.1} ms", p50(&ours_load), p50(&docker_load));
    println!(
        "distribution    swarmd {:>8.1} ms to {workers} running tasks (each worker fetched and unpacked)",
        ms(distribution)
    );
    println!("second task     swarmd {:>8.1} ms (from the cache: one tree per worker)", ms(second));
    println!(
        "cached start    swarmd p50 {:>8.1} ms   docker run -d p50 {:>8.1} ms",
        p50(&ours_start),
        p50(&docker_start)
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "images", "layout_mib": layout_bytes as f64 / 1048576.0, "workers": workers,
            "load_ms_p50": p50(&ours_load), "docker_load_ms_p50": p50(&docker_load),
            "distribution_ms": ms(distribution), "second_task_ms": ms(second),
            "cached_start_ms_p50": p50(&ours_start), "docker_run_ms_p50": p50(&docker_start),
        })
    );
}
