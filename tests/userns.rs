//! Invariant 9, user namespaces (issue 12, finding H2): a task's IDs are not
//! host IDs, so a host process of uid 65534 (`nobody`, the uid of many
//! daemons) cannot read a task's secrets through `/proc/<pid>/root`, nor its
//! environment, although the task runs as uid 65534 inside. Real manager,
//! worker and runc: needs root, runc, busybox and setpriv (skipped loudly
//! without them, mandatory in CI).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn running_task(m: &Manager, service: &str) -> Option<Value> {
    let o = m.ctl(&["--format", "json", "service", "ps", service]);
    let tasks = serde_json::from_slice::<Value>(&o.stdout).ok()?.as_array().cloned()?;
    tasks.into_iter().find(|t| t["desired"] == "running" && t["state"] == "running")
}

fn logs(m: &Manager, service: &str) -> String {
    String::from_utf8_lossy(&m.ctl(&["service", "logs", service]).stdout).into_owned()
}

/// The PID of the process whose command line is exactly `cmdline` (words).
fn pid_of(cmdline: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (String::from_utf8_lossy(&c).replace('\0', " ").trim_end() == cmdline).then_some(pid)
    })
}

/// A sleep whose duration marks one task's processes (tests run side by side).
fn marker(n: u32) -> String {
    format!("sleep {}", 4_600_000 + (std::process::id() % 10_000) * 10 + n)
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// `cat PATH` as host uid/gid 65534 with no supplementary groups: its exit
/// status, its output and its error.
fn cat_as_nobody(path: &str) -> (bool, Vec<u8>, String) {
    let o = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "cat", path])
        .output()
        .expect("setpriv (util-linux)");
    (o.status.success(), o.stdout, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `(inside, outside, count)` triples of `/proc/<pid>/uid_map`.
fn uid_map(pid: u32) -> Vec<(u64, u64, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/uid_map"))
        .unwrap()
        .lines()
        .map(|l| {
            let n: Vec<u64> = l.split_whitespace().map(|w| w.parse().unwrap()).collect();
            (n[0], n[1], n[2])
        })
        .collect()
}

/// The real uid of `pid` on the host.
fn host_uid(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn prerequisites(test: &str) -> bool {
    if !can_run_containers(test) {
        return false;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        if std::env::var("SWARMD_REQUIRE_RUNC").is_ok_and(|v| v == "1") {
            panic!("{test}: needs setpriv (util-linux)");
        }
        eprintln!("\n!!!!! SKIPPED {test}: needs setpriv (util-linux)\n");
        return false;
    }
    true
}

/// One manager, one worker with `runtime`, a busybox image.
fn cluster(env: &mut Env, runtime: &str) -> (Manager, String) {
    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let image = busybox_image(env, &m);
    let token = m.token("worker");
    let data = env.path("w1");
    let data = data.to_str().unwrap();
    env.spawn("w1", &["worker", "join", &token, "--remote", &m.addr, "--data-dir", data, "--runtime", runtime]);
    m.wait_ready(2);
    (m, image)
}

/// Two tasks (one in a private network namespace, one on the host's network)
/// read the same secret; host uid 65534 reads neither the secret through
/// `/proc/<pid>/root` nor the environment, and the two tasks' host IDs are
/// disjoint blocks from 2^31 up.
#[test]
fn invariant_9_host_uid_65534_cannot_read_a_tasks_secrets() {
    let test = "userns::invariant_9_host_uid_65534_cannot_read_a_tasks_secrets";
    if prerequisites(test) {
        nobody_reads_nothing("runc", 0);
    }
}

/// The same with crun (through its hybrid-cgroup workaround).
#[test]
fn invariant_9_host_uid_65534_cannot_read_a_crun_tasks_secrets() {
    let test = "userns::invariant_9_host_uid_65534_cannot_read_a_crun_tasks_secrets";
    if !prerequisites(test) {
        return;
    }
    if Command::new("crun").arg("--version").output().is_err() {
        if std::env::var("SWARMD_REQUIRE_RUNC").is_ok_and(|v| v == "1") {
            panic!("{test}: crun is missing (scripts/setup installs it as root)");
        }
        return eprintln!("\n!!!!! SKIPPED {test}: needs crun\n");
    }
    nobody_reads_nothing("crun", 2);
}

fn nobody_reads_nothing(runtime: &str, first_marker: u32) {
    let mut env = Env::new();
    let (m, image) = cluster(&mut env, runtime);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let value = format!("userns-secret-{}-{nanos}", std::process::id());
    let env_value = format!("userns-env-{nanos}");
    assert!(m.ctl_stdin(&["create", "db_pass"], value.as_bytes()).status.success());
    let img = image.as_str();
    let mut pids = Vec::new();
    for (n, (service, network)) in [("private-net", "none"), ("host-net", "host")].into_iter().enumerate() {
        let sleep = marker(first_marker + n as u32);
        let script = format!("sha256sum /run/secrets/db_pass; id -u; echo started; exec {sleep}");
        let env_kv = format!("API_TOKEN={env_value}");
        m.ctl_ok(&[
            "service",
            "create",
            service,
            "--image",
            img,
            "--secret",
            "db_pass",
            "--env",
            &env_kv,
            "--network",
            network,
            "--",
            "sh",
            "-c",
            &script,
        ]);
        wait_for(&format!("{service} to run"), Duration::from_secs(60), || running_task(&m, service));
        wait_for(&format!("{service}'s output"), Duration::from_secs(30), || {
            logs(&m, service).contains("started").then_some(())
        });
        let out = logs(&m, service);
        // The task itself still reads its secret, as uid 65534 inside.
        assert!(out.contains(&sha256_hex(value.as_bytes())), "{service} could not read its secret:\n{out}");
        assert!(out.lines().any(|l| l.ends_with("| 65534")), "{service} does not run as uid 65534 inside:\n{out}");
        let pid = wait_for(&format!("{service}'s process"), Duration::from_secs(10), || pid_of(&sleep));
        pids.push((service, pid));
    }

    for &(service, pid) in &pids {
        let secret = format!("/proc/{pid}/root/run/secrets/db_pass");
        // Control: the path is right (host root reads it), so a refusal below is real.
        assert_eq!(std::fs::read(&secret).unwrap(), value.as_bytes(), "{service}: wrong path");
        for path in [secret.clone(), format!("/proc/{pid}/environ")] {
            let (ok, stdout, stderr) = cat_as_nobody(&path);
            let leaked = [value.as_bytes(), env_value.as_bytes()]
                .iter()
                .any(|needle| stdout.windows(needle.len()).any(|w| w == *needle));
            assert!(!ok && !leaked, "{service}: host uid 65534 read {path} ({} bytes)", stdout.len());
            assert!(stderr.contains("Permission denied"), "{service}: {path}: not EACCES: {stderr}");
        }
        // The task's uid 65534 is a host uid of its own block, far from host 65534.
        let uid = host_uid(pid);
        assert!(uid >= 1 << 31, "{service}: runs as host uid {uid}");
        let map = uid_map(pid);
        assert_eq!(map.len(), 1, "{service}: {map:?}");
        let (inside, outside, count) = map[0];
        assert_eq!((inside, count), (0, 65536), "{service}: {map:?}");
        assert!(outside >= 1 << 31 && outside % 65536 == 0, "{service}: {map:?}");
        assert_eq!(uid, outside + 65534, "{service}");
    }
    let (a, b) = (uid_map(pids[0].1)[0].1, uid_map(pids[1].1)[0].1);
    assert!(a + 65536 <= b || b + 65536 <= a, "two tasks share host IDs: {a} and {b}");
}

/// `service create --userns host`: the documented opt-out reaches the worker,
/// which runs that task in the host's user namespace (and shows it in inspect).
#[test]
fn a_service_created_with_userns_host_runs_in_the_hosts_user_namespace() {
    let test = "userns::a_service_created_with_userns_host_runs_in_the_hosts_user_namespace";
    if !prerequisites(test) {
        return;
    }
    let mut env = Env::new();
    let (m, image) = cluster(&mut env, "runc");
    let sleep = marker(7);
    let script = format!("echo started; exec {sleep}");
    let img = image.as_str();
    m.ctl_ok(&["service", "create", "shared", "--image", img, "--userns", "host", "--", "sh", "-c", &script]);
    let inspect: Value =
        serde_json::from_str(&m.ctl_ok(&["--format", "json", "service", "inspect", "shared"])).unwrap();
    assert_eq!(inspect["userns"], "host", "{inspect}");
    wait_for("the task to run", Duration::from_secs(60), || running_task(&m, "shared"));
    let pid = wait_for("its process", Duration::from_secs(30), || pid_of(&sleep));
    assert_eq!(uid_map(pid), [(0, 0, 4_294_967_295)], "not the host's user namespace");
    assert_eq!(host_uid(pid), 65534);
    // Anything else is refused and changes nothing.
    let o = m.ctl(&["service", "create", "bad", "--image", img, "--userns", "remap", "--", "true"]);
    assert!(!o.status.success());
    assert!(m.ctl(&["service", "inspect", "bad"]).status.success().then_some(()).is_none());
}
