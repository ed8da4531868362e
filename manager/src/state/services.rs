//! Services in the replicated state: what a service asks for, the rules a
//! spec obeys, and the commands that create, update and remove services.
//! Their tasks are in [`super::tasks`].
//!
//! | key                  | value |
//! |----------------------|-------|
//! | `service/<id>`       | [`ServiceRecord`] |
//! | `servicename/<name>` | the service's ID: names are unique |

use std::fmt;

use serde::{Deserialize, Serialize};
use swarmd_certs::{SecretId, ServiceId};

use super::tasks::put_task;
use super::{
    check_secret_name, encode, Command, Missing, NodeRecord, ObjectKind, Rejection, StateError, StateView, WriteBatch,
};

/// How a task sees one secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    /// The secret.
    pub secret: SecretId,
    /// Its name when the reference was made (for display).
    pub name: String,
    /// File name below `/run/secrets`.
    pub target: String,
    /// Owner, group and mode of the file.
    pub uid: u32,
    /// Group of the file.
    pub gid: u32,
    /// Mode of the file.
    pub mode: u32,
    /// A fixed version (`SRC@N`), or `None` to follow updates.
    pub pin: Option<u32>,
}

/// What a constraint compares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConstraintKey {
    /// `node.id`
    NodeId,
    /// `node.hostname`
    Hostname,
    /// `node.role`
    Role,
    /// `node.labels.K`
    Label(String),
}

/// A placement constraint: `KEY==VALUE` or `KEY!=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// What is compared.
    pub key: ConstraintKey,
    /// `==` (true) or `!=` (false).
    pub equal: bool,
    /// The value.
    pub value: String,
}

impl std::str::FromStr for Constraint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid constraint {s:?}: use node.id|node.hostname|node.role|node.labels.KEY, then == or !=, then a value"
            )
        };
        let (k, equal, v) = if let Some((k, v)) = s.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = s.split_once("!=") {
            (k, false, v)
        } else {
            return Err(bad());
        };
        let (k, v) = (k.trim(), v.trim());
        let key = match k {
            "node.id" => ConstraintKey::NodeId,
            "node.hostname" => ConstraintKey::Hostname,
            "node.role" => ConstraintKey::Role,
            _ => match k.strip_prefix("node.labels.") {
                Some(l) if !l.is_empty() => ConstraintKey::Label(l.to_owned()),
                _ => return Err(bad()),
            },
        };
        if v.is_empty() {
            return Err(bad());
        }
        Ok(Constraint { key, equal, value: v.to_owned() })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match &self.key {
            ConstraintKey::NodeId => "node.id".to_string(),
            ConstraintKey::Hostname => "node.hostname".into(),
            ConstraintKey::Role => "node.role".into(),
            ConstraintKey::Label(l) => format!("node.labels.{l}"),
        };
        write!(f, "{k}{}{}", if self.equal { "==" } else { "!=" }, self.value)
    }
}

impl Constraint {
    /// Whether `node` satisfies it.
    pub fn matches(&self, node: &NodeRecord) -> bool {
        let have = match &self.key {
            ConstraintKey::NodeId => Some(node.id.to_string()),
            ConstraintKey::Hostname => Some(node.hostname.clone()),
            ConstraintKey::Role => Some(node.role.to_string()),
            ConstraintKey::Label(l) => node.labels.get(l).cloned(),
        };
        (have.as_deref() == Some(self.value.as_str())) == self.equal
    }
}

/// The container network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// A private network namespace with loopback only.
    #[default]
    None,
    /// The host's network.
    Host,
}

/// Whose user IDs a service's tasks run with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Userns {
    /// A user namespace per task, with a block of host IDs of its own (the default).
    #[default]
    Private,
    /// The host's (`--userns host`): the task's uid N is host uid N, shared
    /// with any host process of that uid.
    Host,
}

/// What a service runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Root filesystem directory on the workers.
    pub image: String,
    /// Command and arguments.
    pub args: Vec<String>,
    /// `K=V` entries.
    pub env: Vec<String>,
    /// User and group (default 65534:65534).
    pub user: Option<(u32, u32)>,
    /// Secrets, by reference.
    pub secrets: Vec<SecretRef>,
    /// Replicas wanted.
    pub replicas: u32,
    /// Placement constraints, all of which must hold.
    pub constraints: Vec<Constraint>,
    /// Memory limit, bytes.
    pub memory: Option<i64>,
    /// Process limit.
    pub pids: Option<i64>,
    /// Network.
    pub network: Network,
    /// User namespace.
    pub userns: Userns,
}

/// A service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Its ID.
    pub id: ServiceId,
    /// Its unique name.
    pub name: String,
    /// What it runs.
    pub spec: ServiceSpec,
    /// Bumped by every update; tasks of an older version are replaced.
    pub version: u64,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// Last update, unix seconds.
    pub updated_at: i64,
}

const SERVICE_PREFIX: &str = "service/";
const SERVICE_NAME_PREFIX: &str = "servicename/";

pub(crate) fn service_key(id: &ServiceId) -> Vec<u8> {
    format!("{SERVICE_PREFIX}{id}").into_bytes()
}
fn service_name_key(name: &str) -> Vec<u8> {
    format!("{SERVICE_NAME_PREFIX}{name}").into_bytes()
}

/// Most replicas a service may ask for.
pub const MAX_REPLICAS: u32 = 1000;
/// Smallest memory limit, bytes.
pub const MIN_MEMORY: i64 = 4 << 20;

/// Why a spec breaks its own rules. The texts name no command-line flag: the
/// control API phrases them for its users (see `service_api::spec_message`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SpecError {
    /// The image is neither pinned to a digest nor an absolute path.
    #[error("image {0:?}: an image digest (NAME@sha256:…) or the absolute path of a root filesystem on the workers")]
    Image(String),
    /// No command to run.
    #[error("no command to run")]
    NoCommand,
    /// More than [`MAX_REPLICAS`].
    #[error("{0} replicas: at most {MAX_REPLICAS}")]
    Replicas(u32),
    /// An environment entry that is not `KEY=VALUE`.
    #[error("environment entry {0:?}: expected KEY=VALUE")]
    Env(String),
    /// A memory limit below [`MIN_MEMORY`].
    #[error("memory limit: at least 4 MiB ({MIN_MEMORY})")]
    Memory,
    /// A process limit below 1.
    #[error("process limit: at least 1")]
    Pids,
    /// A secret target that is not a file name ([`check_target`]'s message).
    #[error("{0}")]
    Target(String),
    /// Two secrets with the same target.
    #[error("two secrets would both be /run/secrets/{0}")]
    DuplicateTarget(String),
    /// A secret file mode beyond 0777.
    #[error("secret {name}: mode {mode:o} is not a permission mode")]
    Mode { name: String, mode: u32 },
}

/// Checks a spec's own rules (not the references to secrets).
pub fn check_spec(spec: &ServiceSpec) -> Result<(), SpecError> {
    let pinned = super::images::pinned_digest(&spec.image).is_some();
    if spec.image.len() > 512 || !(pinned || spec.image.starts_with('/')) {
        return Err(SpecError::Image(spec.image.clone()));
    }
    // An image brings its own command (its entrypoint and cmd); a directory does not.
    if spec.args.is_empty() && !pinned {
        return Err(SpecError::NoCommand);
    }
    if spec.replicas > MAX_REPLICAS {
        return Err(SpecError::Replicas(spec.replicas));
    }
    for e in &spec.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(SpecError::Env(e.clone()));
        }
    }
    if spec.memory.is_some_and(|m| m < MIN_MEMORY) {
        return Err(SpecError::Memory);
    }
    if spec.pids.is_some_and(|p| p < 1) {
        return Err(SpecError::Pids);
    }
    let mut targets = std::collections::HashSet::new();
    for r in &spec.secrets {
        check_target(&r.target).map_err(SpecError::Target)?;
        if !targets.insert(r.target.clone()) {
            return Err(SpecError::DuplicateTarget(r.target.clone()));
        }
        if r.mode > 0o777 {
            return Err(SpecError::Mode { name: r.name.clone(), mode: r.mode });
        }
    }
    Ok(())
}

/// A secret's file name below `/run/secrets`.
pub fn check_target(t: &str) -> Result<(), String> {
    if swarmd_certs::is_secret_file_name(t) {
        Ok(())
    } else {
        Err(format!("invalid secret target {t:?}: use a file name (it appears as /run/secrets/<name>)"))
    }
}

/// Service names follow the secret name rules.
pub fn check_service_name(name: &str) -> Result<(), String> {
    check_secret_name(name).map_err(|e| e.replace("secret name", "service name"))
}

impl StateView {
    /// One service.
    pub fn service(&self, id: &ServiceId) -> Result<Option<ServiceRecord>, StateError> {
        self.get(&service_key(id))
    }

    /// The ID of the service named `name`.
    pub fn service_id_by_name(&self, name: &str) -> Result<Option<ServiceId>, StateError> {
        self.get(&service_name_key(name))
    }

    /// All services, by ID.
    pub fn services(&self) -> Result<Vec<ServiceRecord>, StateError> {
        self.scan(SERVICE_PREFIX)
    }

    /// Names of the services that reference `secret`.
    pub fn services_using(&self, secret: &SecretId) -> Result<Vec<String>, StateError> {
        Ok(self
            .services()?
            .into_iter()
            .filter(|s| s.spec.secrets.iter().any(|r| r.secret == *secret))
            .map(|s| s.name)
            .collect())
    }
}

/// Checks that every secret a spec references exists.
fn check_references(view: &StateView, spec: &ServiceSpec) -> Result<Result<(), Rejection>, StateError> {
    for r in &spec.secrets {
        match view.secret(&r.secret)? {
            None => return Ok(Err(Missing::SecretRef { name: r.name.clone(), id: r.secret.clone() }.into())),
            Some(s) => {
                if let Some(v) = r.pin {
                    if !s.versions.iter().any(|x| x.version == v) {
                        return Ok(Err(Missing::SecretVersion { name: s.name, version: v }.into()));
                    }
                }
            }
        }
    }
    Ok(Ok(()))
}

/// The service commands of [`super::plan`]: `CreateService`,
/// `UpdateService`, `RemoveService`.
pub(super) fn plan_services(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    let mut batch = WriteBatch::default();
    match cmd {
        Command::CreateService(rec) => {
            if let Err(why) = check_service_name(&rec.name) {
                return Ok(Err(Rejection::Invalid(why)));
            }
            if let Err(e) = check_spec(&rec.spec) {
                return Ok(Err(Rejection::InvalidSpec(e)));
            }
            if let Some(other) = view.service_id_by_name(&rec.name)? {
                let (name, holder) = (rec.name.clone(), other.to_string());
                return Ok(Err(Rejection::NameInUse { kind: ObjectKind::Service, name, holder }));
            }
            if view.service(&rec.id)?.is_some() {
                return Ok(Err(Rejection::IdInUse { kind: ObjectKind::Service, id: rec.id.to_string() }));
            }
            if let Err(r) = check_references(view, &rec.spec)? {
                return Ok(Err(r));
            }
            if let Err(r) = view.check_service_image(&rec.spec.image)? {
                return Ok(Err(r));
            }
            batch.insert(service_key(&rec.id), encode(rec.as_ref()));
            batch.insert(service_name_key(&rec.name), encode(&rec.id));
        }
        Command::UpdateService { id, spec, expected_version, at } => {
            let Some(mut rec) = view.service(id)? else {
                return Ok(Err(Missing::Service(id.clone()).into()));
            };
            if rec.version != *expected_version {
                return Ok(Err(Rejection::ServiceUpdatedMeanwhile { name: rec.name }));
            }
            if let Err(e) = check_spec(spec) {
                return Ok(Err(Rejection::InvalidSpec(e)));
            }
            if let Err(r) = check_references(view, spec)? {
                return Ok(Err(r));
            }
            // A service that ran a host directory before it was disallowed keeps it.
            if spec.image != rec.spec.image {
                if let Err(r) = view.check_service_image(&spec.image)? {
                    return Ok(Err(r));
                }
            }
            // A change of replicas alone keeps the running tasks.
            let mut same_but_replicas = rec.spec.clone();
            same_but_replicas.replicas = spec.replicas;
            if same_but_replicas != **spec {
                rec.version += 1;
            }
            rec.spec = (**spec).clone();
            rec.updated_at = *at;
            batch.insert(service_key(id), encode(&rec));
        }
        Command::RemoveService { id } => {
            let Some(rec) = view.service(id)? else {
                return Ok(Err(Missing::Service(id.clone()).into()));
            };
            batch.remove(service_key(id));
            batch.remove(service_name_key(&rec.name));
            for mut t in view.tasks()?.into_iter().filter(|t| t.service == *id && t.desired_running) {
                t.desired_running = false;
                put_task(&mut batch, &t);
            }
        }
        _ => unreachable!("not a service command"),
    }
    Ok(Ok(batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_and_match() {
        let c: Constraint = "node.labels.zone==eu".parse().unwrap();
        assert_eq!(c.to_string(), "node.labels.zone==eu");
        let n: Constraint = "node.role != manager".parse().unwrap();
        assert!(!n.equal);
        for bad in ["node.labels.==x", "zone==eu", "node.id=x", "node.id==", "node.cpu==4"] {
            assert!(bad.parse::<Constraint>().is_err(), "{bad:?}");
        }
    }
}
