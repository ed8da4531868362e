//! Control RPCs on administrator certificates: issue (control socket only),
//! list, revoke.

use swarmd_certs::{NodeId, Role};
use tonic::{Request, Response, Status};

use crate::auth::Authorizer;
use crate::state::{AdminCertRecord, Command};
use swarmd_proto::control::{
    AdminCertificate, ListAdminCertificatesRequest, ListAdminCertificatesResponse, RevokeAdminCertificateRequest,
};
use swarmd_proto::control::{IssueAdminCertificateRequest, IssueAdminCertificateResponse};

use crate::validate;

use super::{internal, ControlService};

fn admin_cert_to_wire(c: AdminCertRecord) -> AdminCertificate {
    AdminCertificate {
        serial: c.serial,
        id: c.id.to_string(),
        issued_at: c.issued_at,
        not_after: c.not_after,
        revoked: c.revoked_at.is_some(),
        revoked_at: c.revoked_at.unwrap_or(0),
    }
}

/// The control socket only: an admin certificate cannot mint more.
pub(super) async fn issue_admin_certificate(
    ctl: &ControlService,
    req: Request<IssueAdminCertificateRequest>,
) -> Result<Response<IssueAdminCertificateResponse>, Status> {
    if !matches!(Authorizer::info(&req).caller, crate::auth::Caller::Local) {
        return Err(Status::permission_denied("admin certificates are issued only through a manager's control socket"));
    }
    let s = ctl.secrets.get()?;
    let r = req.get_ref();
    let validity = validate::validate_issue_admin_certificate(r, s.validity)?;
    let id = NodeId::random();
    // (An external CA's profile decides the lifetime: refused if longer than asked.)
    let issued = s.sign_for(&r.csr_pem, &id, Role::Admin, validity).await?;
    // Recorded before it is handed out: an admin certificate the store does
    // not know is refused, and a recorded one can be revoked.
    let record = AdminCertRecord {
        serial: issued.serial.clone(),
        id: id.clone(),
        issued_at: swarmd_certs::now_unix(),
        not_after: issued.not_after,
        revoked_at: None,
    };
    ctl.store.propose(Command::RecordAdminCert(record)).await?;
    tracing::info!(admin.id = %id, serial = %issued.serial, not_after = issued.not_after, "admin certificate issued");
    Ok(Response::new(IssueAdminCertificateResponse {
        certificate_pem: issued.pem,
        ca_pem: s.trust_pem.clone(),
        id: id.to_string(),
        not_after: issued.not_after,
    }))
}

/// Administrator only. Expired certificates are left out.
pub(super) async fn list_admin_certificates(
    ctl: &ControlService,
    _req: Request<ListAdminCertificatesRequest>,
) -> Result<Response<ListAdminCertificatesResponse>, Status> {
    let now = swarmd_certs::now_unix();
    let mut certificates: Vec<_> = ctl
        .store
        .view()
        .admin_certs()
        .map_err(internal)?
        .into_iter()
        .filter(|c| c.not_after > now)
        .map(admin_cert_to_wire)
        .collect();
    certificates.sort_by_key(|c| c.issued_at);
    Ok(Response::new(ListAdminCertificatesResponse { certificates }))
}

/// Administrator only. INVALID_ARGUMENT for a malformed serial,
/// FAILED_PRECONDITION for an unknown one. Every manager refuses the
/// certificate once it applies the revocation, and closes its connections.
pub(super) async fn revoke_admin_certificate(
    ctl: &ControlService,
    req: Request<RevokeAdminCertificateRequest>,
) -> Result<Response<AdminCertificate>, Status> {
    let serial = validate::validate_revoke_admin_certificate(req.get_ref())?;
    let at = swarmd_certs::now_unix();
    ctl.store.propose(Command::RevokeAdminCert { serial: serial.clone(), at }).await?;
    tracing::warn!(serial = %serial, "admin certificate revoked");
    let rec = ctl
        .store
        .view()
        .admin_cert(&serial)
        .map_err(internal)?
        .ok_or_else(|| Status::internal("the revoked certificate's record is gone"))?;
    Ok(Response::new(admin_cert_to_wire(rec)))
}
