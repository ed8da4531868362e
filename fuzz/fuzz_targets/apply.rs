//! The state machine's apply (`manager/src/state`, `raft/state_machine.rs`)
//! of arbitrary commands.
//!
//! The input picks a sequence of raft entries: commands from a valid cluster
//! life (`sample_commands`) verbatim, reordered and repeated, the same with
//! their encoding mutated (bytes overwritten, integers set to extremes), or
//! commands decoded from raw input bytes, alone or in batches. They are applied
//! to two fresh state machines: one entry per `apply` call on the first, all
//! of them in one call on the second (as raft does when several commit
//! together). Apply must never panic; a refused command must change nothing;
//! and both must give the same results and end in the same state (apply is
//! deterministic, and planning against pending writes equals applying them).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use swarmd_manager::raft::fuzzing::{sample_commands, FuzzStateMachine};
use swarmd_manager::raft::TypeConfig;
use swarmd_manager::state::{Command, CommandResult};

fn samples() -> &'static [Vec<u8>] {
    static S: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| sample_commands().iter().map(|c| bincode::serialize(c).expect("encode")).collect())
}

const EXTREMES: [u64; 8] =
    [0, 1, u32::MAX as u64, u32::MAX as u64 + 1, i64::MAX as u64, i64::MIN as u64, u64::MAX, 1 << 40];

fn one(u: &mut Unstructured) -> ArbResult<Option<Command>> {
    let s = samples();
    Ok(match u.int_in_range(0..=2)? {
        0 => Some(bincode::deserialize(&s[u.choose_index(s.len())?]).expect("a sample decodes")),
        1 => {
            let mut bytes = s[u.choose_index(s.len())?].clone();
            for _ in 0..u.int_in_range(1..=4)? {
                let at = u.choose_index(bytes.len())?;
                match u.int_in_range(0..=2)? {
                    0 => bytes[at] = u.arbitrary()?,
                    1 => {
                        let v = EXTREMES[u.choose_index(EXTREMES.len())?].to_le_bytes();
                        let w = [1usize, 4, 8][u.choose_index(3)?];
                        let end = (at + w).min(bytes.len());
                        bytes[at..end].copy_from_slice(&v[..end - at]);
                    }
                    _ => {
                        let n = u.int_in_range(0..=16usize)?.min(u.len());
                        let extra = u.bytes(n)?;
                        bytes.splice(at..at, extra.iter().copied());
                    }
                }
            }
            bincode::deserialize(&bytes).ok()
        }
        _ => {
            let len = u.int_in_range(0..=512usize)?.min(u.len());
            bincode::deserialize(u.bytes(len)?).ok()
        }
    })
}

fn entries(u: &mut Unstructured) -> ArbResult<Vec<Entry<TypeConfig>>> {
    let mut out = Vec::new();
    for index in 1..=u.int_in_range(1..=24u64)? {
        let payload = match u.int_in_range(0..=9)? {
            0 => EntryPayload::Blank,
            1 => {
                let mut cmds = Vec::new();
                for _ in 0..u.int_in_range(0..=4)? {
                    cmds.extend(one(u)?);
                }
                EntryPayload::Normal(Command::Batch(cmds))
            }
            _ => match one(u)? {
                Some(c) => EntryPayload::Normal(c),
                None => continue,
            },
        };
        out.push(Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload });
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(entries) = entries(&mut u) else { return };
    let mut one_by_one = FuzzStateMachine::new().expect("a state machine");
    let mut results = Vec::new();
    for e in &entries {
        let before = one_by_one.digest().expect("digest");
        let r = one_by_one.apply(vec![e.clone()]).expect("apply never fails on a healthy store");
        assert_eq!(r.len(), 1, "one result per entry");
        if let CommandResult::Rejected(_) = r[0] {
            assert_eq!(one_by_one.digest().expect("digest"), before, "a refused command changed the state");
        }
        results.extend(r);
    }
    let mut together = FuzzStateMachine::new().expect("a state machine");
    let r = together.apply(entries).expect("apply never fails on a healthy store");
    assert_eq!(r, results, "results depend on how entries were grouped");
    assert_eq!(together.digest().expect("digest"), one_by_one.digest().expect("digest"), "the states diverged");
});
