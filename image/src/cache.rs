//! The workers' root filesystem cache: one unpacked tree per layer chain
//! (and owner shift), shared read-only by every task of the image,
//! reference-counted and garbage-collected when no task uses it.
//!
//! A tree is unpacked into `tmp/<random>` — each layer fetched, its blob
//! checked against its digest and size and its tar against its DiffID while
//! it is applied ([`crate::apply_layer`]) — synced, and renamed to
//! `trees/<chain ID>-<shift>` only once every layer checked out; a tree that
//! is there is complete. What a crash left in `tmp/` is removed at open.
//!
//! `trees/` and `tmp/` stay 0700. With [`Exposure::ReadOnlyBind`] (the
//! worker's) a tree is reached only through a bind mount of it at
//! `rootfs/<key>`, read-only, `nosuid` and `nodev`: whoever can reach that
//! path (a task's root in its own user namespace must) can neither write
//! into the tree shared by every task of the image, nor gain privileges
//! from its set-ID files.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::digest::{Digest, Hashing};
use crate::layout::Compression;
use crate::unpack::{apply_layer, Budget, Owners, UnpackError};

/// One layer, as the manifest and config name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRef {
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// How the blob is compressed.
    pub compression: Compression,
    /// The uncompressed tar's digest.
    pub diff_id: Digest,
}

impl LayerRef {
    /// What the cache needs of a manifest's layer; `None` for a media type
    /// it cannot decompress (never one [`crate::parse`] accepted).
    pub fn of(l: &crate::Layer) -> Option<Self> {
        Some(Self {
            digest: l.digest.clone(),
            size: l.size,
            compression: Compression::of_media_type(&l.media_type)?,
            diff_id: l.diff_id.clone(),
        })
    }
}

/// The OCI chain ID of `diff_ids`: the first DiffID, then
/// `sha256(previous + " " + next)` for each next one.
pub fn chain_id(diff_ids: &[Digest]) -> Option<Digest> {
    let mut it = diff_ids.iter();
    let mut id = it.next()?.clone();
    for d in it {
        id = Digest::of(format!("{id} {d}").as_bytes());
    }
    Some(id)
}

/// Why a tree could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Fetching a blob failed.
    #[error("layer {digest}: {reason}")]
    Fetch { digest: Digest, reason: String },
    /// A blob or its tar is not what the image says.
    #[error("layer {digest}: {reason}")]
    Mismatch { digest: Digest, reason: String },
    /// The layer was refused while applied.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// The cache directory failed.
    #[error("rootfs cache {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// An image without layers.
    #[error("an image without layers")]
    NoLayers,
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io { path: path.display().to_string(), source }
}

/// Which trees tasks hold, and since when the others are unused.
#[derive(Debug, Default)]
struct Refs {
    held: HashMap<String, usize>,
    idle_since: HashMap<String, std::time::Instant>,
    /// Trees bind-mounted at `rootfs/<key>`.
    mounted: std::collections::HashSet<String>,
}

/// How tasks reach a tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// At `trees/<key>` itself (tests without root).
    Direct,
    /// Through a read-only, `nosuid`, `nodev` bind mount at `rootfs/<key>`.
    ReadOnlyBind,
}

/// The cache in one directory.
#[derive(Clone)]
pub struct RootfsCache {
    dir: PathBuf,
    refs: Arc<Mutex<Refs>>,
    opened: std::time::Instant,
    exposure: Exposure,
}

/// A tree in use by one task; released on drop.
pub struct Rootfs {
    path: PathBuf,
    key: String,
    refs: Arc<Mutex<Refs>>,
}

impl Rootfs {
    /// The tree's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let mut refs = self.refs.lock().expect("cache lock");
        if let Some(n) = refs.held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                refs.held.remove(&self.key);
                refs.idle_since.insert(self.key.clone(), std::time::Instant::now());
            }
        }
    }
}

impl std::fmt::Debug for Rootfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rootfs").field("path", &self.path).finish()
    }
}

impl RootfsCache {
    /// Opens (creating, 0700) the cache in `dir`, removing unfinished
    /// trees; tasks reach trees where they are ([`Exposure::Direct`]).
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        Self::open_with(dir, Exposure::Direct)
    }

    /// Opens the cache in `dir` with `exposure`. With
    /// [`Exposure::ReadOnlyBind`] the mounts a previous process left are
    /// detached first (its tasks ended with it).
    pub fn open_with(dir: &Path, exposure: Exposure) -> Result<Self, CacheError> {
        for d in [dir.to_owned(), dir.join("trees"), dir.join("rootfs"), dir.join("tmp")] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(io_at(&d))?;
        }
        let tmp = dir.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_at(&tmp))? {
            let p = e.map_err(io_at(&tmp))?.path();
            let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
        }
        let exposed = dir.join("rootfs");
        for e in fs::read_dir(&exposed).map_err(io_at(&exposed))? {
            let p = e.map_err(io_at(&exposed))?.path();
            let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
            // Empty once unmounted (a tree of an older layout goes too; a
            // mount that stayed is read-only and refuses the removal).
            let _ = fs::remove_dir(&p).or_else(|_| fs::remove_dir_all(&p));
        }
        Ok(Self { dir: dir.to_owned(), refs: Arc::default(), opened: std::time::Instant::now(), exposure })
    }

    /// Makes tree `key` reachable as `exposure` says; the path tasks use.
    fn expose(&self, key: &str, refs: &mut Refs) -> Result<PathBuf, CacheError> {
        let tree = self.dir.join("trees").join(key);
        if self.exposure == Exposure::Direct {
            return Ok(tree);
        }
        let at = self.dir.join("rootfs").join(key);
        if refs.mounted.contains(key) {
            return Ok(at);
        }
        use rustix::mount::{mount_bind, mount_remount, MountFlags};
        match fs::create_dir(&at) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_at(&at)(e)),
            _ => {}
        }
        mount_bind(&tree, &at).map_err(|e| io_at(&at)(e.into()))?;
        let flags = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
        if let Err(e) = mount_remount(&at, flags, c"") {
            let _ = rustix::mount::unmount(&at, rustix::mount::UnmountFlags::DETACH);
            return Err(io_at(&at)(e.into()));
        }
        refs.mounted.insert(key.to_owned());
        Ok(at)
    }

    fn key(layers: &[LayerRef], owners: Owners) -> Result<String, CacheError> {
        let ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let chain = chain_id(&ids).ok_or(CacheError::NoLayers)?;
        let shift = match owners {
            Owners::Shift(off) => off.to_string(),
            Owners::Ignore => "asis".to_owned(),
        };
        Ok(format!("{}-{shift}", chain.hex()))
    }

    /// Whether the tree of `layers` is unpacked already.
    pub fn has(&self, layers: &[LayerRef], owners: Owners) -> bool {
        Self::key(layers, owners).is_ok_and(|k| self.dir.join("trees").join(k).is_dir())
    }

    /// The tree of `layers` (owned as `owners` says), unpacked now if it is
    /// not yet, each blob from `fetch`; held until the [`Rootfs`] drops.
    pub fn acquire(
        &self,
        layers: &[LayerRef],
        owners: Owners,
        mut fetch: impl FnMut(&LayerRef) -> io::Result<Box<dyn Read>>,
    ) -> Result<Rootfs, CacheError> {
        let key = Self::key(layers, owners)?;
        let path = self.dir.join("trees").join(&key);
        // Held before it is looked for, so that garbage collection cannot
        // take it between the look and the use.
        let mut refs = self.refs.lock().expect("cache lock");
        *refs.held.entry(key.clone()).or_default() += 1;
        refs.idle_since.remove(&key);
        drop(refs);
        let mut held = Rootfs { path: path.clone(), key: key.clone(), refs: self.refs.clone() };
        if !path.is_dir() {
            // Two tasks of one image may unpack at once: each in its own place.
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = self.dir.join("tmp").join(format!("{key}.{}.{n}", std::process::id()));
            fs::DirBuilder::new().mode(0o755).create(&tmp).map_err(io_at(&tmp))?;
            // Whatever the umask: tasks in user namespaces of their own reach the tree as others.
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io_at(&tmp))?;
            }
            let unpacked = unpack_all(&tmp, layers, owners, &mut fetch);
            if let Err(e) = unpacked {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
            // On disk before it is named complete.
            let synced = fs::File::open(&tmp).and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from));
            if let Err(e) = synced {
                let _ = fs::remove_dir_all(&tmp);
                return Err(io_at(&tmp)(e));
            }
            if let Err(e) = fs::rename(&tmp, &path) {
                let _ = fs::remove_dir_all(&tmp);
                // Another task of the image finished first: use its tree.
                if !path.is_dir() {
                    return Err(io_at(&path)(e));
                }
            }
        }
        let mut refs = self.refs.lock().expect("cache lock");
        held.path = self.expose(&key, &mut refs)?;
        drop(refs);
        Ok(held)
    }

    /// Detaches every exposure mount (the worker stops: its tasks are gone);
    /// the trees stay for the next start.
    pub fn unmount_all(&self) {
        let mut refs = self.refs.lock().expect("cache lock");
        for key in refs.mounted.drain() {
            let at = self.dir.join("rootfs").join(&key);
            let _ = rustix::mount::unmount(&at, rustix::mount::UnmountFlags::DETACH);
            let _ = fs::remove_dir(&at);
        }
    }

    /// Where a caller may keep files for a tree being made (emptied at open).
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Removes every tree no task holds nor has released within `grace`
    /// (a tree found at open counts as released then); returns how many.
    pub fn collect_garbage(&self, grace: std::time::Duration) -> Result<usize, CacheError> {
        let mut refs = self.refs.lock().expect("cache lock");
        let root = self.dir.join("trees");
        let mut removed = 0;
        for e in fs::read_dir(&root).map_err(io_at(&root))? {
            let e = e.map_err(io_at(&root))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if refs.held.contains_key(&name) {
                continue;
            }
            let since = *refs.idle_since.entry(name.clone()).or_insert(self.opened);
            if since.elapsed() >= grace {
                refs.idle_since.remove(&name);
                if refs.mounted.remove(&name) {
                    let at = self.dir.join("rootfs").join(&name);
                    rustix::mount::unmount(&at, rustix::mount::UnmountFlags::DETACH)
                        .map_err(|e| io_at(&at)(e.into()))?;
                    let _ = fs::remove_dir(&at);
                }
                fs::remove_dir_all(e.path()).map_err(io_at(&e.path()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn unpack_all(
    root: &Path,
    layers: &[LayerRef],
    owners: Owners,
    fetch: &mut impl FnMut(&LayerRef) -> io::Result<Box<dyn Read>>,
) -> Result<(), CacheError> {
    let dir = fs::File::open(root).map_err(io_at(root))?;
    let mut budget = Budget::default();
    for l in layers {
        let blob = fetch(l).map_err(|e| CacheError::Fetch { digest: l.digest.clone(), reason: e.to_string() })?;
        let mismatch = |reason: String| CacheError::Mismatch { digest: l.digest.clone(), reason };
        let mut outer = Hashing::new(blob.take(l.size.saturating_add(1)));
        {
            let tar = l.compression.reader(&mut outer).map_err(|e| mismatch(format!("cannot decompress: {e}")))?;
            let mut inner = Hashing::new(tar);
            apply_layer(dir.as_fd(), &mut inner, &mut budget, owners)?;
            // The tar's end: padding after its last blocks counts toward its digest.
            io::copy(&mut inner, &mut io::sink()).map_err(|e| mismatch(format!("cannot decompress: {e}")))?;
            let (diff, _) = inner.finish();
            if diff != l.diff_id {
                return Err(mismatch(format!("its tar hashes to {diff}, the image's DiffID is {}", l.diff_id)));
            }
        }
        io::copy(&mut outer, &mut io::sink()).map_err(|e| mismatch(e.to_string()))?;
        let (digest, size) = outer.finish();
        if size != l.size || digest != l.digest {
            return Err(mismatch(format!("{size} bytes hashing to {digest}, not {} bytes", l.size)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sha2::{Digest as _, Sha256};

    use super::*;
    use crate::build::build_layout;
    use crate::layout::{blob_path, load, Platform, Source};

    fn image(dir: &Path) -> (PathBuf, Vec<LayerRef>) {
        let root = dir.join("src");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/motd"), b"hi\n").unwrap();
        let out = dir.join("layout");
        build_layout(&root, &out, "x").unwrap();
        let img = load(&Source::open(&out).unwrap(), &Platform::default(), None).unwrap();
        let layers = img.layers.iter().map(|l| LayerRef::of(l).unwrap()).collect();
        (out, layers)
    }

    fn from(out: &Path) -> impl FnMut(&LayerRef) -> io::Result<Box<dyn Read>> + '_ {
        move |l| Ok(Box::new(fs::File::open(out.join(blob_path(&l.digest)))?) as Box<dyn Read>)
    }

    #[test]
    fn a_tree_is_unpacked_once_shared_and_collected_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let (out, layers) = image(dir.path());
        let cache = RootfsCache::open(&dir.path().join("cache")).unwrap();
        let mut fetches = 0;
        let a = cache
            .acquire(&layers, Owners::Ignore, |l| {
                fetches += 1;
                from(&out)(l)
            })
            .unwrap();
        assert_eq!(fs::read(a.path().join("etc/motd")).unwrap(), b"hi\n");
        // A second task of the image: no fetch.
        let b = cache.acquire(&layers, Owners::Ignore, |_| panic!("fetched again")).unwrap();
        assert_eq!((a.path(), fetches), (b.path(), 1));
        drop(a);
        assert_eq!(cache.collect_garbage(std::time::Duration::ZERO).unwrap(), 0, "a tree in use was collected");
        drop(b);
        assert_eq!(cache.collect_garbage(std::time::Duration::ZERO).unwrap(), 1);
        assert!(!cache.has(&layers, Owners::Ignore));
    }

    #[test]
    fn a_blob_or_tar_that_is_not_the_images_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (out, layers) = image(dir.path());
        let cache = RootfsCache::open(&dir.path().join("cache")).unwrap();
        // The right tar under another DiffID.
        let mut wrong = layers.clone();
        wrong[0].diff_id = Digest::of(b"another tar");
        let e = cache.acquire(&wrong, Owners::Ignore, from(&out)).unwrap_err();
        assert!(e.to_string().contains("DiffID"), "{e}");
        // A blob whose digest is not the manifest's.
        let mut wrong = layers.clone();
        wrong[0].digest = Digest::of(b"another blob");
        let mut blob = Some(fs::read(out.join(blob_path(&layers[0].digest))).unwrap());
        let e = cache
            .acquire(&wrong, Owners::Ignore, |_| Ok(Box::new(io::Cursor::new(blob.take().unwrap())) as Box<dyn Read>))
            .unwrap_err();
        assert!(e.to_string().contains("hashing to"), "{e}");
        // A fetch that fails.
        let e = cache.acquire(&layers, Owners::Ignore, |_| Err(io::Error::other("refused"))).unwrap_err();
        assert!(matches!(e, CacheError::Fetch { .. }), "{e}");
        assert_eq!(fs::read_dir(dir.path().join("cache/trees")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(dir.path().join("cache/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn an_exposed_tree_is_read_only_nosuid_and_unmounted_when_collected() {
        if !rustix::process::geteuid().is_root() {
            return eprintln!("skipped: mounts need root");
        }
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::create_dir_all(rootfs.join("tmp")).unwrap();
        fs::write(rootfs.join("bin/tool"), b"x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(rootfs.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        let out = dir.path().join("layout");
        crate::build_layout(&rootfs, &out, "t:1").unwrap();
        let image = crate::load(&crate::Source::open(&out).unwrap(), &Default::default(), None).unwrap();
        let layers: Vec<LayerRef> = image.layers.iter().map(|l| LayerRef::of(l).unwrap()).collect();
        let cache = RootfsCache::open_with(&dir.path().join("cache"), Exposure::ReadOnlyBind).unwrap();
        let t = cache.acquire(&layers, Owners::Shift(0), from(&out)).unwrap();
        assert!(t.path().starts_with(dir.path().join("cache/rootfs")), "{:?}", t.path());
        // The shared tree cannot be written through the exposure, even where it is 1777.
        let e = fs::write(t.path().join("tmp/planted"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");
        let st = rustix::fs::statvfs(t.path()).unwrap();
        assert!(st.f_flag.contains(rustix::fs::StatVfsMountFlags::NOSUID));
        assert!(st.f_flag.contains(rustix::fs::StatVfsMountFlags::NODEV));
        assert_eq!(fs::metadata(t.path().join("bin/tool")).unwrap().permissions().mode() & 0o7777, 0o4755);
        let at = t.path().to_owned();
        drop(t);
        assert_eq!(cache.collect_garbage(std::time::Duration::ZERO).unwrap(), 1);
        assert!(!at.exists(), "the exposure outlived its tree");
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(at.to_str().unwrap()), "still mounted");
    }

    fn libc_erofs() -> i32 {
        rustix::io::Errno::ROFS.raw_os_error()
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        let want = format!("sha256:{}", hex::encode(Sha256::digest(format!("{a} {b}").as_bytes())));
        assert_eq!(chain_id(&[a, b]).unwrap().as_str(), want);
        assert_eq!(chain_id(&[]), None);
    }
}
