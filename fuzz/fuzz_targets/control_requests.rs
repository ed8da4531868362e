//! Validation of every Control request (`manager/src/validate.rs`, and the
//! lookups `secret_store::find`/`list`, `service_api::find`/`tasks`):
//! arbitrary bytes decoded with prost as the request type the first byte
//! picks, validated against a state holding the nodes, secret and service of
//! `sample_commands`. Never panics; what validation accepts, the state
//! machine accepts too (a request that passes the API must not fail later as
//! a refused raft command), and what it returns obeys the limits it claims.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use prost::Message;
use swarmd_certs::{CertValidity, SecretId, ServiceId};
use swarmd_manager::fuzzing::*;
use swarmd_manager::services::ServiceRecord;
use swarmd_manager::state::{check_secret_name, check_serial, Command, StateView};
use swarmd_proto::control::*;

fn state() -> &'static FuzzStateMachine {
    static S: OnceLock<FuzzStateMachine> = OnceLock::new();
    S.get_or_init(|| {
        let mut sm = FuzzStateMachine::new().expect("a state machine");
        // Up to the service update: nodes, a secret with two versions, a service with tasks.
        let cmds = sample_commands().into_iter().take(12);
        let entries = cmds
            .enumerate()
            .map(|(i, c)| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
                payload: EntryPayload::Normal(c),
            })
            .collect();
        sm.apply(entries).expect("the samples apply");
        sm
    })
}

fn accepted(view: &StateView, cmd: &Command, what: &str) {
    if let Err(why) = plan_accepts(view, cmd) {
        panic!("{what}: validation accepted what the state machine refuses: {why}");
    }
}

fn id<T: std::str::FromStr>(n: u32) -> T
where
    T::Err: std::fmt::Debug,
{
    format!("{n:025}").parse().expect("an ID")
}

fn run(kind: u8, b: &[u8]) -> Option<()> {
    let view = state().view();
    let view = &view;
    match kind % 16 {
        0 => {
            let r = CreateSecretRequest::decode(b).ok()?;
            if let Ok((name, labels)) = validate_create_secret(view, &r) {
                assert!(check_secret_name(&name).is_ok());
                let cmd = Command::CreateSecret {
                    id: id::<SecretId>(77),
                    name,
                    labels,
                    created_at: 1,
                    data: sample_sealed(1, 9),
                };
                accepted(view, &cmd, "CreateSecret");
            }
        }
        1 => {
            let r = UpdateSecretRequest::decode(b).ok()?;
            if let Ok(rec) = validate_update_secret(view, &r) {
                let version = rec.latest().version + 1;
                let cmd = Command::AddSecretVersion { id: rec.id, version, created_at: 1, data: sample_sealed(1, 9) };
                accepted(view, &cmd, "UpdateSecret");
            }
        }
        2 => {
            let r = ListSecretsRequest::decode(b).ok()?;
            let _ = list_secrets(view, &r);
        }
        3 => {
            let r = GetSecretRequest::decode(b).ok()?;
            let _ = find_secret(view, &r.name_or_id);
        }
        4 => {
            let r = UpdateNodeRequest::decode(b).ok()?;
            if let Ok(cmd) = validate_update_node(view, &r) {
                accepted(view, &cmd, "UpdateNode");
            }
        }
        5 => {
            let r = GetNodeRequest::decode(b).ok()?;
            let _ = find_node(view, &r.id_or_prefix);
            let _ = validate_promote(view, &r.id_or_prefix);
            let _ = validate_demote(view, &r.id_or_prefix);
        }
        6 => {
            let r = RemoveNodeRequest::decode(b).ok()?;
            // Raft membership is outside the replicated state: none, and every recorded ID.
            let _ = validate_remove_node(view, &r, &Default::default());
            let members = view.nodes().unwrap_or_default().iter().filter_map(|n| n.raft_id).collect();
            if let Ok(n) = validate_remove_node(view, &r, &members) {
                let cmd = Command::RemoveNodes { nodes: vec![n.id], deny_until: 1 };
                accepted(view, &cmd, "RemoveNode");
            }
        }
        7 => {
            let r = IssueAdminCertificateRequest::decode(b).ok()?;
            if let Ok(v) = validate_issue_admin_certificate(&r, CertValidity::DEFAULT) {
                assert!(
                    v.duration() >= CertValidity::MIN
                        && v.duration() <= MAX_ADMIN_CERT.max(CertValidity::DEFAULT.duration())
                );
            }
        }
        8 => {
            let r = RevokeAdminCertificateRequest::decode(b).ok()?;
            if let Ok(serial) = validate_revoke_admin_certificate(&r) {
                assert!(check_serial(&serial).is_ok());
            }
        }
        9 => {
            let r = GetJoinTokenRequest::decode(b).ok()?;
            let _ = validate_get_join_token(&r);
        }
        10 => {
            let r = CreateServiceRequest::decode(b).ok()?;
            if let Ok((name, spec)) = validate_create_service(view, &r) {
                let rec =
                    ServiceRecord { id: id::<ServiceId>(78), name, spec, version: 1, created_at: 1, updated_at: 1 };
                accepted(view, &Command::CreateService(Box::new(rec)), "CreateService");
            }
        }
        11 => {
            let r = UpdateServiceRequest::decode(b).ok()?;
            if let Ok((cur, spec)) = validate_update_service(view, &r) {
                let cmd =
                    Command::UpdateService { id: cur.id, spec: Box::new(spec), expected_version: cur.version, at: 1 };
                accepted(view, &cmd, "UpdateService");
            }
        }
        12 => {
            let r = GetServiceRequest::decode(b).ok()?;
            let _ = find_service(view, &r.name_or_id);
            let _ = service_tasks(view, &r.name_or_id);
        }
        _ => {
            // Requests with nothing to validate must at least decode safely.
            let _ = UpdateClusterRequest::decode(b);
            let _ = GetUnlockKeyRequest::decode(b);
            let _ = ServiceLogsRequest::decode(b);
        }
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    if let Some((kind, rest)) = data.split_first() {
        let _ = run(*kind, rest);
    }
});
