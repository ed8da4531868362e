//! The services half of the control API: converting what secretctl sends,
//! validating it, and showing services and their tasks.

use swarmd_certs::ServiceId;
use swarmd_proto::control::{CreateServiceRequest, SecretReference, Service, ServiceTask, UpdateServiceRequest};
use tonic::Status;

use crate::services::{
    check_spec, Constraint, Network, SecretRef, ServiceRecord, ServiceSpec, SpecError, TaskState, Userns, MAX_REPLICAS,
    MIN_MEMORY,
};
use crate::state::{Command, StateView};
use crate::store::Store;
use swarmd_certs::now_unix;

use crate::status::internal;

/// A spec error as secretctl's users know it: by the flag that set the value.
pub(crate) fn spec_message(e: &SpecError) -> String {
    match e {
        SpecError::Image(image) => {
            format!("--image {image:?}: give an image loaded into the cluster (NAME[:TAG], NAME@sha256:… or sha256:…)")
        }
        SpecError::NoCommand => "no command: give it after --, e.g. -- sh -c 'cat /run/secrets/db_pass'".into(),
        SpecError::Replicas(n) => format!("--replicas {n}: at most {MAX_REPLICAS}"),
        SpecError::Env(e) => format!("--env {e:?}: expected KEY=VALUE"),
        SpecError::Memory => format!("--memory: at least 4 MiB ({MIN_MEMORY})"),
        SpecError::Pids => "--pids: at least 1".into(),
        SpecError::Target(_) | SpecError::DuplicateTarget(_) | SpecError::Mode { .. } => e.to_string(),
    }
}

/// [`check_spec`], INVALID_ARGUMENT in the words of [`spec_message`].
pub(crate) fn check_spec_status(spec: &ServiceSpec) -> Result<(), Status> {
    check_spec(spec).map_err(|e| Status::invalid_argument(spec_message(&e)))
}

/// A secret reference from the wire, resolved: its source names a secret
/// (and its pinned version exists); unset fields take Swarm's defaults (the
/// secret's name as target, owner 0:0, mode 0444). The target's rule is
/// checked with the rest of the spec ([`check_spec`]).
pub(crate) fn resolve_secret_ref(view: &StateView, r: &SecretReference) -> Result<SecretRef, Status> {
    let bad = |why: String| Status::invalid_argument(format!("secret {:?}: {why}", r.source));
    if r.source.is_empty() {
        return Err(Status::invalid_argument("a secret reference names no secret"));
    }
    let rec = crate::secret_store::find(view, &r.source).map_err(|e| bad(e.message().to_owned()))?;
    if let Some(v) = r.version {
        if !rec.versions.iter().any(|x| x.version == v) {
            return Err(bad(format!("secret {} has no version {v}", rec.name)));
        }
    }
    let target = if r.target.is_empty() { rec.name.clone() } else { r.target.clone() };
    // Checked at admission only (not by the state machine, which must apply
    // the log older versions wrote the same way).
    if target.strip_prefix("/run/secrets/").unwrap_or(&target) == swarmd_certs::workload::IDENTITY_DIR {
        return Err(bad(format!(
            "target {target:?} is reserved: /run/secrets/{} holds the task's workload identity; \
             give the secret another target (,target=NAME)",
            swarmd_certs::workload::IDENTITY_DIR
        )));
    }
    Ok(SecretRef {
        secret: rec.id.clone(),
        target,
        name: rec.name,
        uid: r.uid.unwrap_or(0),
        gid: r.gid.unwrap_or(0),
        mode: r.mode.unwrap_or(0o444),
        pin: r.version,
    })
}

/// A resolved reference as the wire shows it: every field set.
fn secret_ref_to_wire(r: &SecretRef) -> SecretReference {
    SecretReference {
        source: r.name.clone(),
        version: r.pin,
        target: r.target.clone(),
        uid: Some(r.uid),
        gid: Some(r.gid),
        mode: Some(r.mode),
    }
}

fn parse_user(u: &str) -> Result<Option<(u32, u32)>, Status> {
    if u.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument(format!("--user {u:?}: expected UID or UID:GID (numbers)"));
    let (uid, gid) = match u.split_once(':') {
        Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
        None => {
            let a: u32 = u.parse().map_err(|_| bad())?;
            (a, a)
        }
    };
    Ok(Some((uid, gid)))
}

/// The spec a create request describes, or why it is refused.
pub(crate) fn spec_of(view: &StateView, r: &CreateServiceRequest) -> Result<ServiceSpec, Status> {
    if r.privileged {
        return Err(Status::permission_denied(
            "--privileged: privileged containers are not allowed in this cluster (no cluster policy allows them yet)",
        ));
    }
    if !r.cap_add.is_empty() {
        return Err(Status::permission_denied(format!(
            "--cap-add {}: adding capabilities is not allowed in this cluster (no cluster policy allows it yet)",
            r.cap_add.join(",")
        )));
    }
    let network = match r.network.as_str() {
        "" | "none" => Network::None,
        "host" => Network::Host,
        n => return Err(Status::invalid_argument(format!("--network {n:?}: use none or host"))),
    };
    let userns = match r.userns.as_str() {
        "" | "private" => Userns::Private,
        "host" => Userns::Host,
        u => return Err(Status::invalid_argument(format!("--userns {u:?}: use host (or private, the default)"))),
    };
    let secrets = r.secrets.iter().map(|s| resolve_secret_ref(view, s)).collect::<Result<Vec<_>, _>>()?;
    let constraints = r
        .constraints
        .iter()
        .map(|c| c.parse::<Constraint>().map_err(Status::invalid_argument))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = ServiceSpec {
        image: pin_image(view, &r.image)?,
        args: r.args.clone(),
        env: r.env.clone(),
        user: parse_user(&r.user)?,
        secrets,
        replicas: r.replicas,
        constraints,
        memory: (r.memory > 0).then_some(r.memory),
        pids: (r.pids > 0).then_some(r.pids),
        network,
        userns,
    };
    check_spec_status(&spec)?;
    Ok(spec)
}

/// What a service stores for the image reference `reference`: pinned to the
/// manifest digest the cluster has for it now (`NAME[:TAG]@sha256:…`, or
/// the digest alone when it was given alone), so that every task of this
/// version runs the same bytes whatever the name points to later. A host
/// directory (an absolute path) is kept as it is: the state machine decides
/// whether the cluster allows it.
pub(crate) fn pin_image(view: &StateView, reference: &str) -> Result<String, Status> {
    if reference.is_empty() {
        return Err(Status::invalid_argument("--image: give an image (NAME[:TAG], NAME@sha256:… or sha256:…)"));
    }
    if reference.starts_with('/') {
        return Ok(reference.to_owned());
    }
    if reference.len() > 300 {
        return Err(Status::invalid_argument("--image: a reference longer than 300 bytes"));
    }
    let Some(image) = view.resolve_image(reference).map_err(internal)? else {
        return Err(Status::invalid_argument(format!(
            "--image {reference:?}: no such image in this cluster (`secretctl image ls` lists them; \
             `secretctl image load` adds one)"
        )));
    };
    Ok(match reference.rsplit_once('@') {
        Some((name, _)) => format!("{}@{}", crate::state::normalize_image_name(name), image.digest),
        None if reference.starts_with("sha256:") => image.digest,
        None => format!("{}@{}", crate::state::normalize_image_name(reference), image.digest),
    })
}

/// The service `key` names: ID, name or unique ID prefix.
pub fn find(view: &StateView, key: &str) -> Result<ServiceRecord, Status> {
    crate::secret_store::resolve(
        "service",
        key,
        |k| match k.parse::<ServiceId>() {
            Ok(id) => view.service(&id),
            Err(_) => Ok(None),
        },
        |k| match view.service_id_by_name(k)? {
            Some(id) => view.service(&id),
            None => Ok(None),
        },
        || view.services(),
        |s| s.id.as_str(),
    )
}

/// Tasks running per service, counted in one pass over the tasks.
pub(crate) fn running_counts(view: &StateView) -> std::collections::HashMap<ServiceId, u32> {
    let mut m = std::collections::HashMap::new();
    for t in view.tasks().unwrap_or_default() {
        if t.desired_running && t.state == TaskState::Running {
            *m.entry(t.service).or_insert(0) += 1;
        }
    }
    m
}

/// The wire form of a service with `running` tasks.
pub(crate) fn to_wire(s: ServiceRecord, running: u32) -> Service {
    Service {
        id: s.id.to_string(),
        name: s.name,
        image_digest: crate::state::pinned_digest(&s.spec.image).unwrap_or_default().to_owned(),
        image: s.spec.image,
        args: s.spec.args,
        env: s.spec.env,
        user: s.spec.user.map(|(u, g)| format!("{u}:{g}")).unwrap_or_default(),
        secrets: s.spec.secrets.iter().map(secret_ref_to_wire).collect(),
        replicas: s.spec.replicas,
        constraints: s.spec.constraints.iter().map(|c| c.to_string()).collect(),
        memory: s.spec.memory.unwrap_or(0),
        pids: s.spec.pids.unwrap_or(0),
        network: match s.spec.network {
            Network::None => "none".into(),
            Network::Host => "host".into(),
        },
        userns: match s.spec.userns {
            Userns::Private => "private".into(),
            Userns::Host => "host".into(),
        },
        version: s.version,
        created_at: s.created_at,
        updated_at: s.updated_at,
        running,
    }
}

/// Creates a service.
pub(crate) async fn create(store: &Store, r: CreateServiceRequest) -> Result<Service, Status> {
    let (name, spec) = crate::validate::validate_create_service(store.view(), &r)?;
    let now = now_unix();
    let rec = ServiceRecord { id: ServiceId::random(), name, spec, version: 1, created_at: now, updated_at: now };
    let id = rec.id.clone();
    store.propose(Command::CreateService(Box::new(rec))).await?;
    tracing::info!(service.id = %id, service.name = %r.name, "service created");
    let s = store.view().service(&id).map_err(internal)?.ok_or_else(|| Status::not_found("service was removed"))?;
    Ok(to_wire(s, 0))
}

/// Adds or removes secret references, or changes the replica count.
pub(crate) async fn update(store: &Store, r: UpdateServiceRequest) -> Result<Service, Status> {
    let (cur, spec) = crate::validate::validate_update_service(store.view(), &r)?;
    let cmd = Command::UpdateService {
        id: cur.id.clone(),
        spec: Box::new(spec),
        expected_version: cur.version,
        at: now_unix(),
    };
    store.propose(cmd).await?;
    tracing::info!(service.id = %cur.id, service.name = %cur.name, "service updated");
    let s = store.view().service(&cur.id).map_err(internal)?.ok_or_else(|| Status::not_found("service was removed"))?;
    let running = running_counts(store.view()).get(&s.id).copied().unwrap_or(0);
    Ok(to_wire(s, running))
}

/// The service's tasks, newest first within each slot.
pub fn tasks(view: &StateView, key: &str) -> Result<Vec<ServiceTask>, Status> {
    let svc = find(view, key)?;
    let mut ts: Vec<_> = view.tasks().map_err(internal)?.into_iter().filter(|t| t.service == svc.id).collect();
    ts.sort_by(|a, b| a.slot.cmp(&b.slot).then(b.created_at.cmp(&a.created_at)));
    Ok(ts
        .into_iter()
        .map(|t| {
            let hostname = view.node(&t.node).ok().flatten().map(|n| n.hostname).unwrap_or_default();
            ServiceTask {
                id: t.id.to_string(),
                service: svc.name.clone(),
                slot: t.slot,
                node_id: t.node.to_string(),
                node_hostname: hostname,
                desired: if t.desired_running { "running".into() } else { "shutdown".into() },
                state: t.state.to_string(),
                message: t.message,
                created_at: t.created_at,
                updated_at: t.updated_at,
            }
        })
        .collect())
}
