//! One process per data dir: a node holds an exclusive `flock` on the file
//! `swarmd.lock` in its data dir for as long as it runs, so a second `swarmd`
//! on the same data dir (the same node identity twice, each cutting the
//! other's session) refuses to start and names the process that holds it.
//!
//! The lock is a file of its own, created 0600 and owned by the node's user,
//! never the directory: anyone who can open a directory can `flock` it, and an
//! unprivileged user who once opened a data dir created 0755 (by `mkdir`, by
//! systemd's `StateDirectory=`) could hold that lock from before the node
//! narrowed the directory, and keep the node from ever starting. A lock file
//! that is not private (another owner, group or other bits) is refused.
//!
//! The descriptor is close-on-exec, so a re-execution (demotion) or a spawned
//! watchdog never carries it; the kernel releases it when the process dies,
//! however it dies. The holder's PID is written into the file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The lock file's name in a data dir.
pub const LOCK_FILE: &str = "swarmd.lock";

/// An exclusive lock on a data dir, released when dropped or when the process exits.
pub struct DataDirLock {
    _lock: Flock<File>,
}

/// Why a data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "data dir {} is in use by {} (a node runs there already; stop it first, or use another --data-dir)",
        .dir.display(),
        .holder.map(|p| format!("pid {p}")).unwrap_or_else(|| "another process".into())
    )]
    InUse { dir: PathBuf, holder: Option<u32> },
    /// The lock file is not private to this user.
    #[error("{} must be a regular file of this user with mode 0600 (it is not: remove it and start again)", .path.display())]
    NotPrivate { path: PathBuf },
    /// The lock file could not be opened or locked.
    #[error("cannot lock data dir {}: {source}", .dir.display())]
    Io { dir: PathBuf, source: std::io::Error },
}

impl DataDirLock {
    /// Takes the lock on `dir`, which must exist, without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io { dir: dir.to_owned(), source };
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.file_type().is_file() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
            return Err(LockError::NotPrivate { path });
        }
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                // Best effort: the PID only serves the message of a second process.
                let pid = std::process::id().to_string();
                let _ = lock.set_len(0).and_then(|_| lock.rewind()).and_then(|_| lock.write_all(pid.as_bytes()));
                Ok(Self { _lock: lock })
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let holder = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                Err(LockError::InUse { dir: dir.to_owned(), holder })
            }
            Err((_, e)) => Err(io(std::io::Error::from(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_lock_on_a_data_dir_is_refused_and_names_the_holder_once_released_it_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(LOCK_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second open file description, as another process would have.
        match DataDirLock::acquire(dir.path()) {
            Err(LockError::InUse { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("second lock: {:?}", other.err()),
        }
        drop(held);
        DataDirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_lock_on_the_directory_itself_does_not_keep_a_node_out() {
        // What any user who could once open the directory can take.
        let dir = tempfile::tempdir().unwrap();
        let _theirs = Flock::lock(File::open(dir.path()).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        DataDirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_lock_file_others_can_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(DataDirLock::acquire(dir.path()), Err(LockError::NotPrivate { .. })));
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        assert!(DataDirLock::acquire(dir.path()).is_err(), "a symlink is never followed");
    }
}
