//! Validation of every `Control` request, as functions of the request and a
//! read-only view of the state: no sealing, no proposal, no network. The RPC
//! handlers (`control`, `secret_store`, `service_api`) call these before they
//! do any of that, and the `control_requests` fuzz target calls them directly
//! with arbitrary requests.
//!
//! Requests not listed here carry nothing to validate (`ListNodes`, `Info`,
//! `RotateDataKey`, `VerifySecrets`, `ListAdminCertificates`,
//! `UpdateCluster`, `GetUnlockKey`), or only name an object, resolved by
//! [`find_node`], [`crate::secret_store::find`] or [`crate::service_api::find`].

use std::collections::BTreeMap;

use swarmd_certs::{CertValidity, NodeId, Role};
use swarmd_proto::control::{
    CreateSecretRequest, CreateServiceRequest, GetJoinTokenRequest, IssueAdminCertificateRequest, RemoveNodeRequest,
    RevokeAdminCertificateRequest, UpdateNodeRequest, UpdateSecretRequest, UpdateServiceRequest,
};
use tonic::Status;

use crate::services::{check_service_name, ServiceRecord, ServiceSpec};
use crate::state::{
    check_label, check_secret_name, check_secret_size, check_serial, Availability, Command, NodeRecord, NodeStatus,
    SecretRecord, StateView,
};

/// Longest life of an admin certificate.
pub const MAX_ADMIN_CERT: std::time::Duration = std::time::Duration::from_secs(30 * 86400);

use crate::status::internal;

/// The node `key` names: its ID, a unique ID prefix or its hostname.
/// INVALID_ARGUMENT if empty or ambiguous, NOT_FOUND if nothing matches.
pub fn find_node(view: &StateView, key: &str) -> Result<NodeRecord, Status> {
    let key = key.trim();
    if key.is_empty() {
        return Err(Status::invalid_argument("node ID must not be empty"));
    }
    if let Ok(id) = key.parse::<NodeId>() {
        if let Some(n) = view.node(&id).map_err(internal)? {
            return Ok(n);
        }
    }
    let mut matches: Vec<_> = view
        .nodes()
        .map_err(internal)?
        .into_iter()
        .filter(|n| n.id.as_str().starts_with(key) || n.hostname == key)
        .collect();
    match matches.len() {
        0 => Err(Status::not_found(format!("no node {key:?}"))),
        1 => Ok(matches.remove(0)),
        k => Err(Status::invalid_argument(format!("{key:?} matches {k} nodes; give more of the ID"))),
    }
}

/// A secret to create: its name and labels. INVALID_ARGUMENT for a bad name,
/// size or label; ALREADY_EXISTS for a name in use.
pub fn validate_create_secret(
    view: &StateView,
    req: &CreateSecretRequest,
) -> Result<(String, BTreeMap<String, String>), Status> {
    check_secret_name(&req.name).map_err(Status::invalid_argument)?;
    check_secret_size(req.data.len()).map_err(Status::invalid_argument)?;
    for (k, v) in &req.labels {
        check_label(k, v).map_err(Status::invalid_argument)?;
    }
    if let Some(id) = view.secret_id_by_name(&req.name).map_err(internal)? {
        return Err(Status::already_exists(format!("secret name {:?} is already in use by secret {id}", req.name)));
    }
    Ok((req.name.clone(), req.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
}

/// The secret a new version goes to. INVALID_ARGUMENT for a bad size;
/// NOT_FOUND / INVALID_ARGUMENT as [`crate::secret_store::find`].
pub fn validate_update_secret(view: &StateView, req: &UpdateSecretRequest) -> Result<SecretRecord, Status> {
    check_secret_size(req.data.len()).map_err(Status::invalid_argument)?;
    crate::secret_store::find(view, &req.name_or_id)
}

/// The node and the change an update request makes. INVALID_ARGUMENT for a
/// bad availability or label key.
pub fn validate_update_node(view: &StateView, req: &UpdateNodeRequest) -> Result<Command, Status> {
    let n = find_node(view, &req.id_or_prefix)?;
    let availability = match req.availability.as_str() {
        "" => None,
        a => Some(a.parse::<Availability>().map_err(Status::invalid_argument)?),
    };
    for (k, v) in &req.labels_add {
        check_label(k, v).map_err(Status::invalid_argument)?;
    }
    Ok(Command::UpdateNode {
        node: n.id,
        availability,
        labels_add: req.labels_add.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        labels_rm: req.labels_rm.clone(),
    })
}

/// The worker to promote. FAILED_PRECONDITION if it is already a manager.
pub fn validate_promote(view: &StateView, key: &str) -> Result<NodeRecord, Status> {
    let n = find_node(view, key)?;
    if n.role == Role::Manager {
        return Err(Status::failed_precondition(format!("node {} is already a manager", n.id)));
    }
    Ok(n)
}

/// The manager to demote (quorum is checked on the leader, against raft).
/// FAILED_PRECONDITION if it is not a manager.
pub fn validate_demote(view: &StateView, key: &str) -> Result<NodeRecord, Status> {
    let n = find_node(view, key)?;
    if n.role != Role::Manager {
        return Err(Status::failed_precondition(format!("node {} is not a manager", n.id)));
    }
    Ok(n)
}

/// The node to remove. FAILED_PRECONDITION for a manager that is a raft
/// member, or a ready node without `force`.
///
/// `raft_members` are the raft IDs of raft's current membership, voters and
/// learners: a manager whose join never reached raft (a raft ID recorded, no
/// membership) can be removed like any node that is not ready.
pub fn validate_remove_node(
    view: &StateView,
    req: &RemoveNodeRequest,
    raft_members: &std::collections::BTreeSet<u64>,
) -> Result<NodeRecord, Status> {
    let n = find_node(view, &req.id_or_prefix)?;
    if n.role == Role::Manager && n.raft_id.is_some_and(|r| raft_members.contains(&r)) {
        return Err(Status::failed_precondition(format!(
            "node {} is a manager and a raft member: demote it first (secretctl node demote {})",
            n.id, n.id
        )));
    }
    if n.status == NodeStatus::Ready && !req.force {
        return Err(Status::failed_precondition(format!(
            "node {} is ready: stop it first, or remove it anyway with --force",
            n.id
        )));
    }
    Ok(n)
}

/// The lifetime of an admin certificate: `default` (the cluster's) for 0.
/// INVALID_ARGUMENT below 30 s or above [`MAX_ADMIN_CERT`]. (The CSR is
/// checked as it is signed, by [`swarmd_certs::RootCa::sign_node`].)
pub fn validate_issue_admin_certificate(
    req: &IssueAdminCertificateRequest,
    default: CertValidity,
) -> Result<CertValidity, Status> {
    match req.validity_secs {
        0 => Ok(default),
        secs if secs > MAX_ADMIN_CERT.as_secs() => Err(Status::invalid_argument(format!(
            "admin certificates live at most {} days",
            MAX_ADMIN_CERT.as_secs() / 86400
        ))),
        secs => CertValidity::new(std::time::Duration::from_secs(secs)).map_err(Status::invalid_argument),
    }
}

/// The serial to revoke, normalized. INVALID_ARGUMENT if malformed.
pub fn validate_revoke_admin_certificate(req: &RevokeAdminCertificateRequest) -> Result<String, Status> {
    let serial = req.serial.trim().to_ascii_lowercase();
    check_serial(&serial).map_err(Status::invalid_argument)?;
    Ok(serial)
}

/// The role whose join token is asked for. INVALID_ARGUMENT for an unknown
/// role, and for admin (there is no admin join token).
pub fn validate_get_join_token(req: &GetJoinTokenRequest) -> Result<Role, Status> {
    let role: Role = req.role.parse().map_err(|e: swarmd_certs::IdError| Status::invalid_argument(e.to_string()))?;
    if role == Role::Admin {
        return Err(Status::invalid_argument("there is no admin join token"));
    }
    Ok(role)
}

/// A secretctl from before structured secret references sends them as text in
/// a retired field: refused by name, rather than served without its secrets.
fn refuse_retired_secret_text(text: &[String]) -> Result<(), Status> {
    if text.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "secret references sent as text by an older secretctl: upgrade secretctl to this manager's version",
        ))
    }
}

/// The name and spec of a service to create. INVALID_ARGUMENT for a bad name
/// or spec, PERMISSION_DENIED for privileges, ALREADY_EXISTS for a name in use.
pub fn validate_create_service(view: &StateView, req: &CreateServiceRequest) -> Result<(String, ServiceSpec), Status> {
    refuse_retired_secret_text(&req.retired_secrets_text)?;
    check_service_name(&req.name).map_err(Status::invalid_argument)?;
    if let Some(id) = view.service_id_by_name(&req.name).map_err(internal)? {
        return Err(Status::already_exists(format!("service name {:?} is already in use by service {id}", req.name)));
    }
    Ok((req.name.clone(), crate::service_api::spec_of(view, req)?))
}

/// The service an update changes, and its new spec. INVALID_ARGUMENT for a
/// reference it does not have, a bad reference or a bad spec.
pub fn validate_update_service(
    view: &StateView,
    req: &UpdateServiceRequest,
) -> Result<(ServiceRecord, ServiceSpec), Status> {
    refuse_retired_secret_text(&req.retired_secret_add_text)?;
    let cur = crate::service_api::find(view, &req.name_or_id)?;
    let mut spec = cur.spec.clone();
    for rm in &req.secret_rm {
        let before = spec.secrets.len();
        spec.secrets.retain(|s| s.name != *rm && s.secret.as_str() != rm && s.target != *rm);
        if spec.secrets.len() == before {
            return Err(Status::invalid_argument(format!("--secret-rm {rm:?}: the service does not use it")));
        }
    }
    for add in &req.secret_add {
        let new = crate::service_api::resolve_secret_ref(view, add)?;
        spec.secrets.retain(|s| s.secret != new.secret);
        spec.secrets.push(new);
    }
    if let Some(n) = req.replicas {
        spec.replicas = n;
    }
    if let Some(image) = &req.image {
        spec.image = crate::service_api::pin_image(view, image)?;
    }
    crate::service_api::check_spec_status(&spec)?;
    Ok((cur, spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{empty, initialised};

    #[test]
    fn secret_references_as_text_from_an_older_secretctl_are_refused_by_name() {
        let (view, _) = initialised();
        let create = CreateServiceRequest {
            name: "web".into(),
            image: "/img".into(),
            args: vec!["true".into()],
            replicas: 1,
            retired_secrets_text: vec!["db_pass".into()],
            ..Default::default()
        };
        let e = validate_create_service(&view, &create).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("upgrade secretctl"), "{}", e.message());
        let update = UpdateServiceRequest {
            name_or_id: "web".into(),
            retired_secret_add_text: vec!["db_pass".into()],
            ..Default::default()
        };
        let e = validate_update_service(&empty(), &update).unwrap_err();
        assert!(e.message().contains("upgrade secretctl"), "{}", e.message());
    }
}
