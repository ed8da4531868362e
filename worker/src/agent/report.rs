//! How the task agent tells the managers about its tasks: their states and
//! their output, over the session's channel.
//!
//! The agent sees this only through [`Reporter`], so its unit tests record
//! what it reports instead of needing a manager.

use std::time::Duration;

use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::{PushLogsRequest, TaskState, TaskStatus, UpdateTaskStatusRequest};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::executor::BoxFuture;

/// Where the task agent sends task states and output.
pub(crate) trait Reporter: Send + Sync {
    /// Sends one task state (`preparing`, `running`, `complete`, `failed`,
    /// `shutdown`, `rejected`) and its message, in the background.
    fn report(&self, task: &str, state: TaskState, message: &str);

    /// Hands a task's new output on; returns how many of `lines` it took (the
    /// rest is offered again later). It may set `cursor.not_before`.
    fn push_logs<'a>(&'a self, task: &'a str, lines: &'a [String], cursor: &'a mut LogCursor) -> BoxFuture<'a, usize>;
}

/// Where a task's output stands on its way to the manager.
#[derive(Default)]
pub(crate) struct LogCursor {
    /// Lines of the ring already handed over (see [`crate::executor::LogRing::since`]).
    pub(crate) seen: u64,
    /// The manager refused output past this node's budget: nothing is sent
    /// before this instant, and what the ring holds meanwhile waits (its newest
    /// lines survive; the oldest give way).
    pub(crate) not_before: Option<tokio::time::Instant>,
}

/// Bytes of output one `PushLogs` request carries (managers take requests of
/// at most 1 MiB from a node).
const PUSH_BYTES: usize = 256 << 10;

/// The real [`Reporter`]: the dispatcher RPCs of the current session.
pub(crate) struct Dispatcher {
    channel: Channel,
    session: watch::Receiver<String>,
}

impl Dispatcher {
    /// Reports over `channel`, in the session whose ID `session` holds.
    pub(crate) fn new(channel: Channel, session: watch::Receiver<String>) -> Self {
        Self { channel, session }
    }
}

impl Reporter for Dispatcher {
    fn report(&self, task: &str, state: TaskState, message: &str) {
        report(self.channel.clone(), self.session.clone(), task.to_owned(), state, message.to_owned());
    }

    fn push_logs<'a>(&'a self, task: &'a str, lines: &'a [String], cursor: &'a mut LogCursor) -> BoxFuture<'a, usize> {
        Box::pin(push_logs(self, task, lines, cursor))
    }
}

/// Sends one task state to the manager, retrying briefly across session changes.
fn report(channel: Channel, mut session: watch::Receiver<String>, task: String, state: TaskState, message: String) {
    tokio::spawn(async move {
        for _ in 0..20 {
            let sid = session.borrow_and_update().clone();
            if !sid.is_empty() {
                let req = UpdateTaskStatusRequest {
                    session_id: sid,
                    updates: vec![TaskStatus {
                        task_id: task.clone(),
                        state: state.into(),
                        message: message.clone(),
                        ..Default::default()
                    }],
                };
                if DispatcherClient::new(channel.clone()).update_task_status(req).await.is_ok() {
                    return;
                }
            }
            tokio::select! {
                _ = session.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        tracing::warn!(task.id = %task, state = state.as_str_name(), "could not report a task state");
    });
}

/// Hands the task's new output to the manager in requests of at most
/// [`PUSH_BYTES`]; returns how many of `lines` it took.
async fn push_logs(d: &Dispatcher, task: &str, lines: &[String], cursor: &mut LogCursor) -> usize {
    if cursor.not_before.is_some_and(|t| tokio::time::Instant::now() < t) {
        return 0;
    }
    cursor.not_before = None;
    let sid = d.session.borrow().clone();
    let mut client = DispatcherClient::new(d.channel.clone());
    let mut taken = 0;
    while taken < lines.len() {
        let mut end = taken;
        let mut bytes = 0;
        while end < lines.len() && end - taken < 1000 && (bytes < PUSH_BYTES || end == taken) {
            bytes += lines[end].len() + 8;
            end += 1;
        }
        let req =
            PushLogsRequest { session_id: sid.clone(), task_id: task.to_owned(), lines: lines[taken..end].to_vec() };
        // Output is best effort: a manager that does not answer must not hold
        // up the task loop, and one that refuses output past this node's
        // budget says when to come back.
        match tokio::time::timeout(Duration::from_secs(5), client.push_logs(req)).await {
            Ok(Ok(_)) => taken = end,
            Ok(Err(s)) if s.code() == tonic::Code::ResourceExhausted => {
                let wait = s
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .map_or(Duration::from_secs(1), Duration::from_millis);
                cursor.not_before = Some(tokio::time::Instant::now() + wait);
                break;
            }
            // Gone (no session, another manager): these lines are dropped.
            _ => return lines.len(),
        }
    }
    taken
}
