//! Reading an image from an OCI image layout — a directory, an OCI archive
//! tar, or a `docker save` tar — and verifying all of it by digest.
//!
//! `index.json` names the manifests (a nested index is followed once);
//! the one for the wanted platform is taken, or the only one. Older `docker
//! save` tars have only the legacy `manifest.json`: a manifest is then made
//! from it (its digest is ours). Every blob is checked against its
//! descriptor's sha256 and size while it streams, and every layer's DiffID
//! (the sha256 of the uncompressed tar, from the config) after it is
//! decompressed (gzip, zstd, or none). Documents are bounded in size, and
//! manifests, layers and tar entries in number.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use crate::digest::{Digest, Hashing};

/// Largest JSON document read (index, manifest, config).
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// Most manifests an index may list.
const MAX_MANIFESTS: usize = 1024;
/// Most layers an image may have.
pub const MAX_LAYERS: usize = 128;
/// Most entries in an image tar.
const MAX_TAR_ENTRIES: usize = 100_000;
/// Most bytes all of an image's layers may hold once uncompressed.
pub const MAX_UNCOMPRESSED: u64 = 8 << 30;

/// OCI media types (and Docker's) this reads.
pub mod media {
    /// An OCI image index.
    pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// An OCI image manifest.
    pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// An OCI image config.
    pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// An uncompressed layer.
    pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// A gzip layer.
    pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// A zstd layer.
    pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Docker's manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker's manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker's config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker's gzip layer.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker's uncompressed layer.
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// From a layer's media type; `None` for what is not a layer this reads.
    pub fn of_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            media::LAYER | media::DOCKER_LAYER => Some(Compression::None),
            media::LAYER_GZIP | media::DOCKER_LAYER_GZIP => Some(Compression::Gzip),
            media::LAYER_ZSTD => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// `blob` decompressed.
    pub fn reader<'a>(self, blob: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob)?),
        })
    }
}

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Reading the source failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The source is not an image layout this reads.
    #[error("{0}")]
    Invalid(String),
    /// A blob is not what its descriptor says.
    #[error("blob {digest}: {reason}")]
    Mismatch { digest: Digest, reason: String },
}

fn invalid(s: impl Into<String>) -> LayoutError {
    LayoutError::Invalid(s.into())
}

/// A platform: `os/arch[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`…
    pub arch: String,
    /// `v8`…, if any.
    pub variant: Option<String>,
}

impl Default for Platform {
    /// linux/amd64.
    fn default() -> Self {
        Self { os: "linux".into(), arch: "amd64".into(), variant: None }
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_owned(),
                arch: arch.to_owned(),
                variant: variant.filter(|v| !v.is_empty()).map(str::to_owned),
            }),
            _ => Err(format!("platform {s:?}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Where the files of an image layout are.
pub enum Source {
    /// A directory.
    Dir(PathBuf),
    /// A tar file, and where each regular file of it is: (offset, size).
    Tar { path: PathBuf, file: File, entries: HashMap<String, (u64, u64)> },
}

impl Source {
    /// An image layout directory, or a tar of one (OCI archive, `docker save`).
    pub fn open(path: &Path) -> Result<Self, LayoutError> {
        let io = |source| LayoutError::Io { path: path.display().to_string(), source };
        if path.is_dir() {
            return Ok(Source::Dir(path.to_owned()));
        }
        let file = File::open(path).map_err(io)?;
        let mut entries = HashMap::new();
        let mut archive = tar::Archive::new(&file);
        for entry in archive.entries().map_err(io)? {
            let entry = entry.map_err(|e| invalid(format!("{}: not a tar: {e}", path.display())))?;
            if entries.len() >= MAX_TAR_ENTRIES {
                return Err(invalid(format!("{}: more than {MAX_TAR_ENTRIES} entries", path.display())));
            }
            if !matches!(entry.header().entry_type(), tar::EntryType::Regular | tar::EntryType::Continuous) {
                continue;
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./").to_owned();
            entries.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(Source::Tar { path: path.to_owned(), file, entries })
    }

    /// File `name` of the layout (`index.json`, `blobs/sha256/…`) and its size.
    pub fn file(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), LayoutError> {
        match self {
            Source::Dir(dir) => {
                if name.split('/').any(|c| c == ".." || c.is_empty()) {
                    return Err(invalid(format!("{name:?} is not a path in the layout")));
                }
                let path = dir.join(name);
                let io = |source| LayoutError::Io { path: path.display().to_string(), source };
                let f = File::open(&path).map_err(io)?;
                let meta = f.metadata().map_err(io)?;
                if !meta.is_file() {
                    return Err(invalid(format!("{} is not a file", path.display())));
                }
                Ok((Box::new(f), meta.len()))
            }
            Source::Tar { path, file, entries } => {
                let &(offset, size) = entries
                    .get(name)
                    .ok_or_else(|| invalid(format!("{}: no {name} in the archive", path.display())))?;
                let mut f =
                    file.try_clone().map_err(|source| LayoutError::Io { path: path.display().to_string(), source })?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(|source| LayoutError::Io { path: path.display().to_string(), source })?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// Whether the layout has file `name`.
    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(dir) => dir.join(name).is_file(),
            Source::Tar { entries, .. } => entries.contains_key(name),
        }
    }

    /// A JSON document of at most [`MAX_DOCUMENT`] bytes.
    fn document(&self, name: &str) -> Result<Vec<u8>, LayoutError> {
        let (r, size) = self.file(name)?;
        if size > MAX_DOCUMENT {
            return Err(invalid(format!("{name} is larger than {} MiB", MAX_DOCUMENT >> 20)));
        }
        let mut buf = Vec::with_capacity(size as usize);
        r.take(MAX_DOCUMENT).read_to_end(&mut buf).map_err(|source| LayoutError::Io { path: name.into(), source })?;
        Ok(buf)
    }

    /// Blob `digest`, checked against `size` and the digest: its bytes
    /// (documents only: at most [`MAX_DOCUMENT`]).
    pub fn blob_bytes(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, LayoutError> {
        if size > MAX_DOCUMENT {
            return Err(LayoutError::Mismatch {
                digest: digest.clone(),
                reason: format!("{size} bytes is too large for a document"),
            });
        }
        let bytes = self.document(&blob_path(digest))?;
        check_bytes(digest, size, &bytes)?;
        Ok(bytes)
    }
}

/// `blobs/sha256/<hex>`.
pub fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

fn check_bytes(digest: &Digest, size: u64, bytes: &[u8]) -> Result<(), LayoutError> {
    if bytes.len() as u64 != size {
        return Err(LayoutError::Mismatch {
            digest: digest.clone(),
            reason: format!("{} bytes, the descriptor says {size}", bytes.len()),
        });
    }
    let actual = Digest::of(bytes);
    if actual != *digest {
        return Err(LayoutError::Mismatch {
            digest: digest.clone(),
            reason: format!("its content hashes to {actual}"),
        });
    }
    Ok(())
}

fn descriptor_digest(d: &Descriptor) -> Result<Digest, LayoutError> {
    d.digest().to_string().parse().map_err(invalid)
}

/// One layer of a verified image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The blob's media type.
    pub media_type: String,
    /// The sha256 of the uncompressed tar.
    pub diff_id: Digest,
}

/// An image read from a layout and verified, blob by blob.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest's digest: the image's identity.
    pub digest: Digest,
    /// The manifest, as stored.
    pub manifest: Vec<u8>,
    /// The config's digest.
    pub config_digest: Digest,
    /// The config, as stored.
    pub config: Vec<u8>,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
    /// The platform it is for.
    pub platform: Platform,
    /// The name the layout gives it (`org.opencontainers.image.ref.name`,
    /// or a `docker save` tag), if any.
    pub name: Option<String>,
    /// Where in the source the blobs are that are not at
    /// `blobs/sha256/<hex>` (a legacy `docker save`'s layers).
    pub blob_files: HashMap<Digest, String>,
}

impl Image {
    /// Where blob `d` is in the source it was read from.
    pub fn blob_file(&self, d: &Digest) -> String {
        self.blob_files.get(d).cloned().unwrap_or_else(|| blob_path(d))
    }

    /// Compressed bytes of all its layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum::<u64>() + self.config.len() as u64 + self.manifest.len() as u64
    }
}

/// An image's manifest and config, parsed and checked against each other
/// (no layer read): what a manager receiving an image, and a worker about
/// to unpack one, start from.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The config's digest (checked against the manifest's descriptor).
    pub config_digest: Digest,
    /// The layers, bottom first, with their DiffIDs from the config.
    pub layers: Vec<Layer>,
    /// The platform the config says.
    pub platform: Platform,
    /// The config.
    pub config: ImageConfiguration,
}

/// Parses `manifest` and `config`: the config must be the blob the manifest
/// names (sha256 and size), every layer of a media type this reads, at most
/// [`MAX_LAYERS`] of them, and one DiffID per layer.
pub fn parse(manifest: &[u8], config: &[u8]) -> Result<Parsed, LayoutError> {
    if manifest.len() as u64 > MAX_DOCUMENT || config.len() as u64 > MAX_DOCUMENT {
        return Err(invalid(format!("a manifest or config larger than {} MiB", MAX_DOCUMENT >> 20)));
    }
    let digest = Digest::of(manifest);
    let m: ImageManifest = serde_json::from_slice(manifest).map_err(|e| invalid(format!("manifest {digest}: {e}")))?;
    let config_desc = m.config();
    let config_digest = descriptor_digest(config_desc)?;
    check_bytes(&config_digest, config_desc.size(), config)?;
    let parsed: ImageConfiguration =
        serde_json::from_slice(config).map_err(|e| invalid(format!("config {config_digest}: {e}")))?;
    let platform = Platform {
        os: parsed.os().to_string(),
        arch: parsed.architecture().to_string(),
        variant: parsed.variant().clone(),
    };
    let diff_ids = parsed.rootfs().diff_ids();
    let descs = m.layers();
    if descs.is_empty() {
        return Err(invalid("an image without layers"));
    }
    if descs.len() > MAX_LAYERS {
        return Err(invalid(format!("{} layers: at most {MAX_LAYERS}", descs.len())));
    }
    if diff_ids.len() != descs.len() {
        return Err(invalid(format!("the config lists {} layers, the manifest {}", diff_ids.len(), descs.len())));
    }
    let mut layers = Vec::with_capacity(descs.len());
    for (d, diff_id) in descs.iter().zip(diff_ids) {
        let digest = descriptor_digest(d)?;
        let diff_id: Digest = diff_id.parse().map_err(invalid)?;
        let media_type = d.media_type().to_string();
        if Compression::of_media_type(&media_type).is_none() {
            return Err(invalid(format!("layer {digest}: media type {media_type:?} is not a layer this reads")));
        }
        layers.push(Layer { digest, size: d.size(), media_type, diff_id });
    }
    Ok(Parsed { config_digest, layers, platform, config: parsed })
}

/// A manifest picked from the layout: its digest, bytes and name, and where
/// blobs are that are not at `blobs/sha256/<hex>` (legacy `docker save`).
struct Picked {
    digest: Digest,
    bytes: Vec<u8>,
    name: Option<String>,
    files: HashMap<Digest, String>,
}

impl Picked {
    fn blob_file(&self, digest: &Digest) -> String {
        self.files.get(digest).cloned().unwrap_or_else(|| blob_path(digest))
    }
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Reads the image for `platform` from `source` and verifies every blob of
/// it; for a layout with several images, `name` picks one (its ref name).
pub fn load(source: &Source, platform: &Platform, name: Option<&str>) -> Result<Image, LayoutError> {
    let picked = if source.has("index.json") {
        pick_from_index(source, platform, name)?
    } else if source.has("manifest.json") {
        legacy_manifest(source, name)?
    } else {
        return Err(invalid("not an image layout: no index.json (nor a docker save manifest.json)"));
    };
    let manifest_desc = serde_json::from_slice::<ImageManifest>(&picked.bytes)
        .map_err(|e| invalid(format!("manifest {}: {e}", picked.digest)))?;
    let config_desc = manifest_desc.config();
    let config_digest = descriptor_digest(config_desc)?;
    if config_desc.size() > MAX_DOCUMENT {
        return Err(invalid(format!("config {config_digest} is larger than {} MiB", MAX_DOCUMENT >> 20)));
    }
    let config = source.document(&picked.blob_file(&config_digest))?;
    let parsed = parse(&picked.bytes, &config)?;
    if parsed.platform.os != platform.os || parsed.platform.arch != platform.arch {
        return Err(invalid(format!("the image is for {}, not {platform}", parsed.platform)));
    }
    let mut budget = MAX_UNCOMPRESSED;
    for l in &parsed.layers {
        let compression = Compression::of_media_type(&l.media_type).expect("checked by parse");
        let (blob, _) = source.file(&picked.blob_file(&l.digest))?;
        budget -= verify_layer(blob, &l.digest, l.size, compression, &l.diff_id, budget)?;
    }
    let Parsed { config_digest, layers, platform: actual, .. } = parsed;
    Ok(Image {
        digest: picked.digest,
        manifest: picked.bytes,
        config_digest,
        config,
        layers,
        platform: actual,
        name: picked.name,
        blob_files: picked.files,
    })
}

/// The media type of a cosign simple signing payload layer.
pub const COSIGN_PAYLOAD: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

/// The annotation holding a cosign signature (base64 of the DER).
pub const COSIGN_SIGNATURE: &str = "dev.cosignproject.cosign/signature";

/// Most cosign signatures read for one image.
const MAX_COSIGN_SIGNATURES: usize = 32;

/// The cosign signatures stored beside image `image` in the layout (the
/// manifest tagged `sha256-<hex>.sig`, as `cosign` and `skopeo copy` keep
/// them): each payload (checked against its descriptor) with its signature
/// as written (base64). None when there are none.
pub fn cosign_signatures(source: &Source, image: &Digest) -> Result<Vec<(Vec<u8>, String)>, LayoutError> {
    if !source.has("index.json") {
        return Ok(Vec::new());
    }
    let index: ImageIndex =
        serde_json::from_slice(&source.document("index.json")?).map_err(|e| invalid(format!("index.json: {e}")))?;
    let tag = format!("sha256-{}.sig", image.hex());
    let mut out = Vec::new();
    for d in index.manifests().iter().take(MAX_MANIFESTS) {
        if !ref_name(d).is_some_and(|n| n == tag || n.ends_with(&format!(":{tag}"))) {
            continue;
        }
        let digest = descriptor_digest(d)?;
        if d.size() > MAX_DOCUMENT {
            return Err(invalid(format!("signature manifest {digest} is larger than {} MiB", MAX_DOCUMENT >> 20)));
        }
        let m: ImageManifest = serde_json::from_slice(&source.blob_bytes(&digest, d.size())?)
            .map_err(|e| invalid(format!("signature manifest {digest}: {e}")))?;
        for l in m.layers().iter().filter(|l| l.media_type().to_string() == COSIGN_PAYLOAD) {
            let Some(sig) = l.annotations().as_ref().and_then(|a| a.get(COSIGN_SIGNATURE)) else { continue };
            if out.len() >= MAX_COSIGN_SIGNATURES || l.size() > crate::trust::MAX_PAYLOAD as u64 {
                continue;
            }
            let payload = source.blob_bytes(&descriptor_digest(l)?, l.size())?;
            out.push((payload, sig.clone()));
        }
    }
    Ok(out)
}

/// Streams a layer blob: its sha256 and size as `digest` and `size` say,
/// and its uncompressed sha256 as `diff_id` says (at most `budget` bytes
/// uncompressed). Returns the uncompressed size.
pub fn verify_layer(
    blob: impl Read,
    digest: &Digest,
    size: u64,
    compression: Compression,
    diff_id: &Digest,
    budget: u64,
) -> Result<u64, LayoutError> {
    let mismatch = |reason: String| LayoutError::Mismatch { digest: digest.clone(), reason };
    let mut outer = Hashing::new(blob.take(size.saturating_add(1)));
    let inner = (|| {
        let decompressed = compression.reader(&mut outer)?;
        let mut inner = Hashing::new(decompressed.take(budget.saturating_add(1)));
        io::copy(&mut inner, &mut io::sink())?;
        Ok::<_, io::Error>(inner.finish())
    })();
    // What the decompressor left unread still belongs to the blob; the blob
    // is judged first by its own digest and size.
    io::copy(&mut outer, &mut io::sink()).map_err(|e| mismatch(e.to_string()))?;
    let (outer_digest, outer_size) = outer.finish();
    if outer_size != size {
        return Err(mismatch(format!("{outer_size} bytes or more, the descriptor says {size}")));
    }
    if outer_digest != *digest {
        return Err(mismatch(format!("its content hashes to {outer_digest}")));
    }
    let (inner_digest, inner_size) = inner.map_err(|e| mismatch(format!("cannot decompress: {e}")))?;
    if inner_size > budget {
        return Err(mismatch(format!("it holds more than {} GiB uncompressed", budget >> 30)));
    }
    if inner_digest != *diff_id {
        return Err(mismatch(format!(
            "its uncompressed tar hashes to {inner_digest}, the config's DiffID is {diff_id}"
        )));
    }
    Ok(inner_size)
}

fn pick_from_index(source: &Source, platform: &Platform, name: Option<&str>) -> Result<Picked, LayoutError> {
    let index_bytes = source.document("index.json")?;
    let index: ImageIndex = serde_json::from_slice(&index_bytes).map_err(|e| invalid(format!("index.json: {e}")))?;
    let mut entries = index.manifests().clone();
    if entries.len() > MAX_MANIFESTS {
        return Err(invalid(format!("index.json lists more than {MAX_MANIFESTS} manifests")));
    }
    // Signatures and attestations stored beside images are not images (by
    // media type, or by cosign's tags: sha256-<hex>.sig|.att|.sbom).
    entries.retain(|d| {
        let t = d.media_type().to_string();
        (t == media::MANIFEST || t == media::DOCKER_MANIFEST || t == media::INDEX || t == media::DOCKER_LIST)
            && !ref_name(d).is_some_and(is_cosign_tag)
    });
    if let Some(want) = name {
        entries.retain(|d| ref_name(d).is_some_and(|n| n == want || n.rsplit(':').next() == Some(want)));
        if entries.is_empty() {
            return Err(invalid(format!("index.json names no image {want:?}")));
        }
    }
    let top_name = |d: &Descriptor| ref_name(d).map(str::to_owned);
    let mut candidates: Vec<(Descriptor, Option<String>)> = Vec::new();
    for d in entries {
        let t = d.media_type().to_string();
        if t == media::INDEX || t == media::DOCKER_LIST {
            let digest = descriptor_digest(&d)?;
            let nested: ImageIndex = serde_json::from_slice(&source.blob_bytes(&digest, d.size())?)
                .map_err(|e| invalid(format!("index {digest}: {e}")))?;
            if nested.manifests().len() > MAX_MANIFESTS {
                return Err(invalid(format!("index {digest} lists more than {MAX_MANIFESTS} manifests")));
            }
            let n = top_name(&d);
            for m in nested.manifests() {
                let t = m.media_type().to_string();
                if t == media::MANIFEST || t == media::DOCKER_MANIFEST {
                    candidates.push((m.clone(), n.clone()));
                }
            }
        } else {
            let n = top_name(&d);
            candidates.push((d, n));
        }
    }
    let matches = |d: &Descriptor| {
        d.platform().as_ref().is_none_or(|p| {
            p.os().to_string() == platform.os
                && p.architecture().to_string() == platform.arch
                && (platform.variant.is_none() || p.variant().as_deref() == platform.variant.as_deref())
        })
    };
    let mut fitting: Vec<_> = candidates.into_iter().filter(|(d, _)| matches(d)).collect();
    // One image several times (several tags): one digest.
    fitting.sort_by_key(|a| a.0.digest().to_string());
    fitting.dedup_by(|a, b| a.0.digest() == b.0.digest());
    let (d, name) = match fitting.len() {
        0 => return Err(invalid(format!("the layout has no image for {platform}"))),
        1 => fitting.remove(0),
        n => return Err(invalid(format!("the layout has {n} images for {platform}: name one (--name)"))),
    };
    let digest = descriptor_digest(&d)?;
    let bytes = source.blob_bytes(&digest, d.size())?;
    Ok(Picked { digest, bytes, name, files: HashMap::new() })
}

/// Whether a ref name is a cosign artifact's tag (`sha256-<hex>.sig`, `.att`, `.sbom`).
fn is_cosign_tag(name: &str) -> bool {
    let tag = name.rsplit(':').next().unwrap_or(name);
    tag.strip_prefix("sha256-").and_then(|t| t.split_once('.')).is_some_and(|(hex, kind)| {
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && matches!(kind, "sig" | "att" | "sbom")
    })
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations().as_ref()?.get(REF_NAME).map(String::as_str)
}

/// An older `docker save` tar: `manifest.json` lists config and layer files
/// (uncompressed tars); a Docker v2 manifest is made from them, its digest
/// ours — and the layers are still checked against the config's DiffIDs.
fn legacy_manifest(source: &Source, name: Option<&str>) -> Result<Picked, LayoutError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let entries: Vec<Entry> = serde_json::from_slice(&source.document("manifest.json")?)
        .map_err(|e| invalid(format!("manifest.json: {e}")))?;
    let mut entries: Vec<Entry> = match name {
        None => entries,
        Some(want) => entries
            .into_iter()
            .filter(|e| e.repo_tags.iter().flatten().any(|t| t == want || t.split(':').next() == Some(want)))
            .collect(),
    };
    let e = match entries.len() {
        1 => entries.remove(0),
        0 => return Err(invalid("manifest.json names no such image")),
        n => return Err(invalid(format!("manifest.json lists {n} images: name one (--name)"))),
    };
    if e.layers.len() > MAX_LAYERS {
        return Err(invalid(format!("{} layers: at most {MAX_LAYERS}", e.layers.len())));
    }
    let mut files = HashMap::new();
    let mut describe = |file: &str, media_type: &str| -> Result<serde_json::Value, LayoutError> {
        let (r, size) = source.file(file)?;
        let mut h = Hashing::new(r);
        io::copy(&mut h, &mut io::sink()).map_err(|source| LayoutError::Io { path: file.into(), source })?;
        let (digest, read) = h.finish();
        if read != size {
            return Err(invalid(format!("{file}: truncated")));
        }
        let d = serde_json::json!({"mediaType": media_type, "digest": digest.as_str(), "size": size});
        files.insert(digest, file.to_owned());
        Ok(d)
    };
    let config = describe(&e.config, media::DOCKER_CONFIG)?;
    let layers = e.layers.iter().map(|l| describe(l, media::DOCKER_LAYER)).collect::<Result<Vec<_>, LayoutError>>()?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::DOCKER_MANIFEST,
        "config": config,
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| invalid(e.to_string()))?;
    let name = e.repo_tags.and_then(|t| t.into_iter().next());
    Ok(Picked { digest: Digest::of(&bytes), bytes, name, files })
}

#[cfg(test)]
#[path = "layout_tests.rs"]
mod tests;
