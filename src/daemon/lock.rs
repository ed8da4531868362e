//! One process per data dir: a node holds an exclusive `flock` on its data
//! directory for as long as it runs, so a second `swarmd` on the same data dir
//! (the same node identity twice, each cutting the other's session) refuses to
//! start and names the process that holds it.
//!
//! The lock is on the directory itself, not on a file in it: nothing is added
//! to a data dir (a fresh one stays empty for the join checks), and removing a
//! data dir after a failed join needs no extra step. The descriptor is
//! close-on-exec, so a re-execution (demotion) or a spawned watchdog never
//! carries it; the kernel releases it when the process dies, however it dies.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

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
    /// The directory could not be opened or locked.
    #[error("cannot lock data dir {}: {source}", .dir.display())]
    Io { dir: PathBuf, source: std::io::Error },
}

impl DataDirLock {
    /// Takes the lock on `dir`, which must exist, without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io { dir: dir.to_owned(), source };
        let file = File::open(dir).map_err(io)?;
        let ino = file.metadata().map_err(io)?.ino();
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                Err(LockError::InUse { dir: dir.to_owned(), holder: holder_of(ino, std::process::id()) })
            }
            Err((_, e)) => Err(io(std::io::Error::from(e))),
        }
    }
}

/// The PID that holds a `flock` on inode `ino`, from `/proc/locks`, other than `me`.
///
/// Lines look like `1: FLOCK  ADVISORY  WRITE 4242 08:01:131090 0 EOF`; the
/// device is not compared (an inode number clash across devices only makes the
/// message name the wrong process, never the lock wrong).
fn holder_of(ino: u64, me: u32) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, dev) = (f.get(1)?, f.get(4)?.parse::<u32>().ok()?, f.get(5)?);
        let line_ino: u64 = dev.rsplit(':').next()?.parse().ok()?;
        (*kind == "FLOCK" && line_ino == ino && pid != me).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_data_dir_is_refused_and_names_the_holder_once_released_it_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        // A second open file description, as another process would have.
        match DataDirLock::acquire(dir.path()) {
            Err(e @ LockError::InUse { .. }) => {
                let text = e.to_string();
                assert!(text.contains("is in use by"), "{text}");
            }
            other => panic!("second lock: {:?}", other.err()),
        }
        drop(held);
        DataDirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn holder_is_read_from_proc_locks() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DataDirLock::acquire(dir.path()).unwrap();
        let ino = std::fs::metadata(dir.path()).unwrap().ino();
        // Our own lock, seen from a PID that is not ours.
        assert_eq!(holder_of(ino, 0), Some(std::process::id()));
        assert_eq!(holder_of(ino, std::process::id()), None);
    }
}
