//! Control RPCs on secrets: create, update, list, get, remove, verify.

use tonic::{Request, Response, Status};

use swarmd_proto::control::{
    CreateSecretRequest, GetSecretRequest, ListSecretsRequest, ListSecretsResponse, RemoveSecretResponse, Secret,
    UpdateSecretRequest, VerifySecretsRequest, VerifySecretsResponse,
};

use crate::secret_store;

use super::ControlService;

/// Administrator only. Prints the new secret; ALREADY_EXISTS for a taken
/// name, INVALID_ARGUMENT for a bad name, size or label.
pub(super) async fn create_secret(
    ctl: &ControlService,
    req: Request<CreateSecretRequest>,
) -> Result<Response<Secret>, Status> {
    Ok(Response::new(secret_store::create(&ctl.store, &ctl.secrets, req.into_inner()).await?))
}

/// Administrator only. Adds a version.
pub(super) async fn update_secret(
    ctl: &ControlService,
    req: Request<UpdateSecretRequest>,
) -> Result<Response<Secret>, Status> {
    Ok(Response::new(secret_store::update(&ctl.store, &ctl.secrets, req.into_inner()).await?))
}

/// Administrator only. Metadata only.
pub(super) async fn list_secrets(
    ctl: &ControlService,
    req: Request<ListSecretsRequest>,
) -> Result<Response<ListSecretsResponse>, Status> {
    Ok(Response::new(ListSecretsResponse { secrets: secret_store::list(ctl.store.view(), req.get_ref())? }))
}

/// Administrator only. Metadata only.
pub(super) async fn get_secret(
    ctl: &ControlService,
    req: Request<GetSecretRequest>,
) -> Result<Response<Secret>, Status> {
    let r = secret_store::find(ctl.store.view(), &req.get_ref().name_or_id)?;
    Ok(Response::new(secret_store::to_wire(r)))
}

/// Administrator only.
pub(super) async fn remove_secret(
    ctl: &ControlService,
    req: Request<GetSecretRequest>,
) -> Result<Response<RemoveSecretResponse>, Status> {
    let id = secret_store::remove(&ctl.store, &req.get_ref().name_or_id).await?;
    Ok(Response::new(RemoveSecretResponse { id: id.to_string() }))
}

/// Administrator only.
pub(super) async fn verify_secrets(
    ctl: &ControlService,
    _req: Request<VerifySecretsRequest>,
) -> Result<Response<VerifySecretsResponse>, Status> {
    let store = ctl.store.view().clone();
    let secrets = ctl.secrets.clone();
    let checks = tokio::task::spawn_blocking(move || secret_store::verify(&store, &secrets))
        .await
        .map_err(crate::status::internal)??;
    Ok(Response::new(VerifySecretsResponse { checks }))
}
