//! Certificates: the records node commands keep, and the admin certificate commands.

use super::*;

#[test]
fn demotion_refuses_every_manager_certificate_and_removal_every_certificate() {
    let (view, _) = initialised();
    let mut m = node(Role::Manager);
    m.cert_serial = "a1".into();
    m.cert_not_after = 100;
    apply(&view, &Command::AddNode(m.clone())).unwrap();
    let renewal = |serial: &str, not_after, role, at| Command::RecordCert {
        node: m.id.clone(),
        serial: serial.into(),
        not_after,
        role,
        at,
    };
    apply(&view, &renewal("a2", 200, Role::Manager, 50)).unwrap();
    apply(&view, &renewal("a3", 300, Role::Manager, 150)).unwrap();
    let held: Vec<String> = view.node_certs(&m.id).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(held, ["a2", "a3"], "certificates expired before the renewal are forgotten");
    assert!(view.denied().unwrap().serials.is_empty());

    apply(&view, &Command::SetRole { node: m.id.clone(), role: Role::Worker }).unwrap();
    let denied = view.denied().unwrap();
    assert_eq!(denied.serials, ["a2".to_string(), "a3".to_string()].into_iter().collect());
    assert!(denied.nodes.is_empty(), "a demoted node is still a member");
    // A manager certificate that raced the demotion is refused from the start.
    apply(&view, &renewal("a4", 400, Role::Manager, 160)).unwrap();
    assert!(view.denied().unwrap().serials.contains("a4"));
    // Its worker certificate is not.
    apply(&view, &renewal("b1", 400, Role::Worker, 160)).unwrap();
    assert!(!view.denied().unwrap().serials.contains("b1"));

    apply(&view, &Command::RemoveNodes { nodes: vec![m.id.clone()], deny_until: 500 }).unwrap();
    assert!(view.denied().unwrap().nodes.contains(&m.id));
    assert!(view.node_certs(&m.id).unwrap().is_empty());
}

fn admin(serial: &str, issued_at: i64, not_after: i64) -> AdminCertRecord {
    AdminCertRecord { serial: serial.into(), id: NodeId::random(), issued_at, not_after, revoked_at: None }
}

#[test]
fn admin_certificates_are_recorded_once_with_valid_serials() {
    let (view, _) = initialised();
    apply(&view, &Command::RecordAdminCert(admin("0a", 10, 100))).unwrap();
    assert_eq!(view.admin_cert("0a").unwrap().unwrap().issued_at, 10);
    let again = Command::RecordAdminCert(admin("0a", 11, 100));
    assert_eq!(refused(&view, &again), Rejection::AdminCertExists { serial: "0a".into() });
    let bad = Command::RecordAdminCert(admin("NOT-HEX", 11, 100));
    assert_eq!(refused(&view, &bad), Rejection::InvalidSerial { serial: "NOT-HEX".into() });
    assert!(!Rejection::InvalidSerial { serial: "x".into() }.to_string().contains("secretctl"));
}

#[test]
fn admin_certificates_are_revoked_and_pruned_once_expired() {
    let (view, _) = initialised();
    apply(&view, &Command::RecordAdminCert(admin("0a", 10, 100))).unwrap();
    let unknown = Command::RevokeAdminCert { serial: "0b".into(), at: 20 };
    assert_eq!(refused(&view, &unknown), Rejection::NotFound(Missing::AdminCert { serial: "0b".into() }));
    apply(&view, &Command::RevokeAdminCert { serial: "0a".into(), at: 20 }).unwrap();
    assert_eq!(view.admin_cert("0a").unwrap().unwrap().revoked_at, Some(20));
    assert!(view.denied().unwrap().serials.contains("0a"));
    // Revoking again keeps the first revocation time.
    apply(&view, &Command::RevokeAdminCert { serial: "0a".into(), at: 30 }).unwrap();
    assert_eq!(view.admin_cert("0a").unwrap().unwrap().revoked_at, Some(20));
    // Issuing after it expired forgets it and its denial.
    apply(&view, &Command::RecordAdminCert(admin("0c", 200, 300))).unwrap();
    assert!(view.admin_cert("0a").unwrap().is_none());
    assert!(!view.denied().unwrap().serials.contains("0a"));
    assert_eq!(view.admin_certs().unwrap().len(), 1);
}
