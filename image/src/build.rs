//! Writing an OCI image layout from a root filesystem directory: one gzip
//! layer, a config for linux/amd64 and a manifest named in `index.json` —
//! what `secretctl image build-rootfs` does, so that images can be made
//! without a registry or a container engine.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::layout::media;

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), count: 0 }
    }

    fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_hasher(self.hasher), self.count)
    }
}

/// Writes an OCI image layout of `rootfs` into `out` (created, or an
/// existing layout to add to) named `name` (`org.opencontainers.image.ref.name`);
/// returns the manifest's digest. Regular files, directories and symlinks
/// are taken (symlinks as links, never followed), with their modes, owners
/// and mtimes; other file types are refused.
pub fn build_layout(rootfs: &Path, out: &Path, name: &str) -> io::Result<Digest> {
    let blobs = out.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let tmp = blobs.join(format!(".layer-{}.tmp", std::process::id()));
    let (layer_digest, layer_size, diff_id) = {
        let file = HashingWriter::new(File::create(&tmp)?);
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut builder = tar::Builder::new(HashingWriter::new(gz));
        builder.follow_symlinks(false);
        append_tree(&mut builder, rootfs, Path::new(""))?;
        let (gz, diff_id, _) = builder.into_inner()?.finish();
        let (mut file, digest, size) = gz.finish()?.finish();
        file.flush()?;
        file.sync_all()?;
        (digest, size, diff_id)
    };
    fs::rename(&tmp, blobs.join(layer_digest.hex()))?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.as_str()]},
    });
    let (config_digest, config_size) = write_blob(&blobs, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::MANIFEST,
        "config": {"mediaType": media::CONFIG, "digest": config_digest.as_str(), "size": config_size},
        "layers": [{"mediaType": media::LAYER_GZIP, "digest": layer_digest.as_str(), "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = write_blob(&blobs, &serde_json::to_vec(&manifest)?)?;
    let index_path = out.join("index.json");
    let mut index: serde_json::Value = match fs::read(&index_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(io::Error::other)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            serde_json::json!({"schemaVersion": 2, "mediaType": media::INDEX, "manifests": []})
        }
        Err(e) => return Err(e),
    };
    let entries = index["manifests"].as_array_mut().ok_or_else(|| io::Error::other("index.json has no manifests"))?;
    entries.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != name);
    entries.push(serde_json::json!({
        "mediaType": media::MANIFEST,
        "digest": manifest_digest.as_str(),
        "size": manifest_size,
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"org.opencontainers.image.ref.name": name},
    }));
    write_atomic(&out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    write_atomic(&index_path, &serde_json::to_vec(&index)?)?;
    Ok(manifest_digest)
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> io::Result<(Digest, u64)> {
    let d = Digest::of(bytes);
    write_atomic(&blobs.join(d.hex()), bytes)?;
    Ok((d, bytes.len() as u64))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Appends `dir` (at `at` in the archive) and everything below it, sorted by name.
fn append_tree<W: Write>(builder: &mut tar::Builder<W>, dir: &Path, at: &Path) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort();
    for n in names {
        let path = dir.join(&n);
        let inside = at.join(&n);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_uid(u64::from(meta.uid()));
        header.set_gid(u64::from(meta.gid()));
        if ft.is_dir() {
            header.set_size(0);
            builder.append_data(&mut header, &inside, io::empty())?;
            append_tree(builder, &path, &inside)?;
        } else if ft.is_symlink() {
            header.set_size(0);
            builder.append_link(&mut header, &inside, fs::read_link(&path)?)?;
        } else if ft.is_file() {
            builder.append_data(&mut header, &inside, File::open(&path)?)?;
        } else {
            return Err(io::Error::other(format!(
                "{}: only files, directories and symlinks go into an image",
                path.display()
            )));
        }
    }
    Ok(())
}
