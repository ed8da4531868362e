//! Invariant 12: a worker is a potential attacker. Raw clients with real
//! worker certificates (joined through the real join RPC) flood the RPCs a
//! worker may call; the managers' raft log, state and memory stay bounded,
//! nothing a node says about itself steers placement, and assignments of any
//! size reach the node, which is ready only once it has acknowledged them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use swarmd_certs::tls::client_config;
use swarmd_certs::{dial, JoinToken, NodeIdentity, Role};
use swarmd_proto::ca::ca_client::CaClient;
use swarmd_proto::ca::RenewNodeCertificateRequest;
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::{
    Assignments, HeartbeatRequest, PushLogsRequest, SessionRequest, TaskStatus, UpdateTaskStatusRequest,
};
use tonic::transport::Channel;
use tonic::Code;

/// A worker made of raw RPCs: joined for real, its session kept by a task
/// that collects what it is sent and (unless `ack` is off) acknowledges it.
struct RawWorker {
    id: String,
    ch: Channel,
    session_id: String,
    received: Arc<Mutex<Vec<Assignments>>>,
    largest_message: Arc<Mutex<usize>>,
    stream_ended: Arc<std::sync::atomic::AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl RawWorker {
    async fn join(m: &Manager, hostname: &str, session_hostname: &str, ack: bool) -> RawWorker {
        let token: JoinToken = m.token("worker").parse().unwrap();
        let issued =
            swarmd_certs::join::request_certificate(&token, std::slice::from_ref(&m.addr), hostname, Role::Worker)
                .await
                .unwrap();
        let identity: NodeIdentity = issued.identity;
        let ch = dial::connect(&m.addr, Arc::new(client_config(&identity).unwrap())).await.unwrap();
        // The default 4 MiB limit of a gRPC client: every message must fit it.
        let mut client = DispatcherClient::new(ch.clone());
        let mut stream =
            client.session(SessionRequest { hostname: session_hostname.into() }).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        let session_id = first.session_id.clone();
        let received: Arc<Mutex<Vec<Assignments>>> = Arc::default();
        let largest = Arc::new(Mutex::new(0usize));
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, l, e, sid) = (received.clone(), largest.clone(), ended.clone(), session_id.clone());
        let task = tokio::spawn(async move {
            let mut seq = 0;
            let mut beat = tokio::time::interval(Duration::from_millis(300));
            loop {
                tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(m)) => {
                            use prost::Message;
                            let len = m.encoded_len();
                            let mut big = l.lock().unwrap();
                            *big = (*big).max(len);
                            if let Some(a) = m.assignments {
                                if !a.more {
                                    seq = m.seq;
                                }
                                r.lock().unwrap().push(a);
                            }
                        }
                        _ => {
                            e.store(true, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                    },
                    _ = beat.tick() => {
                        let req = HeartbeatRequest { session_id: sid.clone(), assignments_seq: if ack { seq } else { 0 } };
                        let _ = client.heartbeat(req).await;
                    }
                }
            }
        });
        RawWorker {
            id: identity.info.node_id.to_string(),
            ch,
            session_id,
            received,
            largest_message: largest,
            stream_ended: ended,
            _task: task,
        }
    }

    fn tasks(&self) -> Vec<String> {
        self.received.lock().unwrap().iter().flat_map(|a| a.tasks.iter().map(|t| t.id.clone())).collect()
    }

    fn secrets(&self) -> Vec<(String, usize)> {
        let r = self.received.lock().unwrap();
        r.iter().flat_map(|a| a.secrets.iter().map(|s| (s.id.clone(), s.data.len()))).collect()
    }
}

fn wal_bytes(m: &Manager) -> u64 {
    files_below(&m.data.join("raft/wal")).iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum()
}

fn last_log_index(m: &Manager) -> u64 {
    info(m).unwrap()["last_log_index"].as_u64().unwrap()
}

fn service_on(m: &Manager, name: &str, constraint: &str, secrets: &[&str]) {
    // The raw workers run nothing: a directory that exists nowhere will do.
    m.ctl_ok(&["cluster", "update", "--allow-host-rootfs=true"]);
    let mut args = vec!["service", "create", name, "--image", "/nonexistent", "--constraint", constraint];
    for s in secrets {
        args.extend(["--secret", s]);
    }
    args.extend(["--", "sleep", "1000"]);
    m.ctl_ok(&args);
}

fn tasks_of(m: &Manager, service: &str) -> Vec<serde_json::Value> {
    let o = m.ctl(&["--format", "json", "service", "ps", service]);
    serde_json::from_slice(&o.stdout).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_12_a_worker_cannot_grow_the_raft_log_state_or_memory_without_bound() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m", &["--heartbeat", "1s"]);
    let a = RawWorker::join(&m, "a", "a", true).await;
    let b = RawWorker::join(&m, "b", "b", true).await;
    m.wait_ready(3);
    service_on(&m, "on-a", &format!("node.id=={}", a.id), &[]);
    service_on(&m, "on-b", &format!("node.id=={}", b.id), &[]);
    let task_a = wait_for("a task on A", DEADLINE, || a.tasks().into_iter().next());
    let task_b = wait_for("a task on B", DEADLINE, || b.tasks().into_iter().next());
    let b_before = tasks_of(&m, "on-b")[0].clone();

    let (wal0, index0) = (wal_bytes(&m), last_log_index(&m));
    let mut dispatcher = DispatcherClient::new(a.ch.clone()).max_encoding_message_size(64 << 20);
    // 15 requests of 4 MB each, for tasks that do not exist (the review grew
    // raft/wal from 9 KB to 52 MB with these).
    let huge = |i: usize| UpdateTaskStatusRequest {
        session_id: a.session_id.clone(),
        updates: (0..40)
            .map(|k| TaskStatus {
                task_id: format!("t{i}x{k}nonexistent00000"),
                state: swarmd_proto::dispatcher::TaskState::Failed.into(),
                message: "x".repeat(100_000),
                ..Default::default()
            })
            .collect(),
    };
    for i in 0..15 {
        let r = dispatcher.update_task_status(huge(i)).await;
        assert!(r.is_err(), "a 4 MB status report was taken");
    }
    // Many small reports: unknown tasks, another node's task, the same state again.
    for i in 0..200 {
        let mut updates: Vec<TaskStatus> = (0..60)
            .map(|k| TaskStatus {
                task_id: format!("{i:08}{k:017}"),
                state: swarmd_proto::dispatcher::TaskState::Failed.into(),
                message: "no".into(),
                ..Default::default()
            })
            .collect();
        updates.push(TaskStatus {
            task_id: task_b.clone(),
            state: swarmd_proto::dispatcher::TaskState::Failed.into(),
            message: "from A".into(),
            ..Default::default()
        });
        let req = UpdateTaskStatusRequest { session_id: a.session_id.clone(), updates };
        let _ = dispatcher.update_task_status(req).await;
    }
    let too_many = UpdateTaskStatusRequest {
        session_id: a.session_id.clone(),
        updates: (0..65)
            .map(|_| TaskStatus {
                task_id: task_a.clone(),
                state: swarmd_proto::dispatcher::TaskState::Running.into(),
                message: String::new(),
                ..Default::default()
            })
            .collect(),
    };
    assert_eq!(dispatcher.update_task_status(too_many).await.unwrap_err().code(), Code::InvalidArgument);
    // Its own task, flipping its message as fast as it can: the budget stops it.
    let mut exhausted = false;
    for i in 0..400 {
        let req = UpdateTaskStatusRequest {
            session_id: a.session_id.clone(),
            updates: vec![TaskStatus {
                task_id: task_a.clone(),
                state: swarmd_proto::dispatcher::TaskState::Running.into(),
                message: format!("m{i}"),
                ..Default::default()
            }],
        };
        if let Err(s) = dispatcher.update_task_status(req).await {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.metadata().get("retry-after-ms").is_some());
            exhausted = true;
            break;
        }
    }
    assert!(exhausted, "400 status changes in a row were all written");
    // Renewals: each one is a signature and a raft entry.
    let mut renewed = 0;
    for _ in 0..30 {
        let csr_pem = swarmd_certs::generate_key_and_csr().unwrap().1;
        match CaClient::new(a.ch.clone()).renew_node_certificate(RenewNodeCertificateRequest { csr_pem }).await {
            Ok(_) => renewed += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert!(renewed <= 8, "{renewed} renewals in a row were signed");

    let (wal1, index1) = (wal_bytes(&m), last_log_index(&m));
    assert!(wal1 - wal0 < 1 << 20, "raft/wal grew by {} bytes", wal1 - wal0);
    assert!(index1 - index0 < 400, "{} raft entries from one worker's flood", index1 - index0);
    // Another node's task was not touched.
    let b_after = tasks_of(&m, "on-b")[0].clone();
    assert_eq!(b_after["state"], b_before["state"]);
    assert_eq!(b_after["message"], b_before["message"]);

    // Output: held in the manager's memory, bounded per task and paid for.
    let pid = env.procs[m.proc_idx].pid();
    let rss0 = rss_kib(pid);
    let line = "y".repeat(900);
    let mut refused = 0;
    // (Requests of 225 KB: a node's requests are at most 512 KiB.)
    for _ in 0..600 {
        let req = PushLogsRequest {
            session_id: a.session_id.clone(),
            task_id: task_a.clone(),
            lines: vec![line.clone(); 250],
        };
        if let Err(s) = dispatcher.push_logs(req).await {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            refused += 1;
        }
    }
    assert!(refused > 0, "135 MB of output in a burst was all taken");
    let grew = rss_kib(pid).saturating_sub(rss0);
    assert!(grew < 64 * 1024, "the manager's memory grew by {grew} KiB holding one task's output");
    let held = m.ctl_ok(&["service", "logs", "on-a"]);
    assert!(held.len() <= (1 << 20) + 200_000, "{} bytes of output held for one task", held.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_12_what_a_node_says_about_itself_steers_no_placement() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m", &["--heartbeat", "1s"]);
    // Joined as "w-real"; its session then claims to be "db-prod".
    let a = RawWorker::join(&m, "w-real", "db-prod", true).await;
    m.wait_ready(2);
    let node = m.node(&a.id).unwrap();
    assert_eq!(node["hostname"], "w-real", "a session renamed the node");
    service_on(&m, "prod-only", "node.hostname==db-prod", &[]);
    // The control: the constraint machinery does place on the real name.
    service_on(&m, "real-only", "node.hostname==w-real", &[]);
    wait_for("the real-name service to be placed on A", DEADLINE, || {
        tasks_of(&m, "real-only").iter().any(|t| t["node_id"] == a.id.as_str()).then_some(())
    });
    assert!(tasks_of(&m, "prod-only").is_empty(), "a self-reported hostname placed a task");
    assert_eq!(a.tasks().len(), 1, "A got the db-prod task");
    assert_eq!(m.node(&a.id).unwrap()["hostname"], "w-real");
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_4_assignments_of_any_size_reach_the_node_and_only_acknowledged_nodes_are_ready() {
    swarmd_certs::install_crypto_provider();
    let mut env = Env::new();
    let m = env.start_manager("m", &["--heartbeat", "1s"]);
    let a = RawWorker::join(&m, "a", "a", true).await;
    m.wait_ready(2);
    // 12 secrets just under 500 KiB: about 6 MB for one node.
    let mut refs = Vec::new();
    for i in 0..12 {
        let value = vec![b'a' + i as u8; 500 * 1024 - 1];
        let o = m.ctl_stdin(&["create", &format!("big{i}"), "-"], &value);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        refs.push(format!("big{i}"));
    }
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    service_on(&m, "heavy", &format!("node.id=={}", a.id), &refs);
    let got = wait_for("all 12 secrets on A", DEADLINE, || {
        let s = a.secrets();
        (s.len() == 12).then_some(s)
    });
    assert!(got.iter().all(|(_, len)| *len == 500 * 1024 - 1));
    let largest = *a.largest_message.lock().unwrap();
    assert!(largest < 4 << 20, "a session message of {largest} bytes");
    assert_eq!(a.tasks().len(), 1);
    m.ctl_ok(&["service", "rm", "heavy"]);
    wait_for("the task's removal to reach A", DEADLINE, || {
        let r = a.received.lock().unwrap();
        r.iter().any(|x| x.tasks.iter().any(|t| !t.desired_running) || !x.removed_tasks.is_empty()).then_some(())
    });
    assert_eq!(m.node(&a.id).unwrap()["status"], "ready");

    // A node that never acknowledges what it is sent is not ready, and its
    // session is cut after three heartbeat periods.
    let silent = RawWorker::join(&m, "silent", "silent", false).await;
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(m.node(&silent.id).unwrap()["status"], "ready", "a node that acknowledged nothing is ready");
    wait_for("the silent node's session to be cut", Duration::from_secs(30), || {
        silent.stream_ended.load(std::sync::atomic::Ordering::SeqCst).then_some(())
    });
    assert_ne!(m.node(&silent.id).unwrap()["status"], "ready");
}
