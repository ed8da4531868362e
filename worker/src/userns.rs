//! A user namespace per task (invariant 9): which host IDs each task's
//! container IDs stand for, and the blocks of host IDs this worker hands out.
//!
//! Without a user namespace a task's uid 65534 *is* host uid 65534, so every
//! host daemon running as `nobody` could read the task's secrets through
//! `/proc/<pid>/root`, its environment, and ptrace it. With one, container IDs
//! 0–65535 map to a block of 65,536 host IDs of the task's own: host IDs from
//! 2^31 up (far above any real user; host uid 0 is never mapped), one block per
//! task running on this worker, so no two tasks — and no host user — share an
//! ID. (Kubernetes' user namespace manager hands out blocks the same way;
//! Docker's `--userns-remap` shares one range among all containers.)
//!
//! Each worker starts its search for a free block at a point of its own (from
//! its node ID), so that workers sharing one kernel (containers on one host,
//! tests) rarely meet; they do not coordinate, so that is not a guarantee.
//!
//! The allocation lives in `userns.json` in the worker's run dir (0600),
//! written before a block is used and after it is released, and read again
//! when the worker restarts: a container that outlived its worker keeps its
//! block until it is gone. An allocation that cannot be read or written, or
//! that has no free block left, fails the task — never runs it without a user
//! namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The first host ID handed out: 2^31.
pub const FIRST_HOST_ID: u32 = 1 << 31;

/// IDs in one block: container IDs 0–65535.
pub const BLOCK_SIZE: u32 = 1 << 16;

/// Blocks between 2^31 and 2^32: the last one would reach (uid_t)-1, which no
/// mapping may include, so it is never used.
pub const MAX_BLOCKS: u32 = (u32::MAX - FIRST_HOST_ID) / BLOCK_SIZE;

/// The allocation's file name in a worker's run dir.
pub const ALLOCATION_FILE: &str = "userns.json";

/// Why a task has no user namespace to run in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsernsError {
    /// Every block is held by a running task.
    #[error("no free block of host IDs for a user namespace: all {capacity} are held by running tasks")]
    Exhausted {
        /// Blocks this worker hands out.
        capacity: u32,
    },
    /// The persisted allocation cannot be trusted: no block is handed out
    /// (one might belong to a container still running).
    #[error(
        "the user namespace allocation {path} cannot be read ({why}); no task starts until it is fixed \
         (remove it once no container of this worker runs)"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The allocation could not be saved, so the block is not handed out.
    #[error("cannot save the user namespace allocation {path}: {why}")]
    Save {
        /// The file.
        path: PathBuf,
        /// The error.
        why: String,
    },
    /// A container ID that the task's user namespace does not map.
    #[error("{what} {id} is outside the task's user namespace (IDs 0–65535); use IDs below 65536, or --userns host")]
    OutOfRange {
        /// What the ID is for (`uid`, `gid`, `secret uid` …).
        what: &'static str,
        /// The ID.
        id: u32,
    },
    /// No user namespace was chosen for the container (a bug in the caller:
    /// refused rather than run in the host's).
    #[error("no user namespace was chosen for this container: refusing to run it in the host's")]
    Unset,
}

/// One block of [`BLOCK_SIZE`] host IDs, by its index from [`FIRST_HOST_ID`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdBlock(u32);

impl IdBlock {
    /// Block `index`, if there is such a block.
    pub fn new(index: u32) -> Option<Self> {
        (index < MAX_BLOCKS).then_some(Self(index))
    }

    /// Its index.
    pub fn index(self) -> u32 {
        self.0
    }

    /// The host ID that container ID 0 maps to.
    pub fn base(self) -> u32 {
        FIRST_HOST_ID + self.0 * BLOCK_SIZE
    }
}

/// Which user namespace a container runs in, and so which host IDs its IDs are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UserNamespace {
    /// None chosen: every use is refused ([`UsernsError::Unset`]), so a
    /// forgotten choice can never mean the host's namespace.
    #[default]
    Unset,
    /// A private user namespace: container IDs 0–65535 are the block's host IDs.
    Private(IdBlock),
    /// The host's (`--userns host`): container ID N is host ID N.
    Host,
}

impl UserNamespace {
    /// The host ID of container ID `id` (`what` names it in the error).
    pub fn host_id(self, id: u32, what: &'static str) -> Result<u32, UsernsError> {
        match self {
            Self::Unset => Err(UsernsError::Unset),
            Self::Host => Ok(id),
            Self::Private(_) if id >= BLOCK_SIZE => Err(UsernsError::OutOfRange { what, id }),
            Self::Private(b) => Ok(b.base() + id),
        }
    }
}

/// The blocks this worker has handed out, by task ID, saved in its run dir.
#[derive(Debug)]
pub struct IdAllocator {
    path: PathBuf,
    capacity: u32,
    /// Where the search for a free block starts.
    first: u32,
    held: BTreeMap<String, IdBlock>,
    /// Why the saved allocation cannot be trusted, if it cannot.
    broken: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    /// Task ID → block index.
    blocks: BTreeMap<String, u32>,
}

impl IdAllocator {
    /// The allocation saved at `path` (none yet: empty), handing out at most
    /// `capacity` blocks (at most [`MAX_BLOCKS`]), searching for a free one
    /// from block `first` on (modulo `capacity`). A file that cannot be read
    /// or parsed makes every [`IdAllocator::allocate`] fail.
    pub fn load(path: &Path, capacity: u32, first: u32) -> Self {
        let capacity = capacity.clamp(1, MAX_BLOCKS);
        let mut me =
            Self { path: path.to_owned(), capacity, first: first % capacity, held: BTreeMap::new(), broken: None };
        match std::fs::read(path) {
            Ok(bytes) => match Self::parse(&bytes) {
                Ok(held) => me.held = held,
                Err(why) => me.broken = Some(why),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => me.broken = Some(e.to_string()),
        }
        if let Some(why) = &me.broken {
            tracing::error!(path = %path.display(), %why, "user namespace allocation unreadable: no task will start");
        }
        me
    }

    fn parse(bytes: &[u8]) -> Result<BTreeMap<String, IdBlock>, String> {
        let saved: Saved = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut held = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        for (task, index) in saved.blocks {
            let block = IdBlock::new(index).ok_or_else(|| format!("block {index} does not exist"))?;
            if !seen.insert(block) {
                return Err(format!("block {index} is held twice"));
            }
            held.insert(task, block);
        }
        Ok(held)
    }

    /// The block `task` holds.
    pub fn get(&self, task: &str) -> Option<IdBlock> {
        self.held.get(task).copied()
    }

    /// Blocks held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The block for `task`: the one it holds, or the first free one from the
    /// starting point on, saved before it is returned.
    pub fn allocate(&mut self, task: &str) -> Result<IdBlock, UsernsError> {
        if let Some(why) = &self.broken {
            return Err(UsernsError::Unreadable { path: self.path.clone(), why: why.clone() });
        }
        if let Some(b) = self.get(task) {
            return Ok(b);
        }
        let used: std::collections::BTreeSet<IdBlock> = self.held.values().copied().collect();
        let block = (0..self.capacity)
            .filter_map(|k| IdBlock::new((self.first + k) % self.capacity))
            .find(|b| !used.contains(b))
            .ok_or(UsernsError::Exhausted { capacity: self.capacity })?;
        self.held.insert(task.to_owned(), block);
        if let Err(e) = self.save() {
            self.held.remove(task);
            return Err(e);
        }
        Ok(block)
    }

    /// Gives `task`'s block back (its container is gone).
    pub fn release(&mut self, task: &str) -> Result<(), UsernsError> {
        if self.broken.is_some() || self.held.remove(task).is_none() {
            return Ok(());
        }
        self.save()
    }

    /// Keeps only the blocks of tasks for which `alive` holds (after a
    /// restart: the containers still there), and saves the result.
    pub fn retain(&mut self, alive: impl Fn(&str) -> bool) -> Result<(), UsernsError> {
        if self.broken.is_some() {
            return Ok(());
        }
        let before = self.held.len();
        self.held.retain(|task, _| alive(task));
        if self.held.len() == before {
            return Ok(());
        }
        self.save()
    }

    fn save(&self) -> Result<(), UsernsError> {
        let err = |why: String| UsernsError::Save { path: self.path.clone(), why };
        let saved = Saved { blocks: self.held.iter().map(|(t, b)| (t.clone(), b.index())).collect() };
        let text = serde_json::to_vec_pretty(&saved).map_err(|e| err(e.to_string()))?;
        if let Some(dir) = self.path.parent() {
            swarmd_certs::create_private_dir(dir).map_err(|e| err(e.to_string()))?;
        }
        swarmd_certs::write_atomic(&self.path, &text, 0o600).map_err(|e| err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(dir: &Path, capacity: u32) -> IdAllocator {
        IdAllocator::load(&dir.join(ALLOCATION_FILE), capacity, 0)
    }

    #[test]
    fn blocks_start_at_2_pow_31_and_never_reach_the_invalid_id() {
        assert_eq!(IdBlock::new(0).unwrap().base(), 2_147_483_648);
        assert_eq!(IdBlock::new(1).unwrap().base(), 2_147_483_648 + 65_536);
        let last = IdBlock::new(MAX_BLOCKS - 1).unwrap();
        // The last mapped host ID is still below (uid_t)-1, and there is no block after it.
        assert!(u64::from(last.base()) + u64::from(BLOCK_SIZE) - 1 < u64::from(u32::MAX));
        assert!(IdBlock::new(MAX_BLOCKS).is_none());
        let ns = UserNamespace::Private(IdBlock::new(3).unwrap());
        assert_eq!(ns.host_id(65534, "uid").unwrap(), FIRST_HOST_ID + 3 * BLOCK_SIZE + 65534);
        assert!(matches!(ns.host_id(65536, "uid"), Err(UsernsError::OutOfRange { id: 65536, .. })));
        assert_eq!(UserNamespace::Host.host_id(70_000, "uid").unwrap(), 70_000);
        assert!(matches!(UserNamespace::Unset.host_id(0, "uid"), Err(UsernsError::Unset)));
    }

    #[test]
    fn invariant_9_two_tasks_get_disjoint_blocks() {
        let d = tempfile::tempdir().unwrap();
        let mut a = alloc(d.path(), MAX_BLOCKS);
        let one = a.allocate("task-one").unwrap();
        let two = a.allocate("task-two").unwrap();
        assert_ne!(one, two);
        let range = |b: IdBlock| u64::from(b.base())..u64::from(b.base()) + u64::from(BLOCK_SIZE);
        let (r1, r2) = (range(one), range(two));
        assert!(r1.end <= r2.start || r2.end <= r1.start, "{r1:?} and {r2:?} overlap");
        assert!(r1.start >= 1 << 31 && r2.start >= 1 << 31, "host IDs below 2^31 mapped");
        // Asking again gives the same block; a released block is handed out again.
        assert_eq!(a.allocate("task-one").unwrap(), one);
        a.release("task-one").unwrap();
        assert_eq!(a.allocate("task-three").unwrap(), one);
        assert_eq!(a.held(), 2);
    }

    #[test]
    fn invariant_9_the_allocation_survives_a_reload_and_is_private() {
        let d = tempfile::tempdir().unwrap();
        let mut a = alloc(d.path(), MAX_BLOCKS);
        let kept = a.allocate("still-running").unwrap();
        a.allocate("gone").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join(ALLOCATION_FILE)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        drop(a);

        // A restarted worker: the task whose container is still there keeps its block.
        let mut b = alloc(d.path(), MAX_BLOCKS);
        assert_eq!(b.get("still-running"), Some(kept));
        b.retain(|t| t == "still-running").unwrap();
        assert_eq!(b.get("gone"), None);
        let new = b.allocate("new-task").unwrap();
        assert_ne!(new, kept, "a block held by a running container was handed out again");
        drop(b);
        let c = alloc(d.path(), MAX_BLOCKS);
        assert_eq!((c.get("still-running"), c.get("new-task"), c.held()), (Some(kept), Some(new), 2));
    }

    #[test]
    fn invariant_9_exhausted_or_unreadable_allocation_fails_closed() {
        let d = tempfile::tempdir().unwrap();
        let mut a = alloc(d.path(), 2);
        a.allocate("a").unwrap();
        a.allocate("b").unwrap();
        let e = a.allocate("c").unwrap_err();
        assert!(matches!(e, UsernsError::Exhausted { capacity: 2 }), "{e}");
        assert!(e.to_string().contains("no free block"), "{e}");
        a.release("a").unwrap();
        a.allocate("c").unwrap();

        for bad in [&b"{not json"[..], br#"{"blocks":{"x":40000}}"#, br#"{"blocks":{"x":1,"y":1}}"#] {
            std::fs::write(d.path().join(ALLOCATION_FILE), bad).unwrap();
            let mut a = alloc(d.path(), 2);
            let e = a.allocate("d").unwrap_err();
            assert!(matches!(e, UsernsError::Unreadable { .. }), "{e}");
            // Nothing overwrote the file: the operator sees what was there.
            assert_eq!(std::fs::read(d.path().join(ALLOCATION_FILE)).unwrap(), bad);
        }

        // A run dir that cannot be written: the block is not handed out.
        let run = d.path().join("run");
        let mut a = IdAllocator::load(&run.join(ALLOCATION_FILE), 2, 0);
        std::fs::write(&run, b"a file where the run dir should be").unwrap();
        assert!(matches!(a.allocate("e"), Err(UsernsError::Save { .. })));
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn the_search_starts_at_the_workers_own_point_and_wraps() {
        let d = tempfile::tempdir().unwrap();
        let mut a = IdAllocator::load(&d.path().join(ALLOCATION_FILE), 3, 7);
        let got: Vec<u32> = ["a", "b", "c"].iter().map(|t| a.allocate(t).unwrap().index()).collect();
        assert_eq!(got, [1, 2, 0]);
        assert!(matches!(a.allocate("d"), Err(UsernsError::Exhausted { capacity: 3 })));
    }
}
