//! The task agent's retain / wipe / update logic, driven through recording
//! fakes of its seams: no root, no runc, no manager.
//!
//! Each test runs a real [`Agent`] (its `run` loop and its task loops) against
//! one [`Host`] (`fakes.rs`) that plays the container runtime, the secret
//! filesystem and the managers, and writes down everything asked of it as
//! [`Event`]s, in order.

mod fakes;

use std::sync::Arc;
use std::time::Duration;

use swarmd_proto::dispatcher::{Assignments, SecretKey, SecretValue, Task, TaskSecret, TaskSpec};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Agent, AgentState, Seams};
use crate::secret_mount::MountError;
use crate::userns::{IdAllocator, UserNamespace, ALLOCATION_FILE, MAX_BLOCKS};
use fakes::Event::*;
use fakes::{file, reported, Event, Host};

/// A running agent and what drives it.
struct Running {
    host: Arc<Host>,
    tx: mpsc::UnboundedSender<crate::assignment::Assignment>,
    state: watch::Receiver<AgentState>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

fn start(host: Host) -> Running {
    let host = Arc::new(host);
    let dir = tempfile::tempdir().unwrap();
    let seams = Seams {
        runtime: host.clone(),
        secret_fs: host.clone(),
        reporter: host.clone(),
        identity: host.clone(),
        images: Arc::new(NoImages),
    };
    let shutdown = CancellationToken::new();
    let agent = Agent::with_seams(seams, dir.path().to_owned(), shutdown.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let (state_tx, state) = watch::channel(AgentState::default());
    let done = tokio::spawn(agent.run(rx, state_tx));
    Running { host, tx, state, shutdown, done, dir }
}

impl Running {
    fn send(&self, a: Assignments) {
        self.tx.send(a.into()).unwrap();
    }

    fn events(&self) -> Vec<Event> {
        self.host.log.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `e` has been recorded; where it first is.
    async fn until(&self, e: &Event) -> usize {
        self.until_from(0, e).await
    }

    /// Waits (at most 10 s) until `e` has been recorded at `from` or later; where.
    async fn until_from(&self, from: usize, e: &Event) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(i) = self.events().iter().skip(from).position(|x| x == e) {
                return from + i;
            }
            assert!(tokio::time::Instant::now() < deadline, "no {e:?} in {:#?}", self.events());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the agent's state shows `tasks` and `secrets`.
    async fn until_state(&mut self, tasks: &[&str], secrets: &[&str]) {
        let want = |s: &AgentState| s.tasks == tasks && s.secrets == secrets;
        let got = tokio::time::timeout(Duration::from_secs(10), self.state.wait_for(want)).await.map(|_| ());
        assert!(got.is_ok(), "state {:?}, wanted tasks {tasks:?}, secrets {secrets:?}", *self.state.borrow());
    }

    fn count(&self, e: &Event) -> usize {
        self.events().iter().filter(|x| *x == e).count()
    }

    /// Events that concern `task`.
    fn of(&self, task: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| match e {
                Mounted(t, ..)
                | Replaced(t, _)
                | Identity(t, _)
                | Wiped(t)
                | Started(t, ..)
                | Stopped(t)
                | Reported(t, ..) => t == task,
                ClearedContainers | ClearedMounts => false,
            })
            .collect()
    }

    /// How many container starts were asked for `task`.
    fn starts(&self, task: &str) -> usize {
        self.of(task).iter().filter(|e| matches!(e, Started(..))).count()
    }

    /// Whether `task` holds a block of host IDs, as the run dir's allocation
    /// file says (what a restarted agent would load).
    fn holds_block(&self, task: &str) -> bool {
        IdAllocator::load(&self.dir.path().join(ALLOCATION_FILE), MAX_BLOCKS, 0).get(task).is_some()
    }

    /// Waits (at most 10 s) until `task`'s block of host IDs is free again.
    async fn until_released(&self, task: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.holds_block(task) {
            assert!(tokio::time::Instant::now() < deadline, "{task} still holds its block");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Shuts the agent down and waits for it; everything recorded.
    async fn stop(&mut self) -> Vec<Event> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), &mut self.done).await.expect("agent hung").unwrap();
        self.events()
    }
}

fn value(id: &str, version: u32, data: &str) -> SecretValue {
    SecretValue { id: id.into(), version, data: data.as_bytes().to_vec().into() }
}

/// A task that wants to run, with `secrets` as (secret ID, version, target).
fn task(id: &str, secrets: &[(&str, u32, &str)]) -> Task {
    let secrets = secrets
        .iter()
        .map(|(sid, version, target)| TaskSecret {
            secret_id: sid.to_string(),
            version: *version,
            name: sid.to_string(),
            target: target.to_string(),
            uid: 0,
            gid: 0,
            mode: 0o444,
        })
        .collect();
    Task {
        id: id.into(),
        service: "web".into(),
        slot: 1,
        desired_running: true,
        spec: Some(TaskSpec {
            image: "/images/busybox".into(),
            args: vec!["sleep".into()],
            secrets,
            ..Default::default()
        }),
    }
}

/// The whole set of what this node should run (a new session starts with one).
fn full(tasks: Vec<Task>, secrets: Vec<SecretValue>) -> Assignments {
    Assignments { full: true, tasks, secrets, ..Default::default() }
}

/// A change to what this node runs.
fn delta(tasks: Vec<Task>, secrets: Vec<SecretValue>) -> Assignments {
    Assignments { full: false, tasks, secrets, ..Default::default() }
}

#[tokio::test]
async fn leftovers_are_cleared_and_secrets_mounted_before_the_container_starts() {
    let mut a = start(Host::default());
    a.send(full(vec![task("t1", &[("s1", 1, "db")]), task("t2", &[])], vec![value("s1", 1, "hunter2")]));
    a.until(&reported("t1", "running", "")).await;
    a.until(&reported("t2", "running", "")).await;
    a.until_state(&["t1", "t2"], &["s1@1"]).await;

    let events = a.events();
    assert_eq!(events[..2], [ClearedContainers, ClearedMounts]);
    let t1 = a.of("t1");
    let Mounted(_, files, userns) = &t1[1] else { panic!("{t1:#?}") };
    assert_eq!(files, &[file("db", "hunter2")]);
    assert!(matches!(userns, UserNamespace::Private(_)), "{userns:?}");
    // The container gets the very mount, in the same user namespace.
    let mount = a.dir.path().join("tasks/t1/secrets");
    assert_eq!(
        t1,
        [
            reported("t1", "preparing", ""),
            t1[1].clone(),
            Identity("t1".into(), "cert t1 1".into()),
            Started("t1".into(), Some(mount), *userns),
            reported("t1", "running", ""),
        ]
    );
    // A task without secrets gets a tmpfs all the same, for its identity.
    let t2 = a.of("t2");
    assert!(matches!(&t2[1], Mounted(_, files, UserNamespace::Private(_)) if files.is_empty()), "{t2:#?}");
    assert!(matches!(&t2[2], Identity(_, cert) if cert.starts_with("cert t2 ")), "{t2:#?}");
    assert!(matches!(&t2[3], Started(_, Some(_), UserNamespace::Private(_))), "{t2:#?}");
    a.stop().await;
}

#[tokio::test]
async fn a_new_secret_version_replaces_the_file_in_place_without_a_restart() {
    let mut a = start(Host::default());
    a.send(full(
        vec![task("t1", &[("s1", 1, "db"), ("s2", 1, "api")])],
        vec![value("s1", 1, "old"), value("s2", 1, "key")],
    ));
    a.until(&reported("t1", "running", "")).await;

    let mut update = delta(vec![task("t1", &[("s1", 2, "db"), ("s2", 1, "api")])], vec![value("s1", 2, "new")]);
    update.removed_secrets = vec![SecretKey { id: "s1".into(), version: 1 }];
    a.send(update);
    a.until(&Replaced("t1".into(), vec![file("db", "new"), file("api", "key")])).await;
    a.until_state(&["t1"], &["s1@2", "s2@1"]).await;

    // A secret no longer referenced goes from the task's files.
    a.send(delta(vec![task("t1", &[("s1", 2, "db")])], vec![]));
    a.until(&Replaced("t1".into(), vec![file("db", "new")])).await;

    let t1 = a.of("t1");
    assert_eq!(t1.iter().filter(|e| matches!(e, Started(..))).count(), 1, "{t1:#?}");
    assert!(!t1.iter().any(|e| matches!(e, Stopped(_) | Wiped(_))), "restarted or wiped: {t1:#?}");
    a.stop().await;
}

#[tokio::test]
async fn a_task_no_longer_assigned_is_stopped_then_its_secrets_wiped_and_forgotten() {
    let mut a = start(Host::default());
    let (t1, t2, t3) = (task("t1", &[("s1", 1, "a")]), task("t2", &[("s2", 1, "b")]), task("t3", &[("s3", 1, "c")]));
    a.send(full(
        vec![t1.clone(), t2.clone(), t3.clone()],
        vec![value("s1", 1, "one"), value("s2", 1, "two"), value("s3", 1, "three")],
    ));
    for t in ["t1", "t2", "t3"] {
        a.until(&reported(t, "running", "")).await;
    }

    // A full set without t1 (a new session's): t1 goes, and so does its secret.
    a.send(full(vec![t2.clone(), t3.clone()], vec![value("s2", 1, "two"), value("s3", 1, "three")]));
    let stopped = a.until(&Stopped("t1".into())).await;
    let wiped = a.until(&Wiped("t1".into())).await;
    assert!(stopped < wiped, "wiped before its container stopped: {:#?}", a.events());
    a.until(&reported("t1", "shutdown", "stopped")).await;
    a.until_state(&["t2", "t3"], &["s2@1", "s3@1"]).await;

    // Removed by name, and told to stop: the same.
    a.send(Assignments { removed_tasks: vec!["t2".into()], ..Default::default() });
    a.send(delta(vec![Task { desired_running: false, ..t3 }], vec![]));
    for t in ["t2", "t3"] {
        let stopped = a.until(&Stopped(t.into())).await;
        assert!(stopped < a.until(&Wiped(t.into())).await);
        a.until(&reported(t, "shutdown", "stopped")).await;
    }
    a.until_state(&[], &["s2@1", "s3@1"]).await;
    for t in ["t1", "t2", "t3"] {
        a.until_released(t).await;
    }
    a.stop().await;
}

#[tokio::test]
async fn tasks_still_assigned_are_kept_across_a_session_reset() {
    let mut a = start(Host::default());
    let t1 = task("t1", &[("s1", 1, "db")]);
    a.send(full(vec![t1.clone()], vec![value("s1", 1, "hunter2")]));
    a.until(&reported("t1", "running", "")).await;
    let before = a.of("t1");

    // The session is cut and a new one begins with the full set again, which
    // still holds t1 (and now t2).
    a.send(full(vec![t1.clone(), task("t2", &[])], vec![value("s1", 1, "hunter2")]));
    a.until(&reported("t2", "running", "")).await;
    // And once more, with an incremental change in between.
    a.send(delta(vec![t1.clone()], vec![]));
    a.send(full(vec![t1, task("t2", &[])], vec![value("s1", 1, "hunter2")]));
    a.send(delta(vec![task("t3", &[])], vec![]));
    a.until(&reported("t3", "running", "")).await;

    assert_eq!(a.of("t1"), before, "t1 was touched");
    a.until_state(&["t1", "t2", "t3"], &["s1@1"]).await;
    assert!(a.holds_block("t1"));
    a.stop().await;
}

#[tokio::test]
async fn a_task_that_ended_is_wiped_and_not_started_again() {
    let mut a = start(Host::default());
    let (t1, t2) = (task("t1", &[("s1", 1, "db")]), task("t2", &[]));
    a.send(full(vec![t1.clone(), t2.clone()], vec![value("s1", 1, "x")]));
    a.until(&reported("t1", "running", "")).await;
    a.until(&reported("t2", "running", "")).await;

    a.host.exit("t1", 0);
    a.host.exit("t2", 3);
    a.until(&reported("t1", "complete", "exit status 0")).await;
    a.until(&reported("t2", "failed", "exit status 3")).await;
    a.until(&Wiped("t1".into())).await;
    a.until_state(&[], &["s1@1"]).await;
    a.until_released("t1").await;
    a.until_released("t2").await;

    // Still listed (the manager has not caught up): not run twice.
    a.send(full(vec![t1, t2], vec![value("s1", 1, "x")]));
    a.send(delta(vec![task("t3", &[])], vec![]));
    a.until(&reported("t3", "running", "")).await;
    assert_eq!((a.starts("t1"), a.starts("t2")), (1, 1));
    assert_eq!(a.count(&reported("t1", "preparing", "")), 1);
    a.stop().await;
}

#[tokio::test]
async fn a_failed_start_is_reported_and_its_secrets_wiped() {
    let host = Host::default();
    host.failing_starts.lock().unwrap().insert("t1".into(), "runtime");
    host.failing_starts.lock().unwrap().insert("t2".into(), "refused");
    let mut a = start(host);
    let (t1, t2) = (task("t1", &[("s1", 1, "db")]), task("t2", &[("s1", 1, "db")]));
    a.send(full(vec![t1.clone(), t2.clone()], vec![value("s1", 1, "x")]));

    let failed = a.until(&reported("t1", "failed", "fake: exec failed")).await;
    a.until(&reported("t2", "rejected", "refused by policy: privileged containers are not allowed")).await;
    for t in ["t1", "t2"] {
        let mounted = a.events().iter().position(|e| matches!(e, Mounted(x, ..) if x == t)).unwrap();
        assert!(mounted < a.until(&Wiped(t.into())).await);
    }
    assert!(!a.events()[failed..].contains(&reported("t1", "running", "")));
    // Their blocks are free again, and a full set that still lists them does
    // not start them again.
    a.until_state(&[], &["s1@1"]).await;
    a.until_released("t1").await;
    a.until_released("t2").await;
    a.send(full(vec![t1, t2], vec![value("s1", 1, "x")]));
    a.send(delta(vec![task("t3", &[])], vec![]));
    a.until(&reported("t3", "running", "")).await;
    assert_eq!((a.starts("t1"), a.starts("t2")), (1, 1));
    a.stop().await;
}

#[tokio::test]
async fn a_task_whose_secrets_cannot_be_mounted_fails_and_never_starts() {
    let host = Host::default();
    host.failing_mounts.lock().unwrap().insert("t1".into());
    let mut a = start(host);
    a.send(full(vec![task("t1", &[("s1", 1, "db")])], vec![value("s1", 1, "x")]));
    a.until(&Reported(
        "t1".into(),
        "failed".into(),
        format!("secrets: {}", MountError::NotTmpfs { path: a.dir.path().join("tasks/t1"), found: 0xef53 }),
    ))
    .await;
    a.until_state(&[], &["s1@1"]).await;
    assert!(!a.of("t1").iter().any(|e| matches!(e, Started(..))), "{:#?}", a.of("t1"));

    // A secret that was never delivered: rejected before anything is made.
    a.send(delta(vec![task("t2", &[("s9", 4, "db")])], vec![]));
    a.until(&reported("t2", "rejected", "secret s9 version 4 was not delivered")).await;
    assert_eq!(a.of("t2"), [reported("t2", "rejected", "secret s9 version 4 was not delivered")]);
    a.stop().await;
}

#[tokio::test]
async fn a_secret_update_that_cannot_fit_is_reported_and_retried_without_a_restart() {
    let host = Host::default();
    *host.failing_replaces.lock().unwrap() = 1;
    let mut a = start(host);
    a.send(full(vec![task("t1", &[("s1", 1, "db")])], vec![value("s1", 1, "old")]));
    a.until(&reported("t1", "running", "")).await;

    a.send(delta(vec![task("t1", &[("s1", 2, "db")])], vec![value("s1", 2, "much bigger")]));
    let why = MountError::TooLarge { need: 1 << 30, max: 64 << 20 };
    let msg = format!("secret update failed (the previous value is still in place; retrying): {why}");
    let failing = a.until(&reported("t1", "running", &msg)).await;
    // Retried after a backoff (1 s), and the task's message cleared.
    let replaced = a.until(&Replaced("t1".into(), vec![file("db", "much bigger")])).await;
    assert!(failing < replaced);
    a.until_from(replaced, &reported("t1", "running", "")).await;
    assert_eq!(a.count(&reported("t1", "running", &msg)), 1, "reported more than once");
    let t1 = a.of("t1");
    assert_eq!(a.starts("t1"), 1, "{t1:#?}");
    assert!(!t1.iter().any(|e| matches!(e, Stopped(_) | Wiped(_))), "{t1:#?}");
    a.until_state(&["t1"], &["s1@1", "s1@2"]).await;
    a.stop().await;
}

#[tokio::test]
async fn shutdown_stops_every_task_wipes_every_mount_and_forgets_every_secret() {
    let mut a = start(Host::default());
    a.send(full(
        vec![task("t1", &[("s1", 1, "a")]), task("t2", &[("s2", 1, "b")])],
        vec![value("s1", 1, "one"), value("s2", 1, "two")],
    ));
    a.until(&reported("t1", "running", "")).await;
    a.until(&reported("t2", "running", "")).await;
    a.until_state(&["t1", "t2"], &["s1@1", "s2@1"]).await;
    let events = a.stop().await;
    for t in ["t1", "t2"] {
        let stopped = events.iter().position(|e| *e == Stopped(t.into())).unwrap();
        let wiped = events.iter().position(|e| *e == Wiped(t.into())).unwrap();
        assert!(stopped < wiped, "{events:#?}");
        assert!(events.contains(&reported(t, "shutdown", "stopped")), "{events:#?}");
    }
    let last = a.state.borrow().clone();
    assert!(last.tasks.is_empty() && last.secrets.is_empty(), "{last:?}");
}

#[tokio::test]
async fn a_block_of_host_ids_stays_held_while_its_container_may_still_be_there() {
    let host = Host::default();
    host.sticky.lock().unwrap().insert("t1".into());
    let mut a = start(host);
    a.send(full(vec![task("t1", &[]), task("t2", &[])], vec![]));
    a.until(&reported("t1", "running", "")).await;
    a.until(&reported("t2", "running", "")).await;
    assert!(a.holds_block("t1") && a.holds_block("t2"));

    a.send(Assignments { removed_tasks: vec!["t1".into()], ..Default::default() });
    a.until(&reported("t1", "shutdown", "stopped")).await;
    // t2 ends after t1, and its end is handled after t1's.
    a.send(Assignments { removed_tasks: vec!["t2".into()], ..Default::default() });
    a.until_released("t2").await;
    assert!(a.holds_block("t1"), "a block given back while its container may still be there");
    a.until_state(&[], &[]).await;
    a.stop().await;
}

#[tokio::test]
async fn a_task_refused_an_identity_fails_before_its_container_starts_and_is_wiped() {
    let host = Host::default();
    host.refused_identities.lock().unwrap().insert("t1".into());
    let mut a = start(host);
    a.send(full(vec![task("t1", &[("s1", 1, "db")])], vec![value("s1", 1, "hunter2")]));
    let failed = Reported(
        "t1".into(),
        "failed".into(),
        "workload identity: the manager refused a workload identity: task t1 is not a live task of this node".into(),
    );
    a.until(&failed).await;
    a.until(&Wiped("t1".into())).await;
    assert_eq!(a.starts("t1"), 0, "{:#?}", a.of("t1"));
    assert!(!a.of("t1").iter().any(|e| matches!(e, Identity(..))));
    // (Its secret stays in memory until the next complete assignments, as for any failed task.)
    a.until_state(&[], &["s1@1"]).await;
    a.stop().await;
}

#[tokio::test]
async fn an_identity_is_renewed_in_place_at_half_its_life_and_wiped_with_the_task() {
    let host = Host::default();
    *host.identity_ttl.lock().unwrap() = Some(Duration::from_millis(200));
    let mut a = start(host);
    a.send(full(vec![task("t1", &[])], vec![]));
    a.until(&reported("t1", "running", "")).await;
    // Every 100 ms a new certificate, in the same mount, the container untouched.
    a.until(&Identity("t1".into(), "cert t1 4".into())).await;
    assert_eq!(a.starts("t1"), 1);
    assert_eq!(a.count(&Wiped("t1".into())), 0);
    a.send(full(vec![], vec![]));
    let wiped = a.until(&Wiped("t1".into())).await;
    let stopped = a.until(&Stopped("t1".into())).await;
    assert!(stopped < wiped, "the identity is wiped once the container is gone");
    a.until_state(&[], &[]).await;
    a.stop().await;
}

/// Unit tests run host directories only.
struct NoImages;

impl crate::images::ImageSource for NoImages {
    fn prepare(
        &self,
        _task: &str,
        _digest: &str,
        _trust: Option<crate::images::Trust>,
    ) -> crate::executor::BoxFuture<'static, Result<crate::images::Prepared, String>> {
        Box::pin(async { Err("no images in unit tests".to_owned()) })
    }
}
