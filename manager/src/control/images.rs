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
    Ok(Image {
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
