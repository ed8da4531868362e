//! Invariant 7, the other way round: only a removal removes. Real workers join
//! three managers at once, through followers too, while two CPU burners slow
//! the machine down, so that sessions land on managers that have not applied
//! the join yet. Every joiner must end ready; none may conclude it was
//! removed, wipe itself and exit.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Busy loops, killed on drop.
struct Burners(Vec<Child>);

impl Burners {
    fn start(n: usize) -> Self {
        Burners(
            (0..n)
                .map(|_| Command::new("sh").args(["-c", "while :; do :; done"]).stdin(Stdio::null()).spawn().unwrap())
                .collect(),
        )
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn invariant_7_a_join_storm_leaves_every_worker_ready_and_none_thinks_it_was_removed() {
    let joiners: usize = std::env::var("STORM_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let mut env = Env::new();
    let (managers, leader) = env.three_managers(&[]);
    let token = managers[leader].token("worker");
    let _burn = Burners::start(2);
    let workers: Vec<Worker> = (0..joiners)
        .map(|i| {
            // Each joins through one manager and lists all three, its own first.
            let first = &managers[i % 3];
            let rest: Vec<&str> = managers.iter().filter(|m| m.name != first.name).map(|m| m.addr.as_str()).collect();
            let remotes = format!("{},{}", first.addr, rest.join(","));
            env.join_worker(&format!("w{i}"), &token, &remotes)
        })
        .collect();
    let m = &managers[leader];
    wait_for(&format!("{joiners} ready workers"), Duration::from_secs(300), || {
        let ready = m.nodes().iter().filter(|n| n["role"] == "worker" && n["status"] == "ready").count();
        for w in &workers {
            let p = &mut env.procs[w.proc_idx];
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("worker {} exited ({status}) during the storm:\n{}", w.name, p.log_text());
            }
        }
        (ready == joiners).then_some(())
    });
    for w in &workers {
        let log = env.procs[w.proc_idx].log_text();
        assert!(!log.contains("removed from the cluster"), "{} believed it was removed:\n{log}", w.name);
    }
}
