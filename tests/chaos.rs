//! Bounded chaos (about a minute): random kill -9 and restart of managers, one
//! at a time, while a client writes. At the end every acknowledged write is
//! present and every manager has the same state digest.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const RUN_FOR: Duration = Duration::from_secs(45);
const KEYS: u32 = 100;

#[test]
fn random_manager_crashes_lose_no_acknowledged_write() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &["--heartbeat", "1s"]);
    let token = m1.token("manager");
    let m2 = env.join_manager("m2", &token, &m1);
    let m3 = env.join_manager("m3", &token, &m1);
    let managers = [m1, m2, m3];
    let target = managers[0].node_id();

    // One writer: key k<i % KEYS> = i, so per key the values only grow. An
    // acknowledged value must be there at the end, or a later one.
    let stop = Arc::new(AtomicBool::new(false));
    let sockets: Vec<_> = managers.iter().map(|m| m.socket()).collect();
    let writer = {
        let (stop, target) = (stop.clone(), target.clone());
        std::thread::spawn(move || {
            let mut acked: HashMap<String, u64> = HashMap::new();
            let (mut i, mut which, mut n) = (0u64, 0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k{}", i % KEYS as u64);
                let o = Command::new(secretctl_bin())
                    .arg("--host")
                    .arg(format!("unix://{}", sockets[which % sockets.len()].display()))
                    .args(["node", "update", &target, "--label-add", &format!("{key}={i}")])
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                if o.status.success() {
                    acked.insert(key, i);
                    n += 1;
                } else {
                    which += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                i += 1;
            }
            (acked, n, i)
        })
    };

    // Chaos: kill -9 a random manager, let it stay down a moment, restart it.
    let started = Instant::now();
    let mut kills = 0;
    let mut seed = std::process::id() as u64;
    let mut rnd = move |n: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    while started.elapsed() < RUN_FOR {
        std::thread::sleep(Duration::from_millis(1500 + rnd(2500)));
        let victim = rnd(3) as usize;
        let idx = managers[victim].proc_idx;
        env.proc(idx).kill9();
        kills += 1;
        std::thread::sleep(Duration::from_millis(200 + rnd(1500)));
        let new_idx = env.run_node(&format!("{}-r{kills}", managers[victim].name), &managers[victim].data);
        // Keep the manager's process slot pointing at the running process.
        track(&mut env, idx, new_idx);
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, ok, attempted) = writer.join().unwrap();
    eprintln!("chaos: {kills} kills in {:?}; {ok} of {attempted} writes acknowledged", started.elapsed());
    assert!(ok > 50, "too few writes got through: {ok}");

    // Convergence: same applied index and digest everywhere, acknowledged values present.
    let infos = wait_for("all managers to converge", Duration::from_secs(60), || {
        let infos: Vec<_> = managers.iter().map(info).collect::<Option<Vec<_>>>()?;
        let same = infos
            .windows(2)
            .all(|w| w[0]["state_digest"] == w[1]["state_digest"] && w[0]["last_applied"] == w[1]["last_applied"]);
        same.then_some(infos)
    });
    assert!(!infos[0]["state_digest"].as_str().unwrap().is_empty());
    for m in &managers {
        let node = m.node(&target).unwrap();
        let labels = node["labels"].as_object().unwrap();
        for (key, v) in &acked {
            let have: u64 = labels.get(key).and_then(|x| x.as_str()).and_then(|s| s.parse().ok()).unwrap_or(0);
            assert!(have >= *v, "{}: acknowledged {key}={v} but found {have}", m.name);
        }
    }
}

/// Moves a restarted process into the slot of the one it replaced, so the next
/// kill of that manager hits the running process.
fn track(env: &mut Env, old: usize, new: usize) {
    env.procs.swap(old, new);
}
