//! A content-addressed blob store on disk: `blobs/sha256/<hex>`.
//!
//! A blob is written to a temporary file under `blobs/tmp/`, checked
//! against the digest and size it was announced with, fsynced, renamed to
//! its name, and the directory fsynced: a blob that is there is whole and is
//! what its name says; a crash leaves at most a temporary file, removed when
//! the store is next opened. Directories are 0700, blobs 0600.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::{Digest, Hashing};

/// Why a blob was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the store failed.
    #[error("blob store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// What was written is not the blob announced.
    #[error("blob {digest}: {reason}")]
    Mismatch { digest: Digest, reason: String },
}

/// The store under one directory.
#[derive(Clone, Debug)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.display().to_string(), source }
}

impl BlobStore {
    /// Opens (creating) the store in `dir`, removing what an interrupted
    /// write left.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let blobs = dir.join("sha256");
        let tmp = dir.join("tmp");
        for d in [dir, &blobs, &tmp] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(d).map_err(io_at(d))?;
        }
        for e in fs::read_dir(&tmp).map_err(io_at(&tmp))? {
            let e = e.map_err(io_at(&tmp))?;
            let _ = fs::remove_file(e.path());
        }
        Ok(Self { blobs, tmp })
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.hex())
    }

    /// The size of blob `d`, if the store holds it.
    pub fn size(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.path(d)).ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    /// Whether the store holds blob `d`.
    pub fn has(&self, d: &Digest) -> bool {
        self.size(d).is_some()
    }

    /// Blob `d`, to read.
    pub fn open_blob(&self, d: &Digest) -> Result<File, StoreError> {
        let p = self.path(d);
        File::open(&p).map_err(io_at(&p))
    }

    /// Starts writing blob `digest` of `size` bytes.
    pub fn writer(&self, digest: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let tmp = self.tmp.join(format!("{}.{:016x}", digest.hex(), rand::random::<u64>()));
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_at(&tmp))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest: self.path(digest),
            dir: self.blobs.clone(),
            digest: digest.clone(),
            size,
            written: 0,
            hasher: Sha256::new(),
        })
    }

    /// Stores `bytes` as blob `digest`.
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut w = self.writer(digest, bytes.len() as u64)?;
        w.write_chunk(bytes)?;
        w.commit()
    }

    /// Re-reads blob `d` and checks it is what its name says.
    pub fn verify(&self, d: &Digest) -> Result<u64, StoreError> {
        let mut h = Hashing::new(self.open_blob(d)?);
        io::copy(&mut h, &mut io::sink()).map_err(io_at(&self.path(d)))?;
        let (actual, size) = h.finish();
        if actual != *d {
            return Err(StoreError::Mismatch { digest: d.clone(), reason: format!("on disk it hashes to {actual}") });
        }
        Ok(size)
    }

    /// Marks blob `d` as just written (its age starts again); nothing if absent.
    pub fn touch(&self, d: &Digest) {
        if let Ok(f) = fs::File::options().write(true).open(self.path(d)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// How long ago blob `d` was written, if it is here.
    pub fn age(&self, d: &Digest) -> Option<std::time::Duration> {
        let modified = fs::metadata(self.path(d)).and_then(|m| m.modified()).ok()?;
        Some(modified.elapsed().unwrap_or_default())
    }

    /// Removes blob `d` (nothing if absent).
    pub fn remove(&self, d: &Digest) -> Result<(), StoreError> {
        let p = self.path(d);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(&p)(e)),
            _ => Ok(()),
        }
    }

    /// Every blob held.
    pub fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.blobs).map_err(io_at(&self.blobs))? {
            let e = e.map_err(io_at(&self.blobs))?;
            if let Some(d) = e.file_name().to_str().and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()) {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// A blob being written; removed unless committed.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    digest: Digest,
    size: u64,
    written: u64,
    hasher: Sha256,
}

impl BlobWriter {
    /// Appends `chunk`, refusing more bytes than announced.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if self.written + chunk.len() as u64 > self.size {
            return Err(StoreError::Mismatch {
                digest: self.digest.clone(),
                reason: format!("more than the {} bytes announced", self.size),
            });
        }
        let f = self.file.as_mut().expect("an open blob file");
        f.write_all(chunk).map_err(io_at(&self.tmp))?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks size and digest, makes the blob durable and gives it its name.
    pub fn commit(mut self) -> Result<(), StoreError> {
        let mismatch = |reason: String| StoreError::Mismatch { digest: self.digest.clone(), reason };
        if self.written != self.size {
            return Err(mismatch(format!("{} bytes, {} announced", self.written, self.size)));
        }
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.digest {
            return Err(mismatch(format!("its content hashes to {actual}")));
        }
        let f = self.file.take().expect("an open blob file");
        f.sync_all().map_err(io_at(&self.tmp))?;
        drop(f);
        fs::rename(&self.tmp, &self.dest).map_err(io_at(&self.dest))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_at(&self.dir))?;
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_stored_only_whole_and_as_announced() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        store.put(&d, b"hello").unwrap();
        assert_eq!((store.has(&d), store.size(&d)), (true, Some(5)));
        assert_eq!(store.verify(&d).unwrap(), 5);
        assert_eq!(store.list().unwrap(), vec![d.clone()]);

        // Other content under that name, too many or too few bytes: refused, nothing left.
        let other = Digest::of(b"other");
        assert!(matches!(store.put(&other, b"hellO"), Err(StoreError::Mismatch { .. })));
        let mut w = store.writer(&other, 3).unwrap();
        assert!(w.write_chunk(b"other").is_err());
        drop(w);
        let mut w = store.writer(&other, 5).unwrap();
        w.write_chunk(b"oth").unwrap();
        assert!(w.commit().is_err());
        assert!(!store.has(&other));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "temporary files left");

        // A flipped bit on disk is found.
        fs::write(dir.path().join("sha256").join(d.hex()), b"hellO").unwrap();
        assert!(matches!(store.verify(&d), Err(StoreError::Mismatch { .. })));
        store.remove(&d).unwrap();
        assert!(!store.has(&d));
    }

    #[test]
    fn what_an_interrupted_write_left_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = Digest::of(b"big");
        let mut w = store.writer(&d, 3).unwrap();
        w.write_chunk(b"bi").unwrap();
        std::mem::forget(w); // as a crash would
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(!store.has(&d));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(dir.path().join("sha256")).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
