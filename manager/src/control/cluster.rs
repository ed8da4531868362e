//! Control RPCs on the cluster: the root CA, data key rotation, autolock and
//! its unlock key, join tokens, this manager's raft view.

use swarmd_certs::{JoinToken, NodeId, Role};
use swarmd_proto::control::{
    CaInfo, GetCaRequest, GetJoinTokenRequest, GetJoinTokenResponse, InfoRequest, InfoResponse, RotateCaRequest,
};
use tonic::{Request, Response, Status};

use crate::external_ca::ExternalCa;
use crate::keys::{purpose, UnlockKey};
use crate::state::{Command, ExternalCaRecord};
use swarmd_proto::control::{
    GetUnlockKeyRequest, GetUnlockKeyResponse, RotateDataKeyRequest, RotateDataKeyResponse, UpdateClusterRequest,
    UpdateClusterResponse,
};

use crate::validate;

use super::{internal, ControlService};

/// Administrator only. The root CA this manager's replicated state holds
/// (public: the certificate, never its key), and the rotation in progress.
pub(super) async fn get_ca(ctl: &ControlService, _req: Request<GetCaRequest>) -> Result<Response<CaInfo>, Status> {
    Ok(Response::new(crate::ca_rotation::describe(ctl.store.view()).map_err(internal)?))
}

/// Administrator only. Starts a root rotation toward the given root, or a
/// generated one; INVALID_ARGUMENT for a root that is not a usable CA.
pub(super) async fn rotate_ca(ctl: &ControlService, req: Request<RotateCaRequest>) -> Result<Response<CaInfo>, Status> {
    let req = req.into_inner();
    let given = match (req.cert_pem.is_empty(), req.key_pem.is_empty()) {
        (true, true) => None,
        (false, false) => Some((req.cert_pem, zeroize::Zeroizing::new(req.key_pem))),
        _ => return Err(Status::invalid_argument("give both the new root's certificate and its key, or neither")),
    };
    crate::ca_rotation::start(&ctl.store, &ctl.secrets, given).await?;
    Ok(Response::new(crate::ca_rotation::describe(ctl.store.view()).map_err(internal)?))
}

/// Administrator only. Runs on the leader (forwarded there).
pub(super) async fn rotate_data_key(
    ctl: &ControlService,
    _req: Request<RotateDataKeyRequest>,
) -> Result<Response<RotateDataKeyResponse>, Status> {
    if let Some(mut leader) = ctl.leader_client()? {
        let mut fwd = Request::new(RotateDataKeyRequest {});
        fwd.set_timeout(std::time::Duration::from_secs(600));
        return leader.rotate_data_key(fwd).await;
    }
    let _one = ctl.rotating.try_lock().map_err(|_| Status::aborted("a data key rotation is already running"))?;
    let r = crate::rotation::rotate(&ctl.store, &ctl.secrets, &ctl.peers).await?;
    Ok(Response::new(RotateDataKeyResponse {
        key_id: r.key_id,
        resealed: r.resealed as u64,
        retired_below: r.retired_below,
    }))
}

/// Administrator only. FAILED_PRECONDITION while autolock is off.
pub(super) async fn get_unlock_key(
    ctl: &ControlService,
    req: Request<GetUnlockKeyRequest>,
) -> Result<Response<GetUnlockKeyResponse>, Status> {
    let record = ctl.secrets.record()?;
    let cid = record.id.to_string();
    let Some(sealed) = record.unlock_key else {
        return Err(Status::failed_precondition(
            "autolock is off: turn it on with secretctl cluster update --autolock=true",
        ));
    };
    let key = if req.get_ref().rotate {
        let fresh = UnlockKey::generate();
        let sealed = ctl.secrets.seal(&purpose::unlock_key(&cid), fresh.expose())?;
        ctl.store.propose(Command::SetAutolock { unlock_key: Some(sealed) }).await?;
        tracing::info!("unlock key rotated");
        fresh
    } else {
        let raw = ctl.secrets.open(&purpose::unlock_key(&cid), &sealed).map_err(internal)?;
        UnlockKey::from_bytes(&raw).ok_or_else(|| Status::internal("the stored unlock key is malformed"))?
    };
    Ok(Response::new(GetUnlockKeyResponse { key: key.text().to_string() }))
}

/// Administrator only. Turning autolock on returns the new unlock key.
/// INVALID_ARGUMENT (nothing changed) for a workload identity lifetime
/// outside 30 s to 30 days.
pub(super) async fn update_cluster(
    ctl: &ControlService,
    req: Request<UpdateClusterRequest>,
) -> Result<Response<UpdateClusterResponse>, Status> {
    let record = ctl.secrets.record()?;
    let mut out = UpdateClusterResponse::default();
    if let Some(ext) = &req.get_ref().external_ca {
        update_external_ca(ctl, ext).await?;
    }
    // Checked before anything is written, so a bad value changes nothing.
    let identity_ttl = req
        .get_ref()
        .identity_ttl_secs
        .map(|s| swarmd_certs::workload::IdentityTtl::from_secs(s).map_err(Status::invalid_argument))
        .transpose()?;
    if let Some(mode) = &req.get_ref().content_trust {
        let required = match mode.as_str() {
            "required" => true,
            "off" => false,
            m => return Err(Status::invalid_argument(format!("--content-trust {m:?}: required or off"))),
        };
        ctl.store.propose(Command::SetContentTrust { required }).await?;
        tracing::warn!(required, "content trust changed");
    }
    if let Some(allowed) = req.get_ref().allow_host_rootfs {
        ctl.store.propose(Command::SetHostRootfs { allowed }).await?;
        tracing::warn!(allowed, "services running host directories as images: setting changed");
    }
    if let Some(secs) = req.get_ref().cert_recovery_window_secs {
        ctl.store.propose(Command::SetCertRecoveryWindow { secs }).await?;
        tracing::info!(secs, "certificate recovery window changed");
    }
    match req.get_ref().autolock {
        None => {}
        Some(true) if record.unlock_key.is_some() => {}
        Some(true) => {
            let key = UnlockKey::generate();
            let sealed = ctl.secrets.seal(&purpose::unlock_key(record.id.as_str()), key.expose())?;
            ctl.store.propose(Command::SetAutolock { unlock_key: Some(sealed) }).await?;
            tracing::info!("autolock turned on");
            out.unlock_key = key.text().to_string();
        }
        Some(false) if record.unlock_key.is_some() => {
            ctl.store.propose(Command::SetAutolock { unlock_key: None }).await?;
            tracing::info!("autolock turned off");
        }
        Some(false) => {}
    }
    if let Some(ttl) = identity_ttl {
        ctl.store.propose(Command::SetIdentityTtl { secs: ttl.duration().as_secs() }).await?;
        tracing::info!(%ttl, "workload identity lifetime set");
    }
    Ok(Response::new(out))
}

/// A new URL, auth key or TLS roots for the external CA: checked against the
/// signer — only authenticated signing served, and a signature with the new
/// key verified like any other — before the key is sealed and kept.
async fn update_external_ca(ctl: &ControlService, ext: &swarmd_proto::control::ExternalCaUpdate) -> Result<(), Status> {
    let s = ctl.secrets.get()?;
    if s.external.is_none() {
        return Err(Status::failed_precondition("this cluster holds its CA key: an external CA is chosen at init"));
    }
    let auth_key = zeroize::Zeroizing::new(ext.auth_key.clone());
    let record =
        ExternalCaRecord { protocol: "cfssl".into(), url: ext.url.clone(), tls_roots_pem: ext.tls_roots_pem.clone() };
    let signer = ExternalCa::new(&record, s.anchor.cert_pem(), &auth_key).map_err(Status::invalid_argument)?;
    signer.check_only_authenticated().await.map_err(|e| Status::failed_precondition(e.to_string()))?;
    // A throwaway certificate (its key is dropped here) proves the key, the
    // TLS roots and the CA all fit.
    let (_, csr) = swarmd_certs::generate_key_and_csr().map_err(crate::status::internal)?;
    signer
        .sign(&s.ca, &csr, &NodeId::random(), Role::Worker, s.validity.duration())
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let cid = s.anchor.cluster_id().as_str().to_owned();
    let sealed = ctl.secrets.seal(&purpose::ca_key(&cid), &auth_key)?;
    ctl.store.propose(Command::UpdateExternalCa { record: Box::new(record), auth_key: sealed }).await?;
    let _ = ctl.secrets.reload();
    tracing::info!(url = %ext.url, "external CA updated");
    Ok(())
}

/// Administrator only. This manager's view of raft and a digest of its state.
pub(super) async fn info(ctl: &ControlService, _req: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
    let m = ctl.store.raft().metrics().borrow().clone();
    let me = ctl.store.view().managers().map_err(internal)?.into_iter().find(|n| n.raft_id == Some(m.id));
    let secrets = ctl.secrets.get().ok();
    Ok(Response::new(InfoResponse {
        node_id: me.map(|n| n.id.to_string()).unwrap_or_default(),
        cluster_id: secrets.map(|s| s.ca.cluster_id().to_string()).unwrap_or_default(),
        raft_id: format!("{:016x}", m.id),
        leader_raft_id: m.current_leader.map(|l| format!("{l:016x}")).unwrap_or_default(),
        term: m.current_term,
        last_applied: m.last_applied.map_or(0, |l| l.index),
        last_log_index: m.last_log_index.unwrap_or(0),
        snapshot_index: m.snapshot.map_or(0, |l| l.index),
        voters: m.membership_config.membership().voter_ids().map(|v| format!("{v:016x}")).collect(),
        state_digest: ctl.store.view().digest().map_err(internal)?,
        state: format!("{:?}", m.state),
    }))
}

/// Administrator only. INVALID_ARGUMENT for an unknown role; with `rotate`,
/// UNAVAILABLE when no raft leader can take the write.
pub(super) async fn get_join_token(
    ctl: &ControlService,
    req: Request<GetJoinTokenRequest>,
) -> Result<Response<GetJoinTokenResponse>, Status> {
    let role = validate::validate_get_join_token(req.get_ref())?;
    if req.get_ref().rotate {
        let secrets = ctl.secrets.get()?;
        // Tokens pin the anchor (during a root rotation, still the old root).
        let fresh = JoinToken::generate(secrets.anchor.digest());
        let cluster = secrets.ca.cluster_id().to_string();
        let sealed = ctl.secrets.seal(&purpose::join_token(&cluster, role), fresh.expose().as_bytes())?;
        ctl.store.propose(Command::RotateJoinToken { role, token: sealed }).await?;
        ctl.secrets.reload()?;
        tracing::info!(%role, "join token rotated");
    }
    let secrets = ctl.secrets.get()?;
    let token = secrets.token(role).ok_or_else(|| Status::invalid_argument("there is no admin join token"))?;
    Ok(Response::new(GetJoinTokenResponse { token: token.expose().to_string() }))
}
