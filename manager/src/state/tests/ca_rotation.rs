//! The root CA rotation's commands, and the leader's batching.

use super::*;
use crate::ca_rotation::{next_step, Step, BATCH};

fn rotation(id: u64) -> CaRotation {
    CaRotation {
        id,
        target_cert_pem: format!("new root {id}\n"),
        target_key: sealed(1, 9),
        cross_signed_pem: "cross".into(),
        started_at: 10,
        batch: vec![],
        batch_at: 0,
    }
}

fn ready(view: &StateView, n: usize) -> Vec<NodeId> {
    (0..n)
        .map(|_| {
            let mut w = node(Role::Worker);
            w.status = NodeStatus::Ready;
            apply(view, &Command::AddNode(w.clone())).unwrap();
            w.id
        })
        .collect()
}

#[test]
fn a_rotation_is_trusted_beside_the_root_until_it_finishes_with_new_tokens() {
    let (view, _) = initialised();
    assert_eq!(view.trust_bundle().unwrap().unwrap(), "pem");
    apply(&view, &Command::StartCaRotation(Box::new(rotation(5)))).unwrap();
    assert_eq!(view.trust_bundle().unwrap().unwrap(), "pemnew root 5\n");
    let finish =
        |id| Command::FinishCaRotation { id, worker_token: sealed(1, 11), manager_token: sealed(1, 12), at: 99 };
    assert_eq!(refused(&view, &finish(4)), Rejection::CaRotationSuperseded);
    let stale = Command::FinishCaRotation { id: 5, worker_token: sealed(0, 11), manager_token: sealed(1, 12), at: 99 };
    assert_eq!(refused(&view, &stale), Rejection::StaleDataKey);
    apply(&view, &finish(5)).unwrap();
    let c = view.cluster().unwrap().unwrap();
    assert_eq!(c.ca_cert_pem, "new root 5\n");
    assert_eq!((c.ca_key, c.worker_token, c.manager_token), (sealed(1, 9), sealed(1, 11), sealed(1, 12)));
    assert!(view.ca_rotation().unwrap().is_none());
    assert_eq!(view.trust_bundle().unwrap().unwrap(), "new root 5\n");
    let prev = view.previous_root().unwrap().unwrap();
    assert_eq!((prev.cert_pem.as_str(), prev.replaced_at), ("pem", 99));
    assert_eq!(refused(&view, &finish(5)), Rejection::CaRotationSuperseded);
}

#[test]
fn starting_over_forgets_convergence_toward_the_abandoned_root() {
    let (view, _) = initialised();
    let nodes = ready(&view, 2);
    apply(&view, &Command::StartCaRotation(Box::new(rotation(5)))).unwrap();
    apply(&view, &Command::CaConverged { node: nodes[0].clone(), id: 5 }).unwrap();
    assert!(view.ca_converged(&nodes[0], 5).unwrap());
    // An older or equal ID cannot replace it.
    assert_eq!(refused(&view, &Command::StartCaRotation(Box::new(rotation(5)))), Rejection::CaRotationSuperseded);
    apply(&view, &Command::StartCaRotation(Box::new(rotation(6)))).unwrap();
    assert!(!view.ca_converged(&nodes[0], 5).unwrap() && !view.ca_converged(&nodes[0], 6).unwrap());
    // A certificate of the abandoned rotation counts for nothing; nor one for a stranger.
    apply(&view, &Command::CaConverged { node: nodes[0].clone(), id: 5 }).unwrap();
    apply(&view, &Command::CaConverged { node: NodeId::random(), id: 6 }).unwrap();
    assert!(!view.ca_converged(&nodes[0], 6).unwrap());
    assert_eq!(
        refused(&view, &Command::CaRotationBatch { id: 5, nodes: vec![], at: 1 }),
        Rejection::CaRotationSuperseded
    );
}

#[test]
fn a_data_key_rotation_waits_for_a_ca_rotation() {
    let (view, _) = initialised();
    apply(&view, &Command::StartCaRotation(Box::new(rotation(5)))).unwrap();
    let add = Command::AddDataKey { key_id: 2, check: sealed(2, 4) };
    assert_eq!(refused(&view, &add), Rejection::CaRotationRunning);
    let stale = CaRotation { target_key: sealed(0, 9), ..rotation(6) };
    assert_eq!(refused(&view, &Command::StartCaRotation(Box::new(stale))), Rejection::StaleDataKey);
}

/// The leader asks at most a batch at once, refills when half of it has
/// converged or it grew stale, skips nodes that are down, and finishes when
/// every live node has converged.
#[test]
fn the_leader_asks_in_batches_and_finishes_when_every_live_node_converged() {
    // The first manager's status is unknown here: not live, so not waited for.
    let (view, _) = initialised();
    let nodes = ready(&view, BATCH + 30);
    apply(&view, &Command::StartCaRotation(Box::new(rotation(5)))).unwrap();
    let r = view.ca_rotation().unwrap().unwrap();
    let Some(Step::Batch(first)) = next_step(&view, &r, 100).unwrap() else { panic!("no first batch") };
    assert_eq!(first.len(), BATCH);
    apply(&view, &Command::CaRotationBatch { id: 5, nodes: first.clone(), at: 100 }).unwrap();
    let r = view.ca_rotation().unwrap().unwrap();
    assert_eq!(next_step(&view, &r, 101).unwrap(), None, "nothing has converged yet");
    // Stale: asked again, the same nodes.
    assert_eq!(next_step(&view, &r, 100 + 20).unwrap(), Some(Step::Batch(first.clone())));
    for n in &first[..BATCH / 2] {
        apply(&view, &Command::CaConverged { node: n.clone(), id: 5 }).unwrap();
    }
    let Some(Step::Batch(second)) = next_step(&view, &r, 102).unwrap() else { panic!("no refill") };
    // The 50 still waiting in the first batch, then the 30 never asked.
    assert_eq!(second.len(), nodes.len() - BATCH / 2);
    assert!(second.iter().all(|n| !first[..BATCH / 2].contains(n)), "converged nodes asked again");
    for n in &nodes {
        apply(&view, &Command::CaConverged { node: n.clone(), id: 5 }).unwrap();
    }
    assert_eq!(next_step(&view, &r, 103).unwrap(), Some(Step::Finish));
}

#[test]
fn an_external_ca_is_https_cfssl_and_rules_out_a_rotation() {
    let (view, _) = initialised();
    let ext = |protocol: &str, url: &str| {
        Command::SetExternalCa(Box::new(ExternalCaRecord {
            protocol: protocol.into(),
            url: url.into(),
            tls_roots_pem: String::new(),
        }))
    };
    for bad in [ext("acme", "https://ca:8888"), ext("cfssl", "http://ca:8888"), ext("cfssl", &"https://".repeat(400))] {
        assert!(matches!(refused(&view, &bad), Rejection::Invalid(_)));
        assert!(view.external_ca().unwrap().is_none());
    }
    let record =
        |url: &str| ExternalCaRecord { protocol: "cfssl".into(), url: url.into(), tls_roots_pem: String::new() };
    let update = |url: &str, key| Command::UpdateExternalCa { record: Box::new(record(url)), auth_key: key };
    // Only a cluster made with an external CA changes it.
    assert!(matches!(refused(&view, &update("https://ca2:8888", sealed(1, 5))), Rejection::Invalid(_)));
    apply(&view, &ext("cfssl", "https://ca:8888")).unwrap();
    assert_eq!(view.external_ca().unwrap().unwrap().url, "https://ca:8888");
    assert_eq!(refused(&view, &update("https://ca2:8888", sealed(0, 5))), Rejection::StaleDataKey);
    assert!(matches!(refused(&view, &update("http://ca2:8888", sealed(1, 5))), Rejection::Invalid(_)));
    assert_eq!(view.external_ca().unwrap().unwrap().url, "https://ca:8888");
    apply(&view, &update("https://ca2:8888", sealed(1, 5))).unwrap();
    assert_eq!(view.external_ca().unwrap().unwrap().url, "https://ca2:8888");
    assert_eq!(view.cluster().unwrap().unwrap().ca_key, sealed(1, 5));
    // No key to rotate from: refused by the state itself, whoever proposes it.
    let e = refused(&view, &Command::StartCaRotation(Box::new(rotation(5))));
    assert!(matches!(&e, Rejection::Invalid(m) if m.contains("external CA")), "{e}");
    assert!(view.ca_rotation().unwrap().is_none());
}
