//! What a manager assigns, in the worker's own terms. The session converts
//! the wire's `Assignments` here (the edge); the task agent never sees a
//! generated type.

use swarmd_proto::dispatcher as wire;
use zeroize::Zeroizing;

/// A secret version: its ID and version number.
pub type SecretKey = (String, u32);

/// One (possibly chunk-merged) assignment message.
#[derive(Default)]
pub struct Assignment {
    /// The complete set of this node's tasks (anything else stops), or a change.
    pub full: bool,
    /// Tasks to run (or, with `desired_running` false, to stop).
    pub tasks: Vec<WorkTask>,
    /// Tasks to stop.
    pub removed_tasks: Vec<String>,
    /// Secret values delivered for the tasks.
    pub secrets: Vec<(SecretKey, Zeroizing<Vec<u8>>)>,
    /// Secret versions no task of this node needs any more.
    pub removed_secrets: Vec<SecretKey>,
}

/// A task as the worker runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkTask {
    /// Its ID.
    pub id: String,
    /// Its service's name.
    pub service: String,
    /// Whether it should run.
    pub desired_running: bool,
    /// What it runs.
    pub spec: TaskSpec,
}

/// What a task runs. A wire spec that is missing is the empty one (no image:
/// the runtime refuses it, and the task is reported rejected).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskSpec {
    /// Root filesystem directory (a development setting), or the image's
    /// reference when `image_digest` is set.
    pub image: String,
    /// The image's manifest digest; empty for a root filesystem directory.
    pub image_digest: String,
    /// Content trust: `Some` (the signatures the managers vouch for) when
    /// only a signed image may run.
    pub trust: Option<Vec<wire::TrustedSignature>>,
    /// The command and its arguments.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// UID and GID of the workload, if set.
    pub user: Option<(u32, u32)>,
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// Process limit.
    pub pids: Option<i64>,
    /// The host's network namespace.
    pub host_network: bool,
    /// The host's user namespace.
    pub host_userns: bool,
    /// The secrets it references.
    pub secrets: Vec<SecretUse>,
}

/// A task's use of a secret version: where the file goes and how it is owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    /// Which version.
    pub key: SecretKey,
    /// The secret's name (for messages).
    pub name: String,
    /// File name below `/run/secrets`.
    pub target: String,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
}

impl From<wire::Assignments> for Assignment {
    fn from(a: wire::Assignments) -> Self {
        Self {
            full: a.full,
            tasks: a.tasks.into_iter().map(WorkTask::from).collect(),
            removed_tasks: a.removed_tasks,
            secrets: a.secrets.into_iter().map(|s| ((s.id, s.version), Zeroizing::new(s.data.to_vec()))).collect(),
            removed_secrets: a.removed_secrets.into_iter().map(|k| (k.id, k.version)).collect(),
        }
    }
}

impl From<wire::Task> for WorkTask {
    fn from(t: wire::Task) -> Self {
        Self {
            id: t.id,
            service: t.service,
            desired_running: t.desired_running,
            spec: t.spec.map(TaskSpec::from).unwrap_or_default(),
        }
    }
}

impl From<wire::TaskSpec> for TaskSpec {
    fn from(s: wire::TaskSpec) -> Self {
        Self {
            image: s.image,
            image_digest: s.image_digest,
            trust: s.content_trust.then_some(s.trusted_signatures),
            args: s.args,
            env: s.env,
            user: s.has_user.then_some((s.uid, s.gid)),
            memory: (s.memory > 0).then_some(s.memory),
            pids: (s.pids > 0).then_some(s.pids),
            host_network: s.host_network,
            host_userns: s.host_userns,
            secrets: s
                .secrets
                .into_iter()
                .map(|r| SecretUse {
                    key: (r.secret_id, r.version),
                    name: r.name,
                    target: r.target,
                    uid: r.uid,
                    gid: r.gid,
                    mode: r.mode,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_assignments_convert_with_their_defaults() {
        let spec = wire::TaskSpec {
            image: "/img".into(),
            has_user: true,
            uid: 7,
            gid: 8,
            memory: 0,
            pids: 64,
            secrets: vec![wire::TaskSecret {
                secret_id: "s".into(),
                version: 2,
                name: "db".into(),
                target: "pw".into(),
                uid: 1,
                gid: 2,
                mode: 0o400,
            }],
            ..Default::default()
        };
        let a = Assignment::from(wire::Assignments {
            full: true,
            tasks: vec![
                wire::Task { id: "t1".into(), desired_running: true, spec: Some(spec), ..Default::default() },
                wire::Task { id: "t2".into(), desired_running: true, spec: None, ..Default::default() },
            ],
            secrets: vec![wire::SecretValue { id: "s".into(), version: 2, data: bytes::Bytes::from_static(b"v") }],
            removed_secrets: vec![wire::SecretKey { id: "old".into(), version: 1 }],
            ..Default::default()
        });
        let t1 = &a.tasks[0].spec;
        assert_eq!((t1.user, t1.memory, t1.pids), (Some((7, 8)), None, Some(64)));
        assert_eq!(t1.secrets[0].key, ("s".to_string(), 2));
        assert_eq!((t1.secrets[0].target.as_str(), t1.secrets[0].mode), ("pw", 0o400));
        assert_eq!(a.tasks[1].spec, TaskSpec::default(), "a missing spec is the empty one");
        assert_eq!(a.secrets[0].0, ("s".to_string(), 2));
        assert_eq!(a.secrets[0].1.as_slice(), b"v");
        assert_eq!(a.removed_secrets, [("old".to_string(), 1)]);
    }
}
