//! Raft log recovery (`manager/src/raft/wal.rs`) from arbitrary bytes.
//!
//! Two modes, chosen by the first byte:
//! - raw: the input is cut into up to three segment files, written as they
//!   would be on disk, and the log is opened. It must never panic, loop or
//!   allocate without bound (a length prefix of 4 GiB is refused, not
//!   allocated), and what it recovers must be a run of consecutive indexes.
//! - damaged: a log is written through the real append/truncate/purge path
//!   (entries, segment size, a raft-style truncation and a purge, as after a
//!   snapshot, chosen by the input), then damaged (a file cut short, a byte
//!   flipped, garbage appended or a segment deleted), and recovered with the
//!   purge marker. Whatever is recovered must be what was written at those
//!   indexes, consecutive, and start right after the purged index (or at 1)
//!   unless the first segment is gone (the same as a purge). After recovery,
//!   appending the next entry and recovering again must give the same entries
//!   plus that one.
#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use swarmd_manager::raft::fuzzing::{wal_recover, wal_write};
use swarmd_manager::raft::TypeConfig;
use swarmd_manager::state::Command;

type E = Entry<TypeConfig>;

fn entry(term: u64, index: u64, size: u8) -> E {
    // Payloads of varied length, so records straddle segment boundaries.
    let payload = match size % 4 {
        0 => EntryPayload::Blank,
        _ => EntryPayload::Normal(Command::Batch(
            (0..size as u32).map(|below| Command::RetireDataKeys { below }).collect(),
        )),
    };
    Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload }
}

fn enc(e: &E) -> Vec<u8> {
    bincode::serialize(e).expect("encode an entry")
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir).expect("list the log").map(|e| e.expect("dir entry").path()).collect();
    v.sort();
    v
}

/// Recovered entries have consecutive indexes; with `expected`, each is the
/// entry written at its index.
fn check_recovered(got: &[E], expected: Option<&[E]>) {
    for w in got.windows(2) {
        assert_eq!(w[0].log_id.index + 1, w[1].log_id.index, "recovered log has a gap or goes backwards");
    }
    if let (Some(exp), Some(first)) = (expected, got.first()) {
        let base = exp.first().expect("something was written").log_id.index;
        let at = first.log_id.index.checked_sub(base).expect("recovered an index before any written") as usize;
        assert!(at + got.len() <= exp.len(), "recovered more entries than were written");
        for (g, e) in got.iter().zip(&exp[at..]) {
            assert_eq!(enc(g), enc(e), "recovered entry {} differs from the one written", g.log_id.index);
        }
    }
}

/// Appends the entry after the last recovered one and recovers again.
fn check_append_after(dir: &Path, got: &[E], purged: Option<u64>) {
    let next = got.last().map_or(purged.unwrap_or(0) + 1, |e| e.log_id.index + 1);
    let term = got.last().map_or(1, |e| e.log_id.leader_id.term);
    let extra = entry(term, next, 5);
    if wal_write(dir, 256, vec![vec![extra.clone()]], None, purged).is_err() {
        return;
    }
    let again = wal_recover(dir, purged).expect("a log we just appended to reopens");
    let mut want: Vec<Vec<u8>> = got.iter().map(enc).collect();
    want.push(enc(&extra));
    let have: Vec<Vec<u8>> = again.iter().map(enc).collect();
    assert_eq!(have, want, "an append after recovery was lost or misplaced");
}

fn raw(u: &mut Unstructured, dir: &Path) -> ArbResult<()> {
    fs::create_dir_all(dir).expect("create the log directory");
    let n = u.int_in_range(1..=3)?;
    for _ in 0..n {
        let first: u8 = u.arbitrary()?;
        let len = u.int_in_range(0..=4096usize)?;
        let bytes = u.bytes(len.min(u.len()))?;
        fs::write(dir.join(format!("{:020}.log", first)), bytes).expect("write a segment");
    }
    let purged = if u.arbitrary()? { Some(u.int_in_range(0..=300u64)?) } else { None };
    if let Ok(got) = wal_recover(dir, purged) {
        check_recovered(&got, None);
        if let (Some(p), Some(first)) = (purged, got.first()) {
            assert_eq!(first.log_id.index, p + 1, "recovered entries at or below the purged index, or a gap after it");
        }
        check_append_after(dir, &got, purged);
    }
    Ok(())
}

fn damaged(u: &mut Unstructured, dir: &Path) -> ArbResult<()> {
    let segment_bytes = u.int_in_range(1..=600u64)?;
    let n = u.int_in_range(1..=40u64)?;
    let mut written: Vec<E> = (1..=n).map(|i| entry(1, i, (i * 7 % 13) as u8)).collect();
    let batches: Vec<Vec<E>> = written.chunks(u.int_in_range(1..=8usize)?).map(|c| c.to_vec()).collect();
    wal_write(dir, segment_bytes, batches, None, None).expect("write the log");
    if u.arbitrary()? {
        // A new leader overwrites the tail from `cut`.
        let cut = u.int_in_range(1..=n)?;
        let more = u.int_in_range(0..=10u64)?;
        written.truncate(cut as usize - 1);
        let tail: Vec<E> = (cut..cut + more).map(|i| entry(2, i, (i * 3 % 11) as u8)).collect();
        written.extend(tail.iter().cloned());
        wal_write(dir, segment_bytes, vec![tail], Some(cut), None).expect("truncate and rewrite the log");
    }
    // A purge (after a snapshot), possibly past the last entry (a snapshot
    // installed from the leader), then more entries appended after it.
    let mut purged = None;
    if u.arbitrary()? {
        let last = written.last().map_or(0, |e| e.log_id.index);
        let p = u.int_in_range(1..=last + 20)?;
        let more: Vec<E> =
            if p >= last { (p + 1..=p + 3).map(|i| entry(3, i, (i % 7) as u8)).collect() } else { vec![] };
        wal_write(dir, segment_bytes, vec![more.clone()], None, Some(p)).expect("purge the log");
        written.retain(|e| e.log_id.index > p);
        written.extend(more);
        purged = Some(p);
    }
    let files = segments(dir);
    let mut first_deleted = false;
    for _ in 0..u.int_in_range(0..=3)? {
        let k = u.choose_index(files.len())?;
        let f = &files[k];
        let Ok(mut bytes) = fs::read(f) else { continue };
        match u.int_in_range(0..=3)? {
            0 => bytes.truncate(u.int_in_range(0..=bytes.len())?),
            1 if !bytes.is_empty() => {
                let at = u.choose_index(bytes.len())?;
                bytes[at] ^= u.int_in_range(1..=255)?;
            }
            2 => {
                let n = u.int_in_range(0..=64usize)?.min(u.len());
                bytes.extend_from_slice(u.bytes(n)?)
            }
            3 => {
                first_deleted |= k == 0;
                let _ = fs::remove_file(f);
                continue;
            }
            _ => {}
        }
        fs::write(f, bytes).expect("rewrite a segment");
    }
    if let Ok(got) = wal_recover(dir, purged) {
        if written.is_empty() {
            assert!(got.is_empty(), "recovered entries that were purged");
        } else {
            check_recovered(&got, Some(&written));
        }
        if !first_deleted || purged.is_some() {
            if let Some(first) = got.first() {
                assert_eq!(first.log_id.index, purged.unwrap_or(0) + 1, "recovery lost the start of the log");
            }
        }
        check_append_after(dir, &got, purged);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let wal = dir.path().join("wal");
    let mut u = Unstructured::new(data);
    let _ = match u.arbitrary::<u8>() {
        Ok(m) if m % 2 == 0 => raw(&mut u, &wal).or(Ok(())),
        Ok(_) => damaged(&mut u, &wal),
        Err(e) => Err(e),
    };
});
