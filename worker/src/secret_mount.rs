//! A task's secrets on a tmpfs of its own (invariant 6).
//!
//! Per task: a fresh tmpfs (`nodev,nosuid,noexec`, size-limited, root mode
//! 0700) that `statfs` must report as tmpfs — otherwise the task fails, there is
//! no fallback to disk. Inside it a `secrets/` directory (0755, owned by the
//! task's root, so that a non-root container user can traverse it) holds one
//! file per reference with its uid, gid and mode; it is what gets bind-mounted
//! read-only at `/run/secrets` in the container. Owners are the task's IDs as
//! the host sees them: in the task's user namespace container uid N is host
//! uid BASE+N ([`crate::userns`]), so the task's user reads its files and a
//! host user of the same number (uid 65534, say) does not. Between writes the tmpfs is remounted
//! read-only. A new version replaces a file atomically (write aside, rename),
//! so a reader sees the old or the new content, never a mix. Before a write the
//! tmpfs grows (a remount with a larger `size=`, up to a maximum) to hold the
//! old files and the new ones side by side; a write that fails anyway leaves no
//! partial file behind and the old content in place. On task end the files are
//! overwritten with zeros, the tmpfs is unmounted and its directory removed.
//!
//! Every task has one, secrets or not: its workload identity lives in it too,
//! below `secrets/identity/` ([`crate::identity`]), written and renewed the
//! same way (read-write only while it is written) and wiped with the rest.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use zeroize::Zeroizing;

use crate::identity::IdentityFiles;
use crate::userns::{UserNamespace, UsernsError};
use swarmd_certs::workload::IDENTITY_DIR;

/// The statfs magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Why a secret mount could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// mount(2) or umount(2) failed.
    #[error("cannot {what} {path}: {errno}")]
    Mount { what: &'static str, path: PathBuf, errno: nix::errno::Errno },
    /// The filesystem is not a tmpfs: secrets are never written there.
    #[error("{path} is not a tmpfs (statfs type {found:#x}): refusing to write secrets to it")]
    NotTmpfs { path: PathBuf, found: i64 },
    /// A target is not a plain file name below /run/secrets.
    #[error("invalid secret target {0:?}: use a file name, or /run/secrets/<file name>")]
    BadTarget(String),
    /// The files would need a larger tmpfs than this task may have.
    #[error("the secrets need {need} bytes of tmpfs, more than the {max} bytes a task may have")]
    TooLarge { need: u64, max: u64 },
    /// A file owner the task's user namespace does not map.
    #[error(transparent)]
    Userns(#[from] UsernsError),
    /// File I/O inside the tmpfs.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MountError + '_ {
    move |source| MountError::Io { path: path.to_owned(), source }
}

/// One secret file as the container sees it.
pub struct SecretFile {
    /// File name below `/run/secrets`.
    pub name: String,
    /// Owner, a container uid (the host's is the task's user namespace's).
    pub uid: u32,
    /// Group, a container gid.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
    /// The content, wiped on drop.
    pub data: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretFile({}, {} bytes, <redacted>)", self.name, self.data.len())
    }
}

/// The file name a reference's target maps to: `name`, or `/run/secrets/name`.
pub fn target_file_name(target: &str) -> Result<String, MountError> {
    let name = target.strip_prefix("/run/secrets/").unwrap_or(target);
    if swarmd_certs::is_secret_file_name(name) {
        Ok(name.to_owned())
    } else {
        Err(MountError::BadTarget(target.to_owned()))
    }
}

/// Checks with statfs(2) that `path` is on a tmpfs.
pub fn require_tmpfs(path: &Path) -> Result<(), MountError> {
    let st = nix::sys::statfs::statfs(path).map_err(|errno| MountError::Mount {
        what: "statfs",
        path: path.into(),
        errno,
    })?;
    let found = st.filesystem_type().0 as i64;
    if found == TMPFS_MAGIC {
        Ok(())
    } else {
        Err(MountError::NotTmpfs { path: path.to_owned(), found })
    }
}

/// A mounted per-task secret tmpfs.
#[derive(Debug)]
pub struct SecretMount {
    root: PathBuf,
    dir: PathBuf,
    mounted: bool,
    /// The tmpfs's current `size=` limit (it costs no memory until used).
    size: u64,
    /// How far it may grow.
    max_size: u64,
    /// Whose IDs the files' owners are.
    userns: UserNamespace,
}

/// What a task's secret tmpfs may grow to by default: room for many values of
/// up to 500 KiB (the largest a secret can be), old and new side by side.
pub const DEFAULT_MAX_SIZE: u64 = 64 << 20;

/// Slack kept above the pages the files need.
const MARGIN: u64 = 64 << 10;

/// Room for the workload identity: two sets of three files (the old and the
/// new side by side while it is renewed), each well under a page.
const IDENTITY_ROOM: u64 = 32 << 10;

fn pages(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}

const FLAGS: MsFlags = MsFlags::MS_NODEV.union(MsFlags::MS_NOSUID).union(MsFlags::MS_NOEXEC);

impl SecretMount {
    /// Mounts a tmpfs of at most `size` bytes at `root` (created 0700) and
    /// prepares its `secrets/` directory, owned by the root of `userns`;
    /// read-only once it returns.
    pub fn create(root: &Path, size: u64, userns: UserNamespace) -> Result<Self, MountError> {
        let root_uid = userns.host_id(0, "uid")?;
        fs::create_dir_all(root).map_err(io(root))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io(root))?;
        let data = format!("size={size},mode=0700,nr_inodes=1024");
        mount(Some("swarmd-secrets"), root, Some("tmpfs"), FLAGS, Some(data.as_str()))
            .map_err(|errno| MountError::Mount { what: "mount a tmpfs at", path: root.into(), errno })?;
        let mut me = Self {
            root: root.to_owned(),
            dir: root.join("secrets"),
            mounted: true,
            size,
            max_size: DEFAULT_MAX_SIZE.max(size),
            userns,
        };
        if let Err(e) = require_tmpfs(root) {
            me.destroy();
            return Err(e);
        }
        fs::create_dir(&me.dir).map_err(io(&me.dir))?;
        std::os::unix::fs::chown(&me.dir, Some(root_uid), Some(root_uid)).map_err(io(&me.dir))?;
        fs::set_permissions(&me.dir, fs::Permissions::from_mode(0o755)).map_err(io(&me.dir))?;
        me.remount(true)?;
        Ok(me)
    }

    /// The directory to bind at `/run/secrets`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A secret tmpfs left at `root` by an earlier process (a worker that
    /// died), to be destroyed.
    pub fn adopt(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            dir: root.join("secrets"),
            mounted: true,
            size: 0,
            max_size: 0,
            userns: UserNamespace::Unset,
        }
    }

    /// The current size limit of the tmpfs.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sets how far the tmpfs may grow (at least its current size).
    pub fn set_max_size(&mut self, max: u64) {
        self.max_size = max.max(self.size);
    }

    fn remount(&self, read_only: bool) -> Result<(), MountError> {
        self.remount_with(read_only, None)
    }

    fn remount_with(&self, read_only: bool, size: Option<u64>) -> Result<(), MountError> {
        let mut flags = FLAGS | MsFlags::MS_REMOUNT;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let data = size.map(|s| format!("size={s}"));
        // Making it read-only fails with EBUSY while a file on it is open for
        // writing anywhere — also in a child this process forked (to start a
        // container for another task) that has not exec'd yet and so still
        // holds a copy of the descriptor (close-on-exec closes it only at
        // exec). That lasts moments: try again for up to a second.
        let mut tries = 0;
        loop {
            match mount(None::<&str>, &self.root, None::<&str>, flags, data.as_deref()) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EBUSY) if read_only && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(errno) => return Err(MountError::Mount { what: "remount", path: self.root.clone(), errno }),
            }
        }
    }

    /// The tmpfs size that holds what is there now plus `files` beside it.
    fn needed_for(&self, files: &[SecretFile]) -> u64 {
        let present: u64 = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| pages(m.len()))
            .sum();
        present + files.iter().map(|f| pages(f.data.len() as u64)).sum::<u64>() + MARGIN + IDENTITY_ROOM
    }

    /// Grows the tmpfs if `need` calls for it (up to its maximum), makes it
    /// writable, runs `f`, and makes it read-only again.
    fn writable<T>(&mut self, need: u64, f: impl FnOnce(&Self) -> Result<T, MountError>) -> Result<T, MountError> {
        require_tmpfs(&self.root)?;
        let grow = (need > self.size).then(|| need.min(self.max_size)).filter(|s| *s > self.size);
        self.remount_with(false, grow)?;
        if let Some(s) = grow {
            self.size = s;
        }
        let result = f(self);
        let ro = self.remount(true);
        result.and_then(|v| ro.map(|()| v))
    }

    /// Installs (or atomically replaces) the task's workload identity below
    /// `secrets/identity/`: `key.pem` owned by `user` (the container's uid and
    /// gid, mapped like the secrets' owners), the rest by the task's root.
    pub fn write_identity(&mut self, files: &IdentityFiles, user: (u32, u32)) -> Result<(), MountError> {
        let root = self.userns.host_id(0, "uid")?;
        let owner = (self.userns.host_id(user.0, "task uid")?, self.userns.host_id(user.1, "task gid")?);
        let need = self.needed_for(&[]);
        self.writable(need, |m| crate::identity::install(&m.dir, files, root, owner).map_err(io(&m.dir)))
    }

    /// Writes (or atomically replaces) `files`, then makes the tmpfs read-only
    /// again. The tmpfs first grows to hold the old and the new files side by
    /// side (up to its maximum size); a file that cannot be written is removed
    /// again, the old version stays, and the error is returned.
    pub fn write(&mut self, files: &[SecretFile]) -> Result<(), MountError> {
        let need = self.needed_for(files);
        let max = self.max_size;
        self.writable(need, |m| {
            files.iter().try_for_each(|f| m.write_one(f)).map_err(|e| match e {
                MountError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::ENOSPC) && need > max => {
                    MountError::TooLarge { need, max }
                }
                e => e,
            })
        })
    }

    fn write_one(&self, f: &SecretFile) -> Result<(), MountError> {
        let name = target_file_name(&f.name)?;
        let (uid, gid) = (self.userns.host_id(f.uid, "secret uid")?, self.userns.host_id(f.gid, "secret gid")?);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.new"));
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            file.write_all(&f.data).map_err(io(&tmp))?;
            drop(file);
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).map_err(io(&tmp))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(f.mode & 0o7777)).map_err(io(&tmp))?;
            fs::rename(&tmp, &path).map_err(io(&path))
        })();
        if result.is_err() && tmp.exists() {
            // A partial value: overwrite what was written, then remove it.
            wipe(&tmp);
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes the files not in `keep` (file names).
    pub fn retain(&self, keep: &[String]) -> Result<(), MountError> {
        self.remount(false)?;
        let mut result = Ok(());
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) && name != IDENTITY_DIR {
                    wipe(&e.path());
                    if let Err(err) = fs::remove_file(e.path()) {
                        result = Err(MountError::Io { path: e.path(), source: err });
                    }
                }
            }
        }
        let ro = self.remount(true);
        result.and(ro)
    }

    /// Overwrites every file with zeros, unmounts the tmpfs and removes its directory.
    pub fn destroy(&mut self) {
        if !self.mounted {
            return;
        }
        if self.remount(false).is_ok() {
            crate::identity::remove(&self.dir);
            if let Ok(entries) = fs::read_dir(&self.dir) {
                for e in entries.flatten() {
                    wipe(&e.path());
                }
            }
        }
        match umount2(&self.root, MntFlags::MNT_DETACH) {
            Ok(()) => {
                self.mounted = false;
                let _ = fs::remove_dir(&self.root);
            }
            Err(errno) => tracing::error!(path = %self.root.display(), %errno, "cannot unmount a secret tmpfs"),
        }
    }
}

impl Drop for SecretMount {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// What the task agent needs of the place a task's secrets live. [`Tmpfs`] (a
/// [`SecretMount`] per task) is the real one; the agent's unit tests use a
/// recording fake.
pub trait SecretFs: Send + Sync {
    /// Makes one task's secret filesystem at `root`, `size` bytes at first and
    /// allowed to grow to `max_size`, with `files` in it, owned as `userns`
    /// maps their IDs. On error nothing of it is left mounted.
    fn create(
        &self,
        root: &Path,
        size: u64,
        max_size: u64,
        userns: UserNamespace,
        files: &[SecretFile],
    ) -> Result<Box<dyn TaskSecrets>, MountError>;

    /// Wipes and removes every task secret filesystem an earlier process left
    /// below `tasks`, and their directories.
    fn remove_leftovers(&self, tasks: &Path);
}

/// One task's secret filesystem, as the task agent drives it.
pub trait TaskSecrets: Send {
    /// The directory to bind at `/run/secrets`.
    fn dir(&self) -> &Path;

    /// Makes `files` the whole content, in place: new versions replace the
    /// old atomically, files no longer listed are wiped and removed. On error
    /// the previous content of a file that could not be written stays.
    fn replace(&mut self, files: &[SecretFile]) -> Result<(), MountError>;

    /// Installs or atomically replaces the task's workload identity
    /// (`identity/` in [`TaskSecrets::dir`]), `key.pem` owned by `user` (the
    /// container's uid and gid). On error the previous identity stays.
    fn write_identity(&mut self, files: &IdentityFiles, user: (u32, u32)) -> Result<(), MountError>;

    /// Wipes every file, unmounts and removes the filesystem.
    fn destroy(&mut self);
}

/// The real [`SecretFs`]: a [`SecretMount`] (a tmpfs) per task.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tmpfs;

impl SecretFs for Tmpfs {
    fn create(
        &self,
        root: &Path,
        size: u64,
        max_size: u64,
        userns: UserNamespace,
        files: &[SecretFile],
    ) -> Result<Box<dyn TaskSecrets>, MountError> {
        // A mount whose files cannot be written is destroyed as it drops.
        let mut m = SecretMount::create(root, size, userns)?;
        m.set_max_size(max_size);
        m.write(files)?;
        Ok(Box::new(m))
    }

    fn remove_leftovers(&self, tasks: &Path) {
        crate::watchdog::clear_secret_mounts(tasks);
    }
}

impl TaskSecrets for SecretMount {
    fn dir(&self) -> &Path {
        SecretMount::dir(self)
    }

    fn replace(&mut self, files: &[SecretFile]) -> Result<(), MountError> {
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        self.write(files)?;
        self.retain(&names)
    }

    fn write_identity(&mut self, files: &IdentityFiles, user: (u32, u32)) -> Result<(), MountError> {
        SecretMount::write_identity(self, files, user)
    }

    fn destroy(&mut self) {
        SecretMount::destroy(self);
    }
}

/// Overwrites a file's content with zeros (tmpfs pages are freed on unmount;
/// this also clears them for anyone who kept the file open).
fn wipe(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        if let Ok(mut f) = fs::OpenOptions::new().write(true).open(path) {
            let _ = f.write_all(&vec![0u8; meta.len() as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_plain_names_below_run_secrets() {
        assert_eq!(target_file_name("db_pass").unwrap(), "db_pass");
        assert_eq!(target_file_name("/run/secrets/db.pass").unwrap(), "db.pass");
        for bad in ["", "..", "a/b", "/etc/passwd", "/run/secrets/../x", "a b"] {
            assert!(target_file_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_directory_on_disk_is_not_a_tmpfs() {
        let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert!(matches!(require_tmpfs(d.path()), Err(MountError::NotTmpfs { .. })));
    }
}
