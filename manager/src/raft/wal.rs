//! The raft log's own append-only files: `raft/wal/<first index>.log`
//! segments of `[u32 length][u32 CRC-32][bincode entry]` records.
//!
//! Why not sled: every sled flush seals and writes sled's buffers and starts
//! their writeback one by one, for the state machine's pages as much as the
//! log's; on the majority path that cost more CPU than the work itself. Here an
//! append is one `write` and a batch of appends shares one `fdatasync` of one
//! file (see `LogStore`).
//!
//! Recovery reads every segment: a record cut short or failing its CRC at the
//! end of the last segment is a write torn by a crash and is cut off; anywhere
//! else it is corruption and opening fails. So is a gap: the entries after the
//! purged index must follow one another (a missing segment or record is no
//! crash's doing, and raft would take the log for complete). Entries up to the
//! purged index are skipped: the active segment is never deleted, so after a
//! snapshot install it may still hold entries far below the ones appended
//! since. Entries are located through an in-memory index (index → segment,
//! offset) and read back with `pread`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{Entry, LogId};

use super::TypeConfig;

/// A new segment is started once the active one has this many bytes.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Records are at most this large (the control API caps commands at 4 MiB and
/// batches at a few of them; this leaves room, and rejects garbage lengths).
const RECORD_MAX: u32 = 256 << 20;
const HEADER: u64 = 8;

struct Segment {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
}

#[derive(Clone, Copy)]
struct Loc {
    log_id: LogId<u64>,
    segment: u64,
    offset: u64,
    len: u32,
}

/// The log files of one manager.
pub(super) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Segments by the index of the first entry written to them.
    segments: BTreeMap<u64, Segment>,
    entries: BTreeMap<u64, Loc>,
}

fn corrupt(path: &Path, offset: u64, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("raft log {} at byte {offset}: {why}", path.display()))
}

/// Mode of every segment file.
const SEGMENT_MODE: u32 = 0o600;

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

impl Wal {
    /// Opens (or creates) the log in `dir`, recovering as described above;
    /// `purged` is the index of the last entry purged, if any.
    pub(super) fn open(dir: &Path, purged: Option<u64>) -> io::Result<Self> {
        Self::open_with(dir, SEGMENT_BYTES, purged)
    }

    pub(super) fn open_with(dir: &Path, segment_bytes: u64, purged: Option<u64>) -> io::Result<Self> {
        // Private to the node: the directory 0700, every segment 0600.
        swarmd_certs::create_private_dir(dir).map_err(io::Error::other)?;
        let mut firsts: Vec<u64> = Vec::new();
        for e in fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
                firsts.push(n);
            }
        }
        firsts.sort_unstable();
        let mut wal = Self { dir: dir.to_owned(), segment_bytes, segments: BTreeMap::new(), entries: BTreeMap::new() };
        for (k, first) in firsts.iter().enumerate() {
            let last_segment = k + 1 == firsts.len();
            let path = dir.join(segment_name(*first));
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            file.set_permissions(fs::Permissions::from_mode(SEGMENT_MODE))?;
            let bytes = fs::read(&path)?;
            let mut at = 0u64;
            while at < bytes.len() as u64 {
                match read_record(&bytes, at) {
                    Ok((entry, len)) => {
                        let log_id = entry.log_id;
                        let loc = Loc { log_id, segment: *first, offset: at, len };
                        at += HEADER + len as u64;
                        if purged.is_some_and(|p| log_id.index <= p) {
                            continue;
                        }
                        // The entry that must come next, if one is known.
                        let next = match wal.entries.last_key_value() {
                            Some((last, _)) => Some(last + 1),
                            None => purged.map(|p| p + 1),
                        };
                        if next.is_some_and(|n| log_id.index > n) {
                            let why = format!(
                                "entry {} where entry {} was expected: a gap in the log",
                                log_id.index,
                                next.unwrap_or_default()
                            );
                            return Err(corrupt(&path, loc.offset, &why));
                        }
                        // A rewrite after a truncation may leave older segments
                        // holding entries a later segment replaced: the later wins.
                        if wal.entries.last_key_value().is_some_and(|(last, _)| *last >= log_id.index) {
                            wal.entries.split_off(&log_id.index);
                        }
                        wal.entries.insert(log_id.index, loc);
                    }
                    Err(why) if last_segment => {
                        tracing::warn!(path = %path.display(), offset = at, why, "cutting off a torn raft log record");
                        file.set_len(at)?;
                        file.sync_all()?;
                        break;
                    }
                    Err(why) => return Err(corrupt(&path, at, why)),
                }
            }
            // Only the last segment can be empty (a crash between creating it
            // and writing its first record); an earlier one emptied lost its
            // records, which nothing after it may paper over.
            if at == 0 && !last_segment {
                return Err(corrupt(&path, 0, "an empty segment before the last: its records are lost"));
            }
            wal.segments.insert(*first, Segment { path, file: Arc::new(file), len: at });
        }
        Ok(wal)
    }

    /// The log ID of the last entry, if any.
    pub(super) fn last(&self) -> Option<LogId<u64>> {
        self.entries.last_key_value().map(|(_, l)| l.log_id)
    }

    /// Writes `entries` (not yet synced: see [`Wal::sync_handle`]).
    pub(super) fn append(&mut self, entries: impl IntoIterator<Item = Entry<TypeConfig>>) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut pending: Vec<(LogId<u64>, u64, u32)> = Vec::new();
        for e in entries {
            let buffered = buf.len() as u64;
            if self.segments.last_key_value().is_none_or(|(_, s)| s.len + buffered >= self.segment_bytes) {
                self.flush_buf(&mut buf, &mut pending)?;
                self.start_segment(e.log_id.index)?;
            }
            let data = bincode::serialize(&e).map_err(io::Error::other)?;
            let len = u32::try_from(data.len()).ok().filter(|l| *l <= RECORD_MAX).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("a raft entry of {} bytes", data.len()))
            })?;
            let offset = self.active().len + buf.len() as u64;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
            buf.extend_from_slice(&data);
            pending.push((e.log_id, offset, len));
        }
        self.flush_buf(&mut buf, &mut pending)
    }

    fn active_first(&self) -> u64 {
        self.segments.last_key_value().map_or(0, |(k, _)| *k)
    }

    fn active(&self) -> &Segment {
        self.segments.last_key_value().map(|(_, s)| s).expect("an active segment")
    }

    /// Syncs the active segment and starts a new one at `index`.
    fn start_segment(&mut self, index: u64) -> io::Result<()> {
        if let Some((_, s)) = self.segments.last_key_value() {
            s.file.sync_data()?;
        }
        let path = self.dir.join(segment_name(index));
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(SEGMENT_MODE).open(&path)?;
        file.set_permissions(fs::Permissions::from_mode(SEGMENT_MODE))?;
        sync_dir(&self.dir)?;
        self.segments.insert(index, Segment { path, file: Arc::new(file), len: 0 });
        Ok(())
    }

    fn flush_buf(&mut self, buf: &mut Vec<u8>, pending: &mut Vec<(LogId<u64>, u64, u32)>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let first = self.active_first();
        let seg = self.segments.get_mut(&first).expect("an active segment");
        seg.file.write_all_at(buf, seg.len)?;
        seg.len += buf.len() as u64;
        for (log_id, offset, len) in pending.drain(..) {
            self.entries.insert(log_id.index, Loc { log_id, segment: first, offset, len });
        }
        buf.clear();
        Ok(())
    }

    /// The file whose `fdatasync` makes every append so far durable (a segment
    /// that stopped being active was synced when it did).
    pub(super) fn sync_handle(&self) -> Option<Arc<File>> {
        self.segments.last_key_value().map(|(_, s)| s.file.clone())
    }

    /// The entries with indexes in `range`, in order.
    pub(super) fn read(
        &self,
        range: (std::ops::Bound<u64>, std::ops::Bound<u64>),
    ) -> io::Result<Vec<Entry<TypeConfig>>> {
        let mut out = Vec::new();
        for loc in self.entries.range(range).map(|(_, l)| *l) {
            let seg = &self.segments[&loc.segment];
            let mut data = vec![0u8; loc.len as usize];
            seg.file.read_exact_at(&mut data, loc.offset + HEADER)?;
            out.push(bincode::deserialize(&data).map_err(|e| corrupt(&seg.path, loc.offset, &e.to_string()))?);
        }
        Ok(out)
    }

    /// Removes every entry from `index` on, durably.
    pub(super) fn truncate(&mut self, index: u64) -> io::Result<()> {
        let Some(cut) = self.entries.range(index..).next().map(|(_, l)| *l) else { return Ok(()) };
        self.entries.split_off(&index);
        for (_, s) in self.segments.split_off(&(cut.segment + 1)) {
            fs::remove_file(&s.path)?;
        }
        let seg = self.segments.get_mut(&cut.segment).expect("the segment of a logged entry");
        seg.file.set_len(cut.offset)?;
        seg.len = cut.offset;
        seg.file.sync_all()?;
        sync_dir(&self.dir)
    }

    /// Forgets every entry up to and including `index`, deleting segments that
    /// hold nothing else. Never deletes the active segment.
    pub(super) fn purge(&mut self, index: u64) -> io::Result<()> {
        self.entries = self.entries.split_off(&(index + 1));
        let keep_from = self.entries.first_key_value().map_or(self.active_first(), |(_, l)| l.segment);
        let old: Vec<u64> = self.segments.range(..keep_from).map(|(k, _)| *k).collect();
        for k in old {
            if let Some(s) = self.segments.remove(&k) {
                fs::remove_file(&s.path)?;
            }
        }
        Ok(())
    }
}

/// The record at `at`: its entry and payload length, or why it is unreadable.
fn read_record(bytes: &[u8], at: u64) -> Result<(Entry<TypeConfig>, u32), &'static str> {
    let at = at as usize;
    let header = bytes.get(at..at + HEADER as usize).ok_or("record header cut short")?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > RECORD_MAX {
        return Err("record length out of range");
    }
    let start = at + HEADER as usize;
    let data = bytes.get(start..start + len as usize).ok_or("record cut short")?;
    if crc32fast::hash(data) != crc {
        return Err("record fails its CRC");
    }
    let entry = bincode::deserialize(data).map_err(|_| "record does not decode")?;
    Ok((entry, len))
}

#[cfg(test)]
mod tests {
    use std::ops::Bound::Unbounded;

    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn indexes(w: &Wal) -> Vec<u64> {
        w.read((Unbounded, Unbounded)).unwrap().iter().map(|e| e.log_id.index).collect()
    }

    fn segment_files(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn entries_survive_reopening_across_segments_and_purge_deletes_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open_with(dir.path(), 100, None).unwrap();
        w.append((1..=20).map(entry)).unwrap();
        w.append((21..=40).map(entry)).unwrap();
        let files = segment_files(dir.path());
        assert!(files > 2, "no new segments started: {files}");
        drop(w);
        let mut w = Wal::open_with(dir.path(), 100, None).unwrap();
        assert_eq!(indexes(&w), (1..=40).collect::<Vec<_>>());
        w.purge(30).unwrap();
        assert_eq!(indexes(&w), (31..=40).collect::<Vec<_>>());
        assert!(segment_files(dir.path()) < files, "purge deleted no segment");
        w.truncate(35).unwrap();
        w.append((35..=36).map(entry)).unwrap();
        drop(w);
        let w = Wal::open_with(dir.path(), 100, None).unwrap();
        assert_eq!(indexes(&w).last(), Some(&36));
        assert_eq!(w.last().unwrap().index, 36);
    }

    #[test]
    fn invariant_11_the_log_directory_and_segments_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("wal");
        fs::create_dir(&wal).unwrap();
        fs::set_permissions(&wal, fs::Permissions::from_mode(0o755)).unwrap();
        let mut w = Wal::open_with(&wal, 100, None).unwrap();
        w.append((1..=20).map(entry)).unwrap();
        drop(w);
        // A segment left wider by an older version is narrowed on open.
        let first = fs::read_dir(&wal).unwrap().next().unwrap().unwrap().path();
        fs::set_permissions(&first, fs::Permissions::from_mode(0o644)).unwrap();
        drop(Wal::open_with(&wal, 100, None).unwrap());
        assert_eq!(fs::metadata(&wal).unwrap().permissions().mode() & 0o7777, 0o700);
        for e in fs::read_dir(&wal).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn invariant_8_recovery_refuses_an_emptied_segment_before_the_last() {
        // Found by the `wal` fuzz target: the first segment cut to nothing
        // lost entries 1-2, and the log came back starting at 3.
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open_with(dir.path(), 1, None).unwrap();
        w.append((1..=5).map(entry)).unwrap();
        drop(w);
        for first in [1, 3] {
            let d = tempfile::tempdir().unwrap();
            for f in fs::read_dir(dir.path()).unwrap().flatten() {
                fs::copy(f.path(), d.path().join(f.file_name())).unwrap();
            }
            fs::write(d.path().join(segment_name(first)), b"").unwrap();
            let err = Wal::open(d.path(), None).err().expect("a log with an emptied segment was accepted");
            assert!(err.to_string().contains("empty segment") || err.to_string().contains("gap"), "{err}");
        }
        // The last segment may be empty.
        let last = fs::read_dir(dir.path()).unwrap().flatten().map(|f| f.path()).max().unwrap();
        fs::write(&last, b"").unwrap();
        Wal::open(dir.path(), None).unwrap();
    }

    #[test]
    fn invariant_8_recovery_refuses_a_gap_in_the_log() {
        // Entries 1-3 and 5-6: an entry is missing, which no crash explains.
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open_with(dir.path(), 1 << 20, None).unwrap();
        w.append((1..=3).map(entry)).unwrap();
        w.append((5..=6).map(entry)).unwrap();
        drop(w);
        let err = Wal::open(dir.path(), None).err().expect("a log with a gap was accepted");
        assert!(err.to_string().contains("gap"), "{err}");

        // A segment deleted from the middle of the log.
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open_with(dir.path(), 1, None).unwrap();
        w.append((1..=5).map(entry)).unwrap();
        drop(w);
        fs::remove_file(dir.path().join(segment_name(3))).unwrap();
        let err = Wal::open(dir.path(), None).err().expect("a log missing a segment was accepted");
        assert!(err.to_string().contains("gap"), "{err}");

        // Below the purged index, a gap is what a purge leaves; above, it is not.
        let w = Wal::open(dir.path(), Some(3)).unwrap();
        assert_eq!(indexes(&w), vec![4, 5]);
        drop(w);
        assert!(Wal::open(dir.path(), Some(1)).is_err(), "entries 2-3 are missing, not purged");
        // Deleting the first segments is a purge: what is left starts later.
        fs::remove_file(dir.path().join(segment_name(1))).unwrap();
        fs::remove_file(dir.path().join(segment_name(2))).unwrap();
        let w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&w), vec![4, 5]);
    }

    #[test]
    fn invariant_8_a_4_gib_length_prefix_is_refused_not_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open_with(dir.path(), 1, None).unwrap();
        w.append((1..=2).map(entry)).unwrap();
        drop(w);
        // A record claiming u32::MAX bytes, with a few behind it.
        let mut garbage = u32::MAX.to_le_bytes().to_vec();
        garbage.extend_from_slice(&[0; 12]);
        let last = dir.path().join(segment_name(2));
        let mut bytes = fs::read(&last).unwrap();
        let good = bytes.len();
        bytes.extend_from_slice(&garbage);
        fs::write(&last, &bytes).unwrap();
        // At the end of the last segment: a torn write, cut off.
        let w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&w), vec![1, 2]);
        assert_eq!(fs::metadata(&last).unwrap().len(), good as u64);
        drop(w);
        // Anywhere else: corruption, refused with the reason.
        let first = dir.path().join(segment_name(1));
        let mut bytes = fs::read(&first).unwrap();
        bytes.splice(0..0, garbage);
        fs::write(&first, bytes).unwrap();
        let err = Wal::open(dir.path(), None).err().expect("a 4 GiB record was accepted");
        assert!(err.to_string().contains("length out of range"), "{err}");
    }

    #[test]
    fn entries_a_snapshot_install_purged_from_the_active_segment_are_skipped() {
        // A follower with entries 1-3 installs a snapshot up to 100: they are
        // purged, but their segment is the active one and stays, and 101-102
        // are appended to it.
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path(), None).unwrap();
        w.append((1..=3).map(entry)).unwrap();
        w.purge(100).unwrap();
        w.append((101..=102).map(entry)).unwrap();
        drop(w);
        let w = Wal::open(dir.path(), Some(100)).unwrap();
        assert_eq!(indexes(&w), vec![101, 102]);
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_corruption_elsewhere_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path(), None).unwrap();
        w.append((1..=3).map(entry)).unwrap();
        let path = w.active().path.clone();
        drop(w);
        // A crash in the middle of writing record 3.
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let mut w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&w), vec![1, 2]);
        w.append([entry(3)]).unwrap();
        assert_eq!(indexes(&w), vec![1, 2, 3]);
        drop(w);

        // A flipped byte in a segment that is not the last: refuse, say where.
        let mut w = Wal::open_with(dir.path(), 1, None).unwrap();
        w.append([entry(4)]).unwrap();
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER as usize + 2] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = Wal::open(dir.path(), None).err().expect("a corrupt segment was accepted");
        assert!(err.to_string().contains("CRC"), "{err}");
    }
}
