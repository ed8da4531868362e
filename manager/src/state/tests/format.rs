//! The command log format: entries written before the format had a version
//! (captured from that code, as hex) still decode to the same commands.

use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use swarmd_certs::TaskId;

use super::*;
use crate::raft::TypeConfig;

type E = Entry<TypeConfig>;

/// The entries of the fixture, as the code before the envelope built them.
fn fixture_entries() -> Vec<E> {
    let id = |n: u32| -> NodeId { format!("{n:025}").parse().unwrap() };
    let mut w = node(Role::Worker);
    w.id = id(2);
    w.labels.insert("zone".into(), "eu".into());
    let batch = Command::Batch(vec![
        Command::AddNode(w),
        Command::SetStatus(vec![StatusChange {
            node: id(2),
            status: NodeStatus::Ready,
            addr: Some("10.0.0.2:1".into()),
            reporter: id(1),
        }]),
        Command::CreateSecret {
            id: format!("{:025}", 20).parse().unwrap(),
            name: "db_pass".into(),
            labels: BTreeMap::from([("a".to_string(), "b".to_string())]),
            created_at: 170,
            data: sealed(1, 5),
        },
        Command::UpdateNode {
            node: id(2),
            availability: Some(Availability::Drain),
            labels_add: vec![("k".into(), "v".into())],
            labels_rm: vec!["zone".into()],
        },
        Command::RevokeAdminCert { serial: "0a".into(), at: 240 },
        Command::RemoveNodes { nodes: vec![id(3)], deny_until: 2_000_000 },
    ]);
    let entry = |index, payload| E { log_id: LogId::new(CommittedLeaderId::new(3, 1), index), payload };
    let task: TaskId = format!("{:025}", 41).parse().unwrap();
    vec![
        entry(7, EntryPayload::Normal(batch)),
        entry(8, EntryPayload::Normal(Command::SetAutolock { unlock_key: Some(sealed(1, 9)) })),
        entry(9, EntryPayload::Normal(Command::Schedule { create: vec![], stop: vec![task], delete: vec![] })),
    ]
}

/// `fixture_entries()` bincode'd by the code before the envelope (format
/// version 0), one entry per line.
const VERSION_0: [&str; 3] = [
    concat!(
        "030000000000000001000000000000000700000000000000010000001700000006000000000000000100000019000000",
        "000000003030303030303030303030303030303030303030303030303201000000000000000b00000000000000313237",
        "2e302e302e313a3101000000000000006802000000000000003031000000000000000000000000000000000001000000",
        "0000000004000000000000007a6f6e650200000000000000657500000000000300000001000000000000001900000000",
        "0000003030303030303030303030303030303030303030303030303201000000010a0000000000000031302e302e302e",
        "323a31190000000000000030303030303030303030303030303030303030303030303031090000001900000000000000",
        "30303030303030303030303030303030303030303030303230070000000000000064625f706173730100000000000000",
        "010000000000000061010000000000000062aa0000000000000001000000050505050505050505050505050505050505",
        "050505050505150000000000000005050505050505050505050505050505050505050508000000190000000000000030",
        "3030303030303030303030303030303030303030303030320101000000010000000000000001000000000000006b0100",
        "00000000000076010000000000000004000000000000007a6f6e651600000002000000000000003061f0000000000000",
        "000600000001000000000000001900000000000000303030303030303030303030303030303030303030303030338084",
        "1e0000000000",
    ),
    concat!(
        "030000000000000001000000000000000800000000000000010000000f00000001010000000909090909090909090909",
        "09090909090909090909090909190000000000000009090909090909090909090909090909090909090909090909",
    ),
    concat!(
        "030000000000000001000000000000000900000000000000010000001300000000000000000000000100000000000000",
        "1900000000000000303030303030303030303030303030303030303030303034310000000000000000",
    ),
];

#[test]
fn entries_written_before_the_format_version_still_decode_to_the_same_commands() {
    for (hex, expected) in VERSION_0.iter().zip(fixture_entries()) {
        let old = hex::decode(hex).unwrap();
        let got: E = bincode::deserialize(&old).expect("a version 0 entry decodes");
        assert_eq!(got.log_id, expected.log_id);
        // Commands have no `PartialEq` (sealed values compare, but records
        // holding them need not): equal commands encode alike.
        let (got, expected) = (bincode::serialize(&got).unwrap(), bincode::serialize(&expected).unwrap());
        assert_eq!(got, expected, "a version 0 entry decodes to another command");
        assert_ne!(got, old, "entries are written in the new format");
    }
}

#[test]
fn commands_are_written_in_a_versioned_envelope_and_read_back() {
    let cmd = Command::RetireDataKeys { below: 4 };
    let bytes = bincode::serialize(&cmd).unwrap();
    let mut head = ENVELOPE_TAG.to_le_bytes().to_vec();
    head.extend(FORMAT_VERSION.to_le_bytes());
    assert_eq!(&bytes[..8], &head[..]);
    let back: Command = bincode::deserialize(&bytes).unwrap();
    assert!(matches!(back, Command::RetireDataKeys { below: 4 }), "{back:?}");
    for e in fixture_entries() {
        let bytes = bincode::serialize(&e).unwrap();
        let back: E = bincode::deserialize(&bytes).unwrap();
        assert_eq!(bincode::serialize(&back).unwrap(), bytes);
    }
}

#[test]
fn a_newer_format_version_is_refused_not_misread() {
    let mut bytes = bincode::serialize(&Command::RetireDataKeys { below: 4 }).unwrap();
    bytes[4..8].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let err = bincode::deserialize::<Command>(&bytes).unwrap_err().to_string();
    assert!(err.contains("command format version 2 is newer"), "{err}");
    // Nor is a version 0 variant index that never existed accepted.
    let err = bincode::deserialize::<Command>(&[24, 0, 0, 0]).unwrap_err().to_string();
    assert!(!err.is_empty());
}

/// A hostile entry cannot nest batches until the decoder's recursion
/// exhausts the stack: a batch in a batch still decodes (it is refused when
/// applied), one level more is refused with an error, and deep nesting too
/// (this test would overflow the stack without the limit). Built by hand in
/// the version 0 layout, since the encoder cannot write a deeper entry than
/// it is given: variant index (u32) of `Batch`, then a u64 count of 1, repeated.
#[test]
fn deeply_nested_batches_are_refused_while_decoding() {
    let batch_index = {
        let bytes = bincode::serialize(&Command::Batch(Vec::new())).unwrap();
        // envelope tag, version, then the derived variant index
        u32::from_le_bytes(bytes[8..12].try_into().unwrap())
    };
    let nested = |levels: usize| {
        let mut v = Vec::new();
        for _ in 0..levels {
            v.extend_from_slice(&batch_index.to_le_bytes());
            v.extend_from_slice(&1u64.to_le_bytes());
        }
        // the innermost: an empty batch
        v.extend_from_slice(&batch_index.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        v
    };
    assert!(bincode::deserialize::<Command>(&nested(2)).is_ok(), "a batch in a batch decodes");
    let e = bincode::deserialize::<Command>(&nested(3)).unwrap_err();
    assert!(e.to_string().contains("levels deep"), "{e}");
    assert!(bincode::deserialize::<Command>(&nested(1_000_000)).is_err());
    // The limit is per decode: a normal command decodes after a refusal.
    assert!(bincode::deserialize::<Command>(&nested(0)).is_ok());
}
