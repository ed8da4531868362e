//! A worker's tasks live no longer than the worker (issue 12, finding 12), and
//! a task cannot grow the worker's memory with its output (finding 8). Real
//! manager and worker processes, real runc containers: needs root, runc and
//! busybox (skipped loudly without them, mandatory in CI).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn tasks(m: &Manager, service: &str) -> Vec<Value> {
    let o = m.ctl(&["--format", "json", "service", "ps", service]);
    serde_json::from_slice::<Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn running_task(m: &Manager, service: &str) -> Option<Value> {
    tasks(m, service).into_iter().find(|t| t["desired"] == "running" && t["state"] == "running")
}

fn run_dir(node: &str) -> PathBuf {
    PathBuf::from(std::env::var("SWARMD_RUN_DIR").unwrap_or_else(|_| "/run/swarmd".into())).join(node)
}

/// Containers under the worker's runtime root.
fn containers(node: &str, runtime: &str) -> Vec<String> {
    let root = run_dir(node).join("runtime");
    if !root.exists() {
        return Vec::new();
    }
    let o = Command::new(runtime).arg("--root").arg(&root).args(["list", "-q"]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// Secret mounts of this node.
fn secret_mounts(node: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("swarmd-secrets") && l.contains(node))
        .map(str::to_owned)
        .collect()
}

/// PIDs of processes whose command line contains `needle` (not this one).
fn processes_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn logs(m: &Manager, service: &str) -> String {
    m.ctl(&["service", "logs", service]).stdout.iter().map(|b| *b as char).collect()
}

/// One manager (1 s heartbeats), one worker, a busybox image.
struct Cluster {
    env: Env,
    image: String,
    m: Manager,
    w: Worker,
}

fn cluster(runtime: &str) -> Cluster {
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let image = busybox_image(&env, &m);
    let token = m.token("worker");
    let data = env.path("w1");
    let args =
        ["worker", "join", &token, "--remote", &m.addr, "--data-dir", data.to_str().unwrap(), "--runtime", runtime];
    let idx = env.spawn("w1", &args);
    let w = Worker { name: "w1".into(), data, proc_idx: idx };
    m.wait_ready(2);
    Cluster { env, image, m, w }
}

/// Whether `runtime` is installed (crun is optional outside CI).
fn have(runtime: &str, test: &str) -> bool {
    if Command::new(runtime).arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var("SWARMD_REQUIRE_RUNC").is_ok_and(|v| v == "1") {
        panic!("{test}: {runtime} is missing (scripts/setup installs it as root)");
    }
    eprintln!("\n!!!!! SKIPPED {test}: needs {runtime}\n");
    false
}

/// A sleep whose duration marks one test's task processes (tests run side by side).
fn marker(test: u32) -> String {
    format!("sleep {}", 3_600_000 + (std::process::id() % 10_000) * 10 + test)
}

/// SIGTERM: the worker stops its task (which ignores SIGTERM: SIGKILL after
/// the grace period), and exits only once the container and its secret mount
/// are gone.
#[test]
fn invariant_4_a_stopped_worker_leaves_no_task_running() {
    let test = "worker_lifecycle::invariant_4_a_stopped_worker_leaves_no_task_running";
    if can_run_containers(test) {
        stopped_worker_leaves_nothing("runc", 1);
    }
}

/// The same with crun.
#[test]
fn invariant_4_a_stopped_crun_worker_leaves_no_task_running() {
    let test = "worker_lifecycle::invariant_4_a_stopped_crun_worker_leaves_no_task_running";
    if can_run_containers(test) && have("crun", test) {
        stopped_worker_leaves_nothing("crun", 2);
    }
}

fn stopped_worker_leaves_nothing(runtime: &str, n: u32) {
    let Cluster { mut env, image, m, w } = cluster(runtime);
    let node = w.node_id();
    assert!(m.ctl_stdin(&["create", "s"], b"a value for the shutdown test").status.success());
    let sleep = marker(n);
    let script = format!("trap '' TERM; echo started; {sleep}");
    let img = image.as_str();
    m.ctl_ok(&["service", "create", "stubborn", "--image", img, "--secret", "s", "--", "sh", "-c", &script]);
    wait_for("the task to run", Duration::from_secs(60), || running_task(&m, "stubborn"));
    wait_for("its output", Duration::from_secs(30), || logs(&m, "stubborn").contains("started").then_some(()));
    assert_eq!(containers(&node, runtime).len(), 1);
    assert_eq!(secret_mounts(&node).len(), 1);
    assert!(!processes_with(&sleep).is_empty(), "the task's processes are not visible");

    let exit = env.proc(w.proc_idx).terminate();
    assert!(exit.success(), "{exit:?}");
    // The worker has exited: nothing of its task may be left.
    assert!(containers(&node, runtime).is_empty(), "containers outlived the worker");
    assert!(processes_with(&sleep).is_empty(), "task processes outlived the worker");
    assert!(secret_mounts(&node).is_empty());
    assert!(processes_with(&format!("watchdog --run-dir {}", run_dir(&node).display())).is_empty());
    let log = env.procs[w.proc_idx].log_text();
    assert!(log.contains("worker stopped"), "{log}");
}

/// kill -9: the watchdog removes the container and its secret mount, with no
/// restart of the worker; `service rm` and `rm` of the secret then leave
/// nothing of either. (First the watchdog itself is killed: the worker starts
/// another.)
#[test]
fn invariant_4_a_killed_worker_takes_its_containers_and_secrets_with_it() {
    let test = "worker_lifecycle::invariant_4_a_killed_worker_takes_its_containers_and_secrets_with_it";
    if can_run_containers(test) {
        killed_worker_leaves_nothing("runc", 3);
    }
}

/// The same with crun (the watchdog goes through its hybrid-cgroup workaround).
#[test]
fn invariant_4_a_killed_crun_worker_takes_its_containers_and_secrets_with_it() {
    let test = "worker_lifecycle::invariant_4_a_killed_crun_worker_takes_its_containers_and_secrets_with_it";
    if can_run_containers(test) && have("crun", test) {
        killed_worker_leaves_nothing("crun", 4);
    }
}

fn killed_worker_leaves_nothing(runtime: &str, n: u32) {
    let Cluster { mut env, image, m, w } = cluster(runtime);
    let node = w.node_id();
    assert!(m.ctl_stdin(&["create", "s"], b"a value for the watchdog test").status.success());
    let sleep = marker(n);
    let script = format!("echo started; {sleep}");
    m.ctl_ok(&["service", "create", "job", "--image", image.as_str(), "--secret", "s", "--", "sh", "-c", &script]);
    wait_for("the task to run", Duration::from_secs(60), || running_task(&m, "job"));
    wait_for("its output", Duration::from_secs(30), || logs(&m, "job").contains("started").then_some(()));
    assert_eq!(containers(&node, runtime).len(), 1);
    assert_eq!(secret_mounts(&node).len(), 1);
    let watchdog = format!("watchdog --run-dir {}", run_dir(&node).display());
    // A watchdog that dies while the worker runs is replaced.
    let first = processes_with(&watchdog);
    assert_eq!(first.len(), 1, "no watchdog beside the worker");
    let _ = Command::new("kill").args(["-KILL", &first[0].to_string()]).status();
    wait_for("a new watchdog", Duration::from_secs(30), || {
        let now = processes_with(&watchdog);
        (now.len() == 1 && now[0] != first[0]).then_some(())
    });

    env.proc(w.proc_idx).kill9();
    wait_for("the container, its processes and its secret mount to go", Duration::from_secs(30), || {
        (containers(&node, runtime).is_empty() && processes_with(&sleep).is_empty() && secret_mounts(&node).is_empty())
            .then_some(())
    });
    wait_for("the watchdog to exit", Duration::from_secs(30), || processes_with(&watchdog).is_empty().then_some(()));
    assert!(!run_dir(&node).exists(), "the run dir is left");

    m.ctl_ok(&["service", "rm", "job"]);
    m.ctl_ok(&["rm", "s"]);
    assert!(containers(&node, runtime).is_empty());
    assert!(secret_mounts(&node).is_empty() && processes_with(&sleep).is_empty());
}

/// A task writing 300 MB without a newline: the worker's resident memory
/// stays far below that while the task runs and after.
#[test]
fn invariant_9_an_endless_output_line_does_not_grow_the_worker() {
    if !can_run_containers("worker_lifecycle::invariant_9_an_endless_output_line_does_not_grow_the_worker") {
        return;
    }
    let Cluster { env, image, m, w } = cluster("runc");
    let script = "echo begin; head -c 300000000 /dev/zero; echo; echo end-of-flood; while true; do sleep 1; done";
    m.ctl_ok(&["service", "create", "flood", "--image", image.as_str(), "--", "sh", "-c", script]);
    let pid = env.procs[w.proc_idx].pid();
    // Sample the worker's resident memory often, on a thread of its own.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = std::cmp::max(peak, vm_rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let passed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the flood to pass through the worker", Duration::from_secs(180), || {
            // Up to 4 MB of output per call: not too often.
            std::thread::sleep(Duration::from_millis(500));
            logs(&m, "flood").contains("end-of-flood").then_some(())
        });
        // And a while after it.
        std::thread::sleep(Duration::from_secs(1));
    }));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert!(peak > 0, "no VmRSS for the worker");
    assert!(peak < 100 * 1024, "the worker grew to {} MiB with one endless output line", peak / 1024);
    if let Err(e) = passed {
        std::panic::resume_unwind(e);
    }
}

/// A worker killed while the watchdog that replaces a dead one is still
/// starting (before it says it is ready: its pipe is broken) still has its
/// run dir cleared. Seen in CI under load: the new watchdog exited on EPIPE
/// and left the container and the secret mount behind.
#[test]
fn invariant_4_a_watchdog_whose_worker_died_before_it_was_ready_still_clears() {
    let env = Env::new();
    let run_dir = env.path("run").join("node");
    std::fs::create_dir_all(run_dir.join("tasks")).unwrap();
    std::fs::write(run_dir.join("state.json"), b"{}").unwrap();
    let mut child = Command::new(swarmd_bin())
        .args(["worker", "watchdog", "--run-dir", run_dir.to_str().unwrap(), "--runtime", "runc"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The worker is gone: neither end of the pipes is held any more.
    drop(child.stdout.take());
    drop(child.stdin.take());
    let status = wait_for("the watchdog to exit", Duration::from_secs(30), || child.try_wait().unwrap());
    assert!(status.success(), "the watchdog failed: {status:?}");
    assert!(!run_dir.exists(), "the run dir of a dead worker is left");
}
