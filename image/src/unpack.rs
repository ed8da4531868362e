//! Applying an image layer (an uncompressed tar) onto a root filesystem
//! directory — hostile input.
//!
//! Never `tar`'s `unpack`: entries are read with `Archive::entries` and each
//! is created with `*at` calls relative to its parent directory, which is
//! opened with `openat2(RESOLVE_IN_ROOT)` from the root: every path,
//! including the image's own symlinks on the way, resolves as if the root
//! were `/`, so nothing is created, removed or linked outside it.
//!
//! * Names are split into components; `..` anywhere is refused (a layer that
//!   climbs is malformed, not something to clean up), as are over-long names.
//! * Hardlink targets are paths in the root, resolved the same way.
//! * Symlinks are created as they are: they resolve inside the root whenever
//!   we follow them, as they will inside the container.
//! * Whiteouts (`.wh.NAME`) remove `NAME` in their own directory only; an
//!   opaque marker (`.wh..wh..opq`) removes everything in its directory this
//!   layer did not create, wherever it appears in the tar (as containerd).
//! * Device nodes and `trusted.*` / `security.*` extended attributes are refused.
//! * The bytes written (sparse files counted at their full size) and the
//!   number of entries are bounded across all the layers of an image
//!   ([`Budget`]).
//!
//! On error the root is left half-written: the caller unpacks into a fresh
//! directory and discards it.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;

/// Whiteout prefix: `.wh.NAME` removes `NAME`.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The opaque marker: hides the lower layers' contents of its directory.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Longest path in a layer, bytes.
const MAX_PATH: usize = 4096;
/// Longest component of a path, bytes.
const MAX_NAME: usize = 255;
/// Deepest path, components.
const MAX_DEPTH: usize = 128;

/// What all the layers of one image may write, together.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Bytes of file content left (a sparse file counts at its full size).
    pub bytes: u64,
    /// Entries left (whiteouts included).
    pub entries: u64,
}

impl Budget {
    /// 8 GiB and 500,000 entries.
    pub const DEFAULT: Budget = Budget { bytes: 8 << 30, entries: 500_000 };
}

impl Default for Budget {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How entries' owners are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owners {
    /// As the tar says, plus `offset` (a user namespace's first host ID).
    Shift(u32),
    /// Left as the unpacking process's (tests without root).
    Ignore,
}

/// Why a layer was not applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer holds something this unpacker refuses.
    #[error("layer entry {path:?}: {reason}")]
    Refused { path: String, reason: String },
    /// The image writes more than its budget.
    #[error("layer entry {path:?}: the image exceeds {limit}")]
    TooLarge { path: String, limit: String },
    /// The tar stream itself is unreadable.
    #[error("layer: {0}")]
    Tar(#[source] io::Error),
    /// Creating an entry failed.
    #[error("layer entry {path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// What one layer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created or replaced.
    pub entries: u64,
    /// Paths removed by whiteouts.
    pub whiteouts: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// A path inside the root: its components, none of them `..`, `.` or empty.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RelPath(Vec<Vec<u8>>);

impl RelPath {
    /// Splits a tar name (leading `/` and `./` ignored) into components,
    /// refusing `..`, over-long names and paths, and NUL bytes.
    fn parse(raw: &[u8]) -> Result<Self, String> {
        if raw.len() > MAX_PATH {
            return Err(format!("a path longer than {MAX_PATH} bytes"));
        }
        if raw.contains(&0) {
            return Err("a NUL byte in a path".into());
        }
        let mut parts = Vec::new();
        for c in raw.split(|b| *b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => return Err("a path that climbs out with `..`".into()),
                c if c.len() > MAX_NAME => return Err(format!("a name longer than {MAX_NAME} bytes")),
                c => parts.push(c.to_vec()),
            }
        }
        if parts.len() > MAX_DEPTH {
            return Err(format!("a path deeper than {MAX_DEPTH}"));
        }
        Ok(Self(parts))
    }

    fn split_last(&self) -> Option<(RelPath, &[u8])> {
        let (last, parent) = self.0.split_last()?;
        Some((RelPath(parent.to_vec()), last))
    }

    fn join(&self, name: &[u8]) -> RelPath {
        let mut p = self.0.clone();
        p.push(name.to_vec());
        RelPath(p)
    }

    /// The path relative to the root, `.` for the root itself.
    fn to_bytes(&self) -> Vec<u8> {
        if self.0.is_empty() {
            return b".".to_vec();
        }
        self.0.join(&b'/')
    }
}

/// Applies the layer tar read from `layer` onto `root` (a directory), within
/// `budget` (which it spends), with `owners`.
pub fn apply_layer(
    root: BorrowedFd<'_>,
    layer: impl Read,
    budget: &mut Budget,
    owners: Owners,
) -> Result<LayerStats, UnpackError> {
    let mut archive = tar::Archive::new(layer);
    let mut stats = LayerStats::default();
    // Paths this layer created: an opaque marker keeps them.
    let mut created: HashSet<RelPath> = HashSet::new();
    let mut opaque: Vec<RelPath> = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).chars().take(200).collect::<String>();
        let refuse = |reason: String| UnpackError::Refused { path: shown.clone(), reason };
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            continue;
        }
        if budget.entries == 0 {
            return Err(UnpackError::TooLarge { path: shown, limit: "its entry count".into() });
        }
        budget.entries -= 1;
        let path = RelPath::parse(&raw).map_err(refuse)?;
        let Some((parent, name)) = path.split_last() else {
            // The root itself ("./"): its metadata is the cache's, not the image's.
            continue;
        };
        if let Some(xattrs) = entry.pax_extensions().map_err(UnpackError::Tar)? {
            for ext in xattrs {
                let ext = ext.map_err(UnpackError::Tar)?;
                let key = ext.key_bytes();
                if let Some(attr) = key.strip_prefix(b"SCHILY.xattr.") {
                    if attr.starts_with(b"trusted.") || attr.starts_with(b"security.") {
                        return Err(refuse(format!(
                            "the extended attribute {} is refused",
                            String::from_utf8_lossy(attr)
                        )));
                    }
                }
            }
        }
        let io = |source: io::Error| UnpackError::Io { path: shown.clone(), source };
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if name == OPAQUE_MARKER.as_bytes() {
                opaque.push(parent);
                continue;
            }
            if target.is_empty() || target == b"." || target == b".." || target.starts_with(WHITEOUT_PREFIX.as_bytes())
            {
                return Err(refuse("a whiteout that names no entry of its directory".into()));
            }
            let dir = match open_dir(root, &parent) {
                Ok(d) => d,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(io(e.into())),
            };
            if remove_all(dir.as_fd(), target, 0).map_err(io)? {
                stats.whiteouts += 1;
            }
            continue;
        }
        let header = entry.header();
        let mode = Mode::from_raw_mode(header.mode().map_err(UnpackError::Tar)? & 0o7777);
        let (uid, gid) = (header.uid().map_err(UnpackError::Tar)?, header.gid().map_err(UnpackError::Tar)?);
        let mtime = header.mtime().unwrap_or(0);
        let owner = match owners {
            Owners::Ignore => None,
            Owners::Shift(off) => {
                let shift = |id: u64| u32::try_from(id).ok().and_then(|id| id.checked_add(off));
                match (shift(uid), shift(gid)) {
                    (Some(u), Some(g)) => Some((u, g)),
                    _ => return Err(refuse(format!("owner {uid}:{gid} is out of range"))),
                }
            }
        };
        let dir = match ensure_dir(root, &parent, owners) {
            Ok(d) => d,
            Err(Errno::EXIST | Errno::NOTDIR) => {
                return Err(refuse("its directory is a file, or reached through a symlink to nothing".into()))
            }
            Err(e) => return Err(io(e.into())),
        };
        let dir = dir.as_fd();
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        remove_all(dir, name, 0).map_err(io)?;
                        rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).map_err(|e| io(e.into()))?;
                    }
                    Err(Errno::NOENT) => {
                        rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).map_err(|e| io(e.into()))?
                    }
                    Err(e) => return Err(io(e.into())),
                }
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io(e.into()))?;
                finish(fd.as_fd(), owner, mode, mtime).map_err(|e| io(e.into()))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // A sparse file is written at its full size: its real size counts.
                let stored = entry.header().entry_size().map_err(UnpackError::Tar)?;
                let real = entry.header().as_gnu().and_then(|g| g.real_size().ok()).unwrap_or(0);
                let size = stored.max(real).max(entry.size());
                if size > budget.bytes {
                    return Err(UnpackError::TooLarge { path: shown, limit: "its size budget".into() });
                }
                remove_all(dir, name, 0).map_err(io)?;
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io(e.into()))?;
                let mut file = std::fs::File::from(fd);
                let written = copy_within(&mut entry, &mut file, budget.bytes).map_err(io)?;
                let Some(written) = written else {
                    return Err(UnpackError::TooLarge { path: shown, limit: "its size budget".into() });
                };
                budget.bytes -= written;
                stats.bytes += written;
                finish(file.as_fd(), owner, mode, mtime).map_err(|e| io(e.into()))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| refuse("a symlink without a target".into()))?;
                if target.is_empty() || target.len() > MAX_PATH || target.contains(&0) {
                    return Err(refuse("a symlink target that is empty, too long or holds a NUL".into()));
                }
                remove_all(dir, name, 0).map_err(io)?;
                rustix::fs::symlinkat(&*target, dir, name).map_err(|e| io(e.into()))?;
                chown_nofollow(dir, name, owner).map_err(|e| io(e.into()))?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| refuse("a hardlink without a target".into()))?;
                let target = RelPath::parse(&target).map_err(|e| refuse(format!("hardlink target: {e}")))?;
                let Some((tparent, tname)) = target.split_last() else {
                    return Err(refuse("a hardlink to the root".into()));
                };
                if target == path {
                    return Err(refuse("a hardlink to itself".into()));
                }
                let tdir = open_dir(root, &tparent).map_err(|e| refuse(format!("hardlink target: {e}")))?;
                remove_all(dir, name, 0).map_err(io)?;
                // No AT_SYMLINK_FOLLOW: a target that is a symlink is linked
                // itself, never what it points to.
                rustix::fs::linkat(tdir.as_fd(), tname, dir, name, AtFlags::empty())
                    .map_err(|e| refuse(format!("hardlink target: {e}")))?;
            }
            tar::EntryType::Fifo => {
                remove_all(dir, name, 0).map_err(io)?;
                rustix::fs::mknodat(dir, name, FileType::Fifo, mode, 0).map_err(|e| io(e.into()))?;
                chown_nofollow(dir, name, owner).map_err(|e| io(e.into()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refuse("a device node is refused".into()));
            }
            other => return Err(refuse(format!("an entry of type {other:?} is refused"))),
        }
        created.insert(path);
        stats.entries += 1;
    }
    for dir in opaque {
        let fd = match open_dir(root, &dir) {
            Ok(d) => d,
            Err(Errno::NOENT) => continue,
            Err(e) => {
                return Err(UnpackError::Io { path: String::from_utf8_lossy(&dir.to_bytes()).into(), source: e.into() })
            }
        };
        stats.whiteouts += remove_unlisted(fd.as_fd(), &dir, &created, 0)
            .map_err(|source| UnpackError::Io { path: String::from_utf8_lossy(&dir.to_bytes()).into(), source })?;
    }
    Ok(stats)
}

/// Opens directory `path` of the root, resolved inside it.
fn open_dir(root: BorrowedFd<'_>, path: &RelPath) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        root,
        path.to_bytes(),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Opens directory `path` of the root, creating what is missing of it
/// (0755; owned as `owners` says for ID 0).
fn ensure_dir(root: BorrowedFd<'_>, path: &RelPath, owners: Owners) -> Result<OwnedFd, Errno> {
    match open_dir(root, path) {
        Err(Errno::NOENT) => {}
        other => return other,
    }
    let mut at = open_dir(root, &RelPath(Vec::new()))?;
    for (i, c) in path.0.iter().enumerate() {
        let prefix = RelPath(path.0[..=i].to_vec());
        match open_dir(root, &prefix) {
            Ok(fd) => at = fd,
            Err(Errno::NOENT) => {
                rustix::fs::mkdirat(at.as_fd(), c.as_slice(), Mode::from_raw_mode(0o755))?;
                let fd = open_dir(root, &prefix)?;
                // 0755 whatever the umask: a directory the layer did not list.
                rustix::fs::fchmod(fd.as_fd(), Mode::from_raw_mode(0o755))?;
                if let Owners::Shift(off) = owners {
                    rustix::fs::fchown(
                        fd.as_fd(),
                        Some(rustix::fs::Uid::from_raw(off)),
                        Some(rustix::fs::Gid::from_raw(off)),
                    )?;
                }
                at = fd;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// Gives `name` in `dir` (a symlink itself, never what it points to) `owner`, if any.
fn chown_nofollow(dir: BorrowedFd<'_>, name: &[u8], owner: Option<(u32, u32)>) -> Result<(), Errno> {
    let Some((u, g)) = owner else { return Ok(()) };
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(u)),
        Some(rustix::fs::Gid::from_raw(g)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// Owner (before the mode: chown clears set-ID bits), mode and mtime of an open entry.
fn finish(fd: BorrowedFd<'_>, owner: Option<(u32, u32)>, mode: Mode, mtime: u64) -> Result<(), Errno> {
    if let Some((u, g)) = owner {
        rustix::fs::fchown(fd, Some(rustix::fs::Uid::from_raw(u)), Some(rustix::fs::Gid::from_raw(g)))?;
    }
    rustix::fs::fchmod(fd, mode)?;
    let t = Timespec { tv_sec: mtime.min(i64::MAX as u64) as i64, tv_nsec: 0 };
    rustix::fs::futimens(fd, &Timestamps { last_access: t, last_modification: t })
}

/// Copies `from` into `to`, at most `limit` bytes: `None` if there was more.
fn copy_within(from: &mut impl Read, to: &mut impl Write, limit: u64) -> io::Result<Option<u64>> {
    let copied = io::copy(&mut from.take(limit), to)?;
    let mut probe = [0u8; 1];
    if copied == limit && from.read(&mut probe)? > 0 {
        return Ok(None);
    }
    Ok(Some(copied))
}

/// Removes `name` in `dir` (a directory with all it holds); whether it existed.
fn remove_all(dir: BorrowedFd<'_>, name: &[u8], depth: usize) -> io::Result<bool> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        if depth > 4 * MAX_DEPTH {
            return Err(io::Error::other("directories nested too deep to remove"));
        }
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        for child in children(sub.as_fd())? {
            remove_all(sub.as_fd(), &child, depth + 1)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(true)
}

/// Removes everything below `dir` (at `path`) that is not in `keep`,
/// descending into what is kept; how many entries it removed.
fn remove_unlisted(dir: BorrowedFd<'_>, path: &RelPath, keep: &HashSet<RelPath>, depth: usize) -> io::Result<u64> {
    let mut removed = 0;
    for child in children(dir)? {
        let child_path = path.join(&child);
        if !keep.contains(&child_path) {
            removed += u64::from(remove_all(dir, &child, depth + 1)?);
            continue;
        }
        let st = rustix::fs::statat(dir, child.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory && depth < 4 * MAX_DEPTH {
            let sub = rustix::fs::openat(
                dir,
                child.as_slice(),
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            removed += remove_unlisted(sub.as_fd(), &child_path, keep, depth + 1)?;
        }
    }
    Ok(removed)
}

/// The names in directory `dir`, but `.` and `..`.
fn children(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    Ok(names)
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
