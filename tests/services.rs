//! Services and secret delivery end to end, with real runc containers (root,
//! runc and busybox: skipped loudly without them, mandatory in CI).
//!
//! Two workers; a service placed on A referencing S reads it from a read-only
//! tmpfs; B holds nothing and its session never carried S; a raw client with
//! B's certificate gets no S; an update of S reaches the running task in place;
//! removing A moves the task to B while A wipes everything and exits.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn worker_status(env: &Env, w: &Worker) -> Value {
    let o = env.swarmd(&["worker", "status", "--data-dir", w.data.to_str().unwrap()]);
    serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
}

fn tasks(m: &Manager, service: &str) -> Vec<Value> {
    let o = m.ctl(&["--format", "json", "service", "ps", service]);
    serde_json::from_slice::<Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn running_task(m: &Manager, service: &str) -> Option<Value> {
    tasks(m, service).into_iter().find(|t| t["desired"] == "running" && t["state"] == "running")
}

/// Secret mounts of these nodes (tests run side by side: others may exist).
fn secret_mounts(nodes: &[&str]) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("swarmd-secrets") && nodes.iter().any(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// One manager (1 s heartbeats), workers A and B, a busybox image.
struct Cluster {
    env: Env,
    image: String,
    m: Manager,
    a: Worker,
    b: Worker,
}

fn cluster() -> Cluster {
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let image = busybox_image(&env, &m);
    let token = m.token("worker");
    let a = env.join_worker("wa", &token, &m.addr);
    let b = env.join_worker("wb", &token, &m.addr);
    m.wait_ready(3);
    Cluster { env, image, m, a, b }
}

fn logs(m: &Manager, service: &str) -> String {
    m.ctl_ok(&["service", "logs", service])
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_reach_only_the_worker_running_the_task_and_follow_updates_and_removal() {
    if !can_run_containers("services::secrets_reach_only_the_worker_running_the_task_and_follow_updates_and_removal") {
        return;
    }
    swarmd_certs::install_crypto_provider();
    let Cluster { mut env, image, m, a, b } = cluster();
    let (a_id, b_id) = (a.node_id(), b.node_id());

    let value = format!("db-password-{}", std::process::id());
    let o = m.ctl_stdin(&["create", "db_pass"], value.as_bytes());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let secret_id = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    let o = m.ctl_stdin(&["create", "unused"], b"never delivered");
    assert!(o.status.success());

    // Policy refusals change nothing.
    let img = image.as_str();
    for extra in [vec!["--privileged"], vec!["--cap-add", "NET_ADMIN"]] {
        let mut args = vec!["service", "create", "bad", "--image", img];
        args.extend(extra);
        args.extend(["--", "true"]);
        let o = m.ctl(&args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(String::from_utf8_lossy(&o.stderr).contains("not allowed"), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(m.ctl_ok(&["service", "ls", "-q"]).trim().is_empty());

    let script = "id; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; \
                  touch /x 2>/dev/null || echo rootfs-ro; touch /run/secrets/y 2>/dev/null || echo secrets-ro; \
                  last=; while true; do h=$(sha256sum /run/secrets/db_pass); \
                  if [ \"$h\" != \"$last\" ]; then echo \"$h\"; last=$h; fi; sleep 0.2; done";
    let constraint = format!("node.id=={a_id}");
    m.ctl_ok(&[
        "service",
        "create",
        "web",
        "--image",
        img,
        "--secret",
        "db_pass,mode=0400,uid=65534",
        "--constraint",
        &constraint,
        "--",
        "sh",
        "-c",
        script,
    ]);
    let first = wait_for("the task to run on A", Duration::from_secs(60), || running_task(&m, "web"));
    assert_eq!(first["node_id"], a_id.as_str());
    let want = format!("{}  /run/secrets/db_pass", sha256_hex(value.as_bytes()));
    wait_for("the workload to read the secret", Duration::from_secs(30), || {
        logs(&m, "web").contains(&want).then_some(())
    });
    let out = logs(&m, "web");
    for w in ["uid=65534", "CapEff:\t0000000000000000", "NoNewPrivs:\t1", "Seccomp:\t2", "rootfs-ro", "secrets-ro"] {
        assert!(out.contains(w), "missing {w:?} in the task's output:\n{out}");
    }
    assert!(!out.contains(&value), "the value itself was printed");

    // A holds S (and only S); B holds nothing, mounts nothing, and its session
    // never carried S (the managers' delivery audit names nodes).
    let sa = worker_status(&env, &a);
    assert_eq!(sa["secrets"], serde_json::json!([format!("{secret_id}@1")]), "{sa}");
    let sb = worker_status(&env, &b);
    assert_eq!(sb["secrets"], serde_json::json!([]), "{sb}");
    assert_eq!(sb["tasks"], serde_json::json!([]), "{sb}");
    let mounts = secret_mounts(&[&a_id, &b_id]);
    assert_eq!(mounts.len(), 1, "{mounts:#?}");
    assert!(mounts[0].contains(&a_id) && !mounts[0].contains(&b_id));
    let mlog = env.procs[m.proc_idx].log_text();
    assert!(mlog.contains(&format!("secret delivered to node node.id={a_id}")));
    assert!(!mlog.contains(&format!("secret delivered to node node.id={b_id}")), "B's session carried a secret");

    // A raw client with B's certificate: its own session carries no secret,
    // and the control API (where secrets live) refuses it.
    {
        use swarmd_proto::control::control_client::ControlClient;
        use swarmd_proto::control::{GetSecretRequest, ListSecretsRequest};
        use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
        use swarmd_proto::dispatcher::SessionRequest;
        let bid = swarmd_certs::NodeIdentity::load(&b.data.join("certs")).unwrap();
        let ch =
            swarmd_certs::dial::connect(&m.addr, std::sync::Arc::new(swarmd_certs::tls::client_config(&bid).unwrap()))
                .await
                .unwrap();
        let mut stream = DispatcherClient::new(ch.clone())
            .session(SessionRequest { hostname: "impostor".into() })
            .await
            .unwrap()
            .into_inner();
        let mut carried = Vec::new();
        let mut session_id = String::new();
        for _ in 0..2 {
            if let Ok(Ok(Some(msg))) = tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                if !msg.session_id.is_empty() {
                    session_id = msg.session_id.clone();
                }
                if let Some(a) = msg.assignments {
                    carried.extend(a.secrets.into_iter().map(|s| s.id));
                    assert!(a.tasks.is_empty(), "B was given tasks");
                }
            }
        }
        assert!(carried.is_empty(), "B's session carried secrets {carried:?}");
        let c = ControlClient::new(ch.clone()).list_secrets(ListSecretsRequest::default()).await;
        assert_eq!(c.unwrap_err().code(), tonic::Code::PermissionDenied);
        let c = ControlClient::new(ch.clone()).get_secret(GetSecretRequest { name_or_id: secret_id.clone() }).await;
        assert_eq!(c.unwrap_err().code(), tonic::Code::PermissionDenied);
        // Nor can it report on, or read the output of, A's task.
        use swarmd_proto::dispatcher::{PushLogsRequest, TaskStatus, UpdateTaskStatusRequest};
        let a_task = first["id"].as_str().unwrap().to_owned();
        let forged = UpdateTaskStatusRequest {
            session_id: session_id.clone(),
            updates: vec![TaskStatus {
                task_id: a_task.clone(),
                state: swarmd_proto::dispatcher::TaskState::Failed.into(),
                message: "forged".into(),
                ..Default::default()
            }],
        };
        let _ = DispatcherClient::new(ch.clone()).update_task_status(forged).await;
        let push = PushLogsRequest { session_id, task_id: a_task.clone(), lines: vec!["forged".into()] };
        let c = DispatcherClient::new(ch).push_logs(push).await;
        assert_eq!(c.unwrap_err().code(), tonic::Code::PermissionDenied);
        let t = tasks(&m, "web").into_iter().find(|t| t["id"] == a_task.as_str()).unwrap();
        assert_eq!(t["state"], "running", "B changed A's task: {t}");
        assert!(!logs(&m, "web").contains("forged"));
    }

    // No disk of any node holds the value, nor any log (the task's output
    // printed only its hash): data dirs of the manager and both workers.
    for needle in [value.as_bytes().to_vec(), hex::encode(value.as_bytes()).into_bytes()] {
        let hits = grep_dir(env.dir.path(), &needle);
        assert!(hits.is_empty(), "the secret value is on disk: {hits:?}");
    }

    // The secret is in use: it cannot be removed.
    let o = m.ctl(&["rm", "db_pass"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by service(s) web"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // An update reaches the running task in place: same task, new content.
    let v2 = format!("rotated-{}", std::process::id());
    assert!(m.ctl_stdin(&["update", "db_pass"], v2.as_bytes()).status.success());
    let want2 = format!("{}  /run/secrets/db_pass", sha256_hex(v2.as_bytes()));
    wait_for("the running task to see version 2", Duration::from_secs(30), || {
        logs(&m, "web").contains(&want2).then_some(())
    });
    let now = running_task(&m, "web").expect("still running");
    assert_eq!(now["id"], first["id"], "the task was restarted for an update");
    assert_eq!(worker_status(&env, &a)["secrets"], serde_json::json!([format!("{secret_id}@2")]));

    // Worker restart: the task comes back with its secret re-delivered.
    let exit = env.proc(a.proc_idx).terminate();
    assert!(exit.success(), "{exit:?}");
    assert!(secret_mounts(&[&a_id]).is_empty(), "a stopped worker left a secret mount");
    let a_idx = env.run_node("wa2", &a.data);
    wait_for("the secret re-delivered after a restart", Duration::from_secs(60), || {
        (worker_status(&env, &a)["secrets"] == serde_json::json!([format!("{secret_id}@2")])).then_some(())
    });
    wait_for("the task running again", Duration::from_secs(60), || running_task(&m, "web"));

    // Removal: an unconstrained replica on A (B drained while it is placed);
    // `node rm A` → A is refused and exits having wiped everything, the task
    // runs on B.
    m.ctl_ok(&["service", "rm", "web"]);
    m.ctl_ok(&["node", "update", &b_id, "--availability", "drain"]);
    m.ctl_ok(&[
        "service",
        "create",
        "api",
        "--image",
        img,
        "--secret",
        "db_pass",
        "--",
        "sh",
        "-c",
        "sha256sum /run/secrets/db_pass; while true; do sleep 1; done",
    ]);
    let t = wait_for("api on A", Duration::from_secs(60), || running_task(&m, "api"));
    assert_eq!(t["node_id"], a_id.as_str());
    m.ctl_ok(&["node", "update", &b_id, "--availability", "active"]);
    let removed = m.ctl(&["node", "rm", "--force", &a_id]);
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    let exit = wait_for("A to exit", Duration::from_secs(30), || env.procs[a_idx].child.try_wait().unwrap());
    assert!(!exit.success());
    let alog = env.procs[a_idx].log_text();
    assert!(alog.contains("removed from the cluster"), "{alog}");
    assert!(secret_mounts(&[&a_id]).is_empty(), "A left a secret mount");
    assert!(!std::path::Path::new("/run/swarmd").join(&a_id).exists(), "A left its run dir");
    let t = wait_for("api on B", Duration::from_secs(60), || running_task(&m, "api"));
    assert_eq!(t["node_id"], b_id.as_str());
    assert_eq!(worker_status(&env, &b)["secrets"], serde_json::json!([format!("{secret_id}@2")]));

    // Service removal: the task ends, its tmpfs goes, B forgets the secret.
    m.ctl_ok(&["service", "rm", "api"]);
    wait_for("B to forget everything", Duration::from_secs(30), || {
        let s = worker_status(&env, &b);
        (s["tasks"] == serde_json::json!([])
            && s["secrets"] == serde_json::json!([])
            && secret_mounts(&[&b_id]).is_empty())
        .then_some(())
    });
}

/// A worker that dies (kill -9): once it has been DOWN for three heartbeat
/// periods its task runs on another worker; when it comes back it removes
/// what its previous run left (container, secret mount) and does not restart
/// the task it lost.
#[test]
fn a_task_of_a_dead_worker_moves_after_the_grace_period() {
    if !can_run_containers("services::a_task_of_a_dead_worker_moves_after_the_grace_period") {
        return;
    }
    let Cluster { mut env, image, m, a, b } = cluster();
    let (a_id, b_id) = (a.node_id(), b.node_id());
    assert!(m.ctl_stdin(&["create", "s"], b"v").status.success());
    m.ctl_ok(&["node", "update", &b_id, "--availability", "drain"]);
    m.ctl_ok(&[
        "service",
        "create",
        "job",
        "--image",
        image.as_str(),
        "--secret",
        "s",
        "--",
        "sh",
        "-c",
        "while true; do sleep 1; done",
    ]);
    let first = wait_for("job on A", Duration::from_secs(60), || running_task(&m, "job"));
    assert_eq!(first["node_id"], a_id.as_str());
    m.ctl_ok(&["node", "update", &b_id, "--availability", "active"]);
    env.proc(a.proc_idx).kill9();
    let moved = wait_for("job on B", Duration::from_secs(60), || {
        running_task(&m, "job").filter(|t| t["node_id"] == b_id.as_str())
    });
    assert_ne!(moved["id"], first["id"]);
    // A comes back: it clears what it left, and the lost task stays stopped.
    env.run_node("wa2", &a.data);
    wait_for("A's leftovers cleared", Duration::from_secs(60), || {
        let s = worker_status(&env, &a);
        (secret_mounts(&[&a_id]).is_empty() && s["tasks"] == serde_json::json!([])).then_some(())
    });
    wait_for("the lost task recorded as shut down", Duration::from_secs(30), || {
        tasks(&m, "job").into_iter().find(|t| t["id"] == first["id"] && t["state"] == "shutdown")
    });
}

/// An update far larger than the value a task's tmpfs was first sized for
/// (1 KiB, referenced under three targets → 3 × 400 KiB) reaches the running
/// task in place: the tmpfs grows for it, no partial `.new` file is left, and
/// the task's message stays clear.
#[test]
fn invariant_6_a_large_secret_update_reaches_the_running_task_in_place() {
    if !can_run_containers("services::invariant_6_a_large_secret_update_reaches_the_running_task_in_place") {
        return;
    }
    let Cluster { env: _env, image, m, a, b: _b } = cluster();
    let a_id = a.node_id();
    let small: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    assert!(m.ctl_stdin(&["create", "cert"], &small).status.success());
    let script = "last=; while true; do h=$(cat /run/secrets/one /run/secrets/two /run/secrets/three | sha256sum); \
                  if [ \"$h\" != \"$last\" ]; then echo \"$h\"; last=$h; fi; sleep 0.2; done";
    let constraint = format!("node.id=={a_id}");
    m.ctl_ok(&[
        "service",
        "create",
        "tls",
        "--image",
        image.as_str(),
        "--secret",
        "cert,target=one",
        "--secret",
        "cert,target=two",
        "--secret",
        "cert,target=three",
        "--constraint",
        &constraint,
        "--",
        "sh",
        "-c",
        script,
    ]);
    let first = wait_for("the task to run on A", Duration::from_secs(60), || running_task(&m, "tls"));
    let thrice = |v: &[u8]| format!("{}  -", sha256_hex(&[v, v, v].concat()));
    wait_for("the workload to read the small value", Duration::from_secs(30), || {
        logs(&m, "tls").contains(&thrice(&small)).then_some(())
    });

    let large: Vec<u8> = (0..400 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let o = m.ctl_stdin(&["update", "cert"], &large);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for("the running task to see the 400 KiB value", Duration::from_secs(60), || {
        logs(&m, "tls").contains(&thrice(&large)).then_some(())
    });
    let now = running_task(&m, "tls").expect("still running");
    assert_eq!(now["id"], first["id"], "the task was restarted for an update");
    assert_eq!(now["message"], "", "{now}");
    let dir =
        std::path::Path::new("/run/swarmd").join(&a_id).join("tasks").join(now["id"].as_str().unwrap()).join("secrets");
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    names.sort();
    // (`identity`: the task's workload identity, beside its secrets.)
    assert_eq!(names, ["identity", "one", "three", "two"], "partial files left in {}", dir.display());
}

/// `swarmd worker join` with extra environment variables for the worker.
fn join_worker_with_env(env: &mut Env, name: &str, token: &str, remote: &str, vars: &[(&str, &str)]) -> Worker {
    let data = env.path(name);
    let log = env.path(&format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(swarmd_bin())
        .args(["worker", "join", token, "--remote", remote, "--data-dir", data.to_str().unwrap()])
        .env("RUST_LOG", "info,openraft=warn")
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    env.procs.push(Proc { name: name.to_owned(), child, log });
    Worker { name: name.to_owned(), data, proc_idx: env.procs.len() - 1 }
}

/// An update that cannot fit (the worker caps a task's secret tmpfs at
/// 300,000 bytes here): the task keeps running with the old value, its
/// message in `service ps` says why, nothing partial is left, and the worker
/// retries; a later update that fits replaces it and clears the message.
#[test]
fn invariant_6_a_secret_update_that_cannot_fit_is_reported_and_retried() {
    if !can_run_containers("services::invariant_6_a_secret_update_that_cannot_fit_is_reported_and_retried") {
        return;
    }
    let mut env = Env::new();
    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let image = busybox_image(&env, &m);
    let token = m.token("worker");
    let w = join_worker_with_env(&mut env, "wc", &token, &m.addr, &[("SWARMD_TASK_SECRETS_MAX", "300000")]);
    m.wait_ready(2);
    let node = w.node_id();
    let v1 = vec![b'1'; 1024];
    assert!(m.ctl_stdin(&["create", "key"], &v1).status.success());
    let script = "last=; while true; do h=$(sha256sum /run/secrets/key); \
                  if [ \"$h\" != \"$last\" ]; then echo \"$h\"; last=$h; fi; sleep 0.2; done";
    m.ctl_ok(&["service", "create", "capped", "--image", image.as_str(), "--secret", "key", "--", "sh", "-c", script]);
    let first = wait_for("the task to run", Duration::from_secs(60), || running_task(&m, "capped"));
    let seen = |v: &[u8]| format!("{}  /run/secrets/key", sha256_hex(v));
    wait_for("the first value", Duration::from_secs(30), || logs(&m, "capped").contains(&seen(&v1)).then_some(()));

    let v2 = vec![b'2'; 400 * 1024];
    assert!(m.ctl_stdin(&["update", "key"], &v2).status.success());
    let t = wait_for("the failure in the task's message", Duration::from_secs(30), || {
        running_task(&m, "capped").filter(|t| t["message"].as_str().unwrap_or("").contains("secret update failed"))
    });
    assert_eq!(t["id"], first["id"]);
    assert!(t["message"].as_str().unwrap().contains("bytes of tmpfs"), "{t}");
    let dir =
        std::path::Path::new("/run/swarmd").join(&node).join("tasks").join(t["id"].as_str().unwrap()).join("secrets");
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, ["identity", "key"], "partial files left in {}", dir.display());
    assert!(!logs(&m, "capped").contains(&seen(&v2)));
    let wlog = env.procs[w.proc_idx].log_text();
    assert!(wlog.contains("retry_in"), "no retry logged:\n{wlog}");

    let v3 = vec![b'3'; 2048];
    assert!(m.ctl_stdin(&["update", "key"], &v3).status.success());
    wait_for("the fitting value in the task", Duration::from_secs(30), || {
        logs(&m, "capped").contains(&seen(&v3)).then_some(())
    });
    let t = wait_for("the message cleared", Duration::from_secs(30), || {
        running_task(&m, "capped").filter(|t| t["message"] == "")
    });
    assert_eq!(t["id"], first["id"]);
}
