//! Control RPCs on images: load, list, inspect, remove.

use swarmd_proto::control::{
    GetImageRequest, Image, ImageLayer, ListImagesRequest, ListImagesResponse, LoadImageChunk, RemoveImageResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::state::{normalize_image_name, pinned_digest, Command, ImageRecord, StateView};

use super::{internal, ControlService};

/// The services whose spec names `record` (by digest or by one of `names`).
fn users(view: &StateView, record: &ImageRecord, names: &[String]) -> Result<Vec<String>, Status> {
    let mut out: Vec<String> = view
        .services()
        .map_err(internal)?
        .into_iter()
        .filter(|s| {
            pinned_digest(&s.spec.image) == Some(record.digest.as_str())
                || names.iter().any(|n| *n == normalize_image_name(&s.spec.image))
        })
        .map(|s| s.name)
        .collect();
    out.sort();
    Ok(out)
}

fn to_wire(view: &StateView, r: ImageRecord) -> Result<Image, Status> {
    let names = view.image_names(&r.digest).map_err(internal)?;
    let services = users(view, &r, &names)?;
    let vouches = view.vouches(&r.digest, &view.repositories_of(&r.digest).map_err(internal)?).map_err(internal)?;
    let total = view.image_signatures(&r.digest).map_err(internal)?.len();
    let trusted: std::collections::HashSet<String> = vouches.iter().map(|(_, s, _)| s.id()).collect();
    let signatures = vouches
        .into_iter()
        .map(|(v, _, _)| swarmd_proto::control::ImageSignature { key: v.key, repository: v.repository })
        .collect();
    Ok(Image {
        signatures,
        untrusted_signatures: (total - trusted.len()) as u32,
        size: r.size(),
        digest: r.digest,
        names,
        platform: r.platform,
        created_at: r.created_at,
        layers: r
            .layers
            .into_iter()
            .map(|l| ImageLayer { digest: l.digest, size: l.size, media_type: l.media_type, diff_id: l.diff_id })
            .collect(),
        config_digest: r.config.digest,
        holders: r.holders.iter().map(|h| h.to_string()).collect(),
        services,
    })
}

fn find(view: &StateView, reference: &str) -> Result<ImageRecord, Status> {
    if reference.is_empty() || reference.len() > 300 {
        return Err(Status::invalid_argument("give an image: NAME[:TAG], NAME@sha256:… or sha256:…"));
    }
    view.resolve_image(reference)
        .map_err(internal)?
        .ok_or_else(|| Status::not_found(format!("no image {reference:?} in this cluster")))
}

/// Administrator only. See [`crate::images`].
pub(super) async fn load_image(
    ctl: &ControlService,
    req: Request<Streaming<LoadImageChunk>>,
) -> Result<Response<Image>, Status> {
    let (record, _) = ctl.images.load(req.into_inner()).await?;
    let view = ctl.store.view();
    let r = view.image(&record.digest).map_err(internal)?.unwrap_or(record);
    Ok(Response::new(to_wire(view, r)?))
}

/// Administrator only. See [`crate::registry`].
pub(super) async fn pull_image(
    ctl: &ControlService,
    req: Request<swarmd_proto::control::PullImageRequest>,
) -> Result<Response<Image>, Status> {
    let r = req.into_inner();
    let (record, _) = ctl.images.pull(&r.reference, &r.platform, &r.name).await?;
    tracing::info!(image = %record.digest, reference = %r.reference, "image pulled");
    let view = ctl.store.view();
    let rec = view.image(&record.digest).map_err(internal)?.unwrap_or(record);
    Ok(Response::new(to_wire(view, rec)?))
}

/// Administrator only.
pub(super) async fn list_images(
    ctl: &ControlService,
    _req: Request<ListImagesRequest>,
) -> Result<Response<ListImagesResponse>, Status> {
    let view = ctl.store.view();
    let mut images =
        view.images().map_err(internal)?.into_iter().map(|r| to_wire(view, r)).collect::<Result<Vec<_>, _>>()?;
    images.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.digest.cmp(&b.digest)));
    Ok(Response::new(ListImagesResponse { images }))
}

/// Administrator only.
pub(super) async fn get_image(ctl: &ControlService, req: Request<GetImageRequest>) -> Result<Response<Image>, Status> {
    let view = ctl.store.view();
    let r = find(view, &req.get_ref().reference)?;
    Ok(Response::new(to_wire(view, r)?))
}

/// Administrator only. Refused while a service uses the image; its blobs go
/// from the managers' disks after [`crate::images::GC_GRACE`].
pub(super) async fn remove_image(
    ctl: &ControlService,
    req: Request<GetImageRequest>,
) -> Result<Response<RemoveImageResponse>, Status> {
    let r = find(ctl.store.view(), &req.get_ref().reference)?;
    ctl.store.propose(Command::RemoveImage { digest: r.digest.clone() }).await?;
    tracing::info!(image = %r.digest, "image removed");
    Ok(Response::new(RemoveImageResponse { digest: r.digest }))
}

fn key_to_wire(k: crate::state::TrustKeyRecord) -> Result<swarmd_proto::control::TrustKey, Status> {
    let pk = swarmd_image::trust::PublicKey::from_spki_der(&k.public_key).map_err(internal)?;
    Ok(swarmd_proto::control::TrustKey {
        name: k.name,
        public_key_pem: pk.to_pem(),
        scope: k.scope,
        fingerprint: pk.fingerprint(),
        created_at: k.created_at,
    })
}

/// Administrator only.
pub(super) async fn add_trust_key(
    ctl: &ControlService,
    req: Request<swarmd_proto::control::AddTrustKeyRequest>,
) -> Result<Response<swarmd_proto::control::TrustKey>, Status> {
    let r = req.into_inner();
    crate::state::check_trust_key_name(&r.name).map_err(Status::invalid_argument)?;
    let pk = swarmd_image::trust::PublicKey::from_pem(&r.public_key_pem)
        .map_err(|e| Status::invalid_argument(format!("key {}: {e}", r.name)))?;
    let scope = if r.scope.is_empty() { "*".to_owned() } else { r.scope };
    let record = crate::state::TrustKeyRecord {
        name: r.name.clone(),
        public_key: pk.spki_der(),
        scope,
        created_at: swarmd_certs::now_unix(),
    };
    ctl.store.propose(Command::AddTrustKey(Box::new(record.clone()))).await?;
    tracing::info!(key = %record.name, scope = %record.scope, fingerprint = %pk.fingerprint(), "image signing key trusted");
    Ok(Response::new(key_to_wire(record)?))
}

/// Administrator only.
pub(super) async fn list_trust_keys(
    ctl: &ControlService,
    _req: Request<swarmd_proto::control::ListTrustKeysRequest>,
) -> Result<Response<swarmd_proto::control::ListTrustKeysResponse>, Status> {
    let keys = ctl.store.view().trust_keys().map_err(internal)?;
    let keys = keys.into_iter().map(key_to_wire).collect::<Result<Vec<_>, _>>()?;
    Ok(Response::new(swarmd_proto::control::ListTrustKeysResponse { keys }))
}

/// Administrator only. Images it alone signed stop getting new tasks
/// (under content trust); running tasks keep running.
pub(super) async fn remove_trust_key(
    ctl: &ControlService,
    req: Request<swarmd_proto::control::RemoveTrustKeyRequest>,
) -> Result<Response<swarmd_proto::control::TrustKey>, Status> {
    let name = req.into_inner().name;
    let keys = ctl.store.view().trust_keys().map_err(internal)?;
    let Some(k) = keys.into_iter().find(|k| k.name == name) else {
        return Err(Status::not_found(format!("no trusted key named {name:?}")));
    };
    ctl.store.propose(Command::RemoveTrustKey { name: name.clone() }).await?;
    tracing::warn!(key = %name, "image signing key no longer trusted");
    Ok(Response::new(key_to_wire(k)?))
}

/// Administrator only. Kept only if a trusted key verifies it now and its
/// payload names the image (a signature made elsewhere — cosign, openssl —
/// is imported as it is).
pub(super) async fn add_image_signature(
    ctl: &ControlService,
    req: Request<swarmd_proto::control::AddImageSignatureRequest>,
) -> Result<Response<Image>, Status> {
    let r = req.into_inner();
    let view = ctl.store.view();
    let image = find(view, &r.reference)?;
    let claim = swarmd_image::trust::parse_payload(&r.payload).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if claim.digest.as_str() != image.digest {
        return Err(Status::invalid_argument(format!(
            "the payload signs {}, not the image {} ({})",
            claim.digest, r.reference, image.digest
        )));
    }
    let keys = view.trust_keys().map_err(internal)?;
    let verifying: Vec<&crate::state::TrustKeyRecord> = keys
        .iter()
        .filter(|k| {
            swarmd_image::trust::PublicKey::from_spki_der(&k.public_key)
                .is_ok_and(|pk| pk.verifies(&r.payload, &r.signature))
        })
        .collect();
    if verifying.is_empty() {
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        return Err(Status::invalid_argument(format!(
            "the signature is not verified by any trusted key (tried: {})",
            if names.is_empty() { "none: secretctl trust key add".to_owned() } else { names.join(", ") }
        )));
    }
    if !verifying.iter().any(|k| swarmd_image::trust::scope_matches(&k.scope, &claim.repository)) {
        let scopes: Vec<String> = verifying.iter().map(|k| format!("{} (scope {})", k.name, k.scope)).collect();
        return Err(Status::invalid_argument(format!(
            "the signature vouches for {}, which the scope of the key that made it does not cover: {}",
            claim.repository,
            scopes.join(", ")
        )));
    }
    let signature = crate::state::SignatureRecord {
        payload: r.payload,
        signature: r.signature,
        added_at: swarmd_certs::now_unix(),
    };
    ctl.store
        .propose(Command::AddImageSignature { digest: image.digest.clone(), signature: Box::new(signature) })
        .await?;
    tracing::info!(image = %image.digest, repository = %claim.repository, "image signature added");
    let view = ctl.store.view();
    let r = view.image(&image.digest).map_err(internal)?.unwrap_or(image);
    Ok(Response::new(to_wire(view, r)?))
}
