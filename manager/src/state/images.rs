//! Images: what the cluster knows of the content-addressed images whose
//! blobs its managers hold on disk (never in the raft log).
//!
//! | key                   | value |
//! |-----------------------|-------|
//! | `image/<digest>`      | [`ImageRecord`], by manifest digest |
//! | `imagename/<name>`    | the manifest digest a name (`repo:tag`) points to |
//!
//! An image is recorded only once a majority of the managers that are raft
//! members hold every one of its blobs (`PutImage` names them, and the state
//! machine counts): a record never points at blobs that one failure could
//! lose. A manager that fetches them later adds itself (`ImageHeld`).

use serde::{Deserialize, Serialize};
use swarmd_certs::NodeId;

use super::{encode, Command, Rejection, StateError, StateView, WriteBatch};

/// One blob of an image: the config, or a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBlob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// For a layer: the sha256 of its uncompressed tar. Empty for the config.
    pub diff_id: String,
}

/// An image the cluster holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The manifest's digest: the image's identity.
    pub digest: String,
    /// The manifest's size.
    pub manifest_size: u64,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// The config blob.
    pub config: ImageBlob,
    /// The layers, bottom first.
    pub layers: Vec<ImageBlob>,
    /// The managers that hold every blob.
    pub holders: Vec<NodeId>,
    /// When it was first recorded, unix seconds.
    pub created_at: i64,
}

impl ImageRecord {
    /// Bytes of all its blobs, manifest included.
    pub fn size(&self) -> u64 {
        self.manifest_size + self.config.size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// The digests of its blobs: manifest, config, layers.
    pub fn blobs(&self) -> Vec<&str> {
        let mut v = vec![self.digest.as_str(), self.config.digest.as_str()];
        v.extend(self.layers.iter().map(|l| l.digest.as_str()));
        v
    }
}

/// Most layers an image may have.
pub const MAX_IMAGE_LAYERS: usize = 128;

const IMAGE_PREFIX: &str = "image/";
const HOST_ROOTFS_KEY: &[u8] = b"hostrootfs";
const NAME_PREFIX: &str = "imagename/";

fn image_key(digest: &str) -> Vec<u8> {
    format!("{IMAGE_PREFIX}{digest}").into_bytes()
}

fn name_key(name: &str) -> Vec<u8> {
    format!("{NAME_PREFIX}{name}").into_bytes()
}

/// `name` with `:latest` added when it has no tag (a `:` after its last `/`).
pub fn normalize_image_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// Whether `image` (a service spec's) is pinned to an image: `sha256:<hex>`
/// or `NAME@sha256:<hex>`. Returns the manifest digest.
pub fn pinned_digest(image: &str) -> Option<&str> {
    let d = image.rsplit_once('@').map_or(image, |(_, d)| d);
    d.parse::<swarmd_image::Digest>().ok().map(|_| d)
}

/// Refuses a name that is empty, longer than 255 bytes, holds whitespace or
/// a control character, or looks like a digest.
pub fn check_image_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("image name {name:?}: 1 to 255 bytes, no spaces (e.g. app:1)"));
    }
    if name.starts_with("sha256:") || name.contains('@') {
        return Err(format!("image name {name:?}: a name, not a digest"));
    }
    Ok(())
}

fn check_digest(what: &str, d: &str) -> Result<(), String> {
    d.parse::<swarmd_image::Digest>().map(drop).map_err(|e| format!("{what}: {e}"))
}

fn check_record(r: &ImageRecord) -> Result<(), String> {
    check_digest("image", &r.digest)?;
    check_digest("config", &r.config.digest)?;
    if r.layers.is_empty() || r.layers.len() > MAX_IMAGE_LAYERS {
        return Err(format!("an image has 1 to {MAX_IMAGE_LAYERS} layers, not {}", r.layers.len()));
    }
    for l in &r.layers {
        check_digest("layer", &l.digest)?;
        check_digest("layer DiffID", &l.diff_id)?;
        if l.media_type.len() > 255 {
            return Err("a layer media type longer than 255 bytes".into());
        }
    }
    if r.platform.is_empty() || r.platform.len() > 64 {
        return Err("an image platform of 1 to 64 bytes".into());
    }
    Ok(())
}

impl StateView {
    /// The image with manifest digest `digest`.
    pub fn image(&self, digest: &str) -> Result<Option<ImageRecord>, StateError> {
        self.get(&image_key(digest))
    }

    /// Every image, by digest.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StateError> {
        self.scan(IMAGE_PREFIX)
    }

    /// The names that point to `digest`, sorted.
    pub fn image_names(&self, digest: &str) -> Result<Vec<String>, StateError> {
        let mut out = Vec::new();
        for name in self.scan_key_suffixes(NAME_PREFIX)? {
            if self.get::<String>(&name_key(&name))?.as_deref() == Some(digest) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The image a reference names: a manifest digest (`sha256:…`, or
    /// `NAME@sha256:…`, whose name is then ignored), or a name.
    pub fn resolve_image(&self, reference: &str) -> Result<Option<ImageRecord>, StateError> {
        let by_digest = reference.rsplit_once('@').map_or(reference, |(_, d)| d);
        if by_digest.starts_with("sha256:") {
            return self.image(by_digest);
        }
        match self.get::<String>(&name_key(&normalize_image_name(reference)))? {
            Some(d) => self.image(&d),
            None => Ok(None),
        }
    }

    /// Whether services may run a root filesystem directory on the workers.
    pub fn host_rootfs_allowed(&self) -> Result<bool, StateError> {
        Ok(self.get::<bool>(HOST_ROOTFS_KEY)?.unwrap_or(false))
    }

    /// Checks a service's (new) image: a host directory only where the
    /// cluster allows it; a pinned image only if the cluster holds it.
    pub fn check_service_image(&self, image: &str) -> Result<Result<(), Rejection>, StateError> {
        if self.content_trust_required()? {
            let verdict = match pinned_digest(image) {
                Some(d) if self.image(d)?.is_some() => self.trust_verdict(image)?.map(drop),
                Some(d) => Err(format!("no image {d} in this cluster")),
                None => Err(format!("image {image:?} is a directory: content trust requires a signed image")),
            };
            if let Err(why) = verdict {
                return Ok(Err(Rejection::Invalid(format!("content trust: {why}"))));
            }
        }
        if image.starts_with('/') {
            if !self.host_rootfs_allowed()? {
                return Ok(Err(Rejection::Invalid(format!(
                    "image {image:?} is a directory on the workers, which this cluster does not allow: load an image \
                     (`secretctl image load`), or allow it for development (`secretctl cluster update \
                     --allow-host-rootfs=true`)"
                ))));
            }
            return Ok(Ok(()));
        }
        match pinned_digest(image) {
            Some(d) if self.image(d)?.is_some() => Ok(Ok(())),
            Some(d) => Ok(Err(Rejection::Invalid(format!("no image {d} in this cluster")))),
            None => Ok(Err(Rejection::Invalid(format!("image {image:?} is not pinned to a digest")))),
        }
    }

    /// The managers that count for an image's majority: raft members.
    fn member_managers(&self) -> Result<Vec<NodeId>, StateError> {
        Ok(self.managers()?.into_iter().filter(|m| m.raft_id.is_some()).map(|m| m.id).collect())
    }
}

/// `PutImage`, `ImageHeld`, `RemoveImage`.
pub(super) fn plan_images(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    if view.cluster()?.is_none() {
        return Ok(Err(Rejection::NotInitialised));
    }
    let mut batch = WriteBatch::default();
    match cmd {
        Command::PutImage { image, name } => {
            if let Err(e) = check_record(image) {
                return Ok(Err(Rejection::Invalid(e)));
            }
            if let Some(n) = name {
                if let Err(e) = check_image_name(n) {
                    return Ok(Err(Rejection::Invalid(e)));
                }
            }
            let members = view.member_managers()?;
            let mut record = match view.image(&image.digest)? {
                // Loaded again: the first record stays, with the new holders.
                Some(old) => old,
                None => (**image).clone(),
            };
            for h in &image.holders {
                if !members.contains(h) {
                    return Ok(Err(Rejection::Invalid(format!("{h} is not a manager: it cannot hold an image"))));
                }
                if !record.holders.contains(h) {
                    record.holders.push(h.clone());
                }
            }
            let majority = members.len() / 2 + 1;
            if record.holders.iter().filter(|h| members.contains(h)).count() < majority {
                return Ok(Err(Rejection::Invalid(format!(
                    "{} of {} managers hold the image's blobs: a majority ({majority}) must before it is recorded",
                    record.holders.len(),
                    members.len()
                ))));
            }
            record.holders.sort();
            batch.insert(image_key(&record.digest), encode(&record));
            if let Some(n) = name {
                batch.insert(name_key(&normalize_image_name(n)), encode(&record.digest));
            }
        }
        Command::ImageHeld { digest, node } => {
            let Some(mut record) = view.image(digest)? else {
                return Ok(Err(Rejection::Invalid(format!("no image {digest}"))));
            };
            if !view.member_managers()?.contains(node) {
                return Ok(Err(Rejection::Invalid(format!("{node} is not a manager: it cannot hold an image"))));
            }
            if !record.holders.contains(node) {
                record.holders.push(node.clone());
                record.holders.sort();
                batch.insert(image_key(digest), encode(&record));
            }
        }
        Command::RemoveImage { digest } => {
            let Some(record) = view.image(digest)? else {
                return Ok(Err(Rejection::Invalid(format!("no image {digest}"))));
            };
            let names = view.image_names(&record.digest)?;
            let mut users: Vec<String> = view
                .services()?
                .into_iter()
                .filter(|s| {
                    let image = s.spec.image.as_str();
                    image == record.digest
                        || pinned_digest(image) == Some(record.digest.as_str())
                        || names.iter().any(|n| *n == normalize_image_name(image))
                })
                .map(|s| s.name)
                .collect();
            if !users.is_empty() {
                users.sort();
                return Ok(Err(Rejection::ImageInUse { image: record.digest, services: users }));
            }
            batch.remove(image_key(digest));
            for n in names {
                batch.remove(name_key(&n));
            }
            for k in super::trust::signature_keys(view, digest)? {
                batch.remove(k);
            }
        }
        Command::SetHostRootfs { allowed } => {
            batch.insert(HOST_ROOTFS_KEY.to_vec(), encode(allowed));
        }
        _ => unreachable!("not an image command"),
    }
    Ok(Ok(batch))
}
