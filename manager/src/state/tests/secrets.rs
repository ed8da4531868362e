//! The secret commands.

use super::*;
use crate::services::{SecretRef, ServiceRecord};

fn create(id: &SecretId, name: &str, data: Sealed) -> Command {
    Command::CreateSecret { id: id.clone(), name: name.into(), labels: BTreeMap::new(), created_at: 1, data }
}

fn add(id: &SecretId, version: u32, data: Sealed) -> Command {
    Command::AddSecretVersion { id: id.clone(), version, created_at: 2, data }
}

#[test]
fn secrets_are_created_with_unique_names_and_ids() {
    let (view, _) = initialised();
    let id = SecretId::random();
    apply(&view, &create(&id, "db", sealed(1, 5))).unwrap();
    let rec = view.secret(&id).unwrap().unwrap();
    assert_eq!((rec.name.as_str(), rec.latest().version, rec.latest().size), ("db", 1, 5));
    assert_eq!(view.secret_id_by_name("db").unwrap(), Some(id.clone()));
    assert_eq!(view.secret_data(&id, 1).unwrap(), Some(sealed(1, 5)));
    let other = SecretId::random();
    assert_eq!(
        refused(&view, &create(&other, "db", sealed(1, 5))),
        Rejection::NameInUse { kind: ObjectKind::Secret, name: "db".into(), holder: id.to_string() }
    );
    assert_eq!(
        refused(&view, &create(&id, "db2", sealed(1, 5))),
        Rejection::IdInUse { kind: ObjectKind::Secret, id: id.to_string() }
    );
}

#[test]
fn invalid_secrets_are_refused_by_the_validation_rules() {
    let (view, _) = initialised();
    let id = SecretId::random();
    let invalid = |cmd: &Command| match refused(&view, cmd) {
        Rejection::Invalid(why) => why,
        other => panic!("{cmd:?}: {other:?}"),
    };
    assert!(invalid(&create(&id, "-db", sealed(1, 5))).starts_with("invalid secret name"));
    assert_eq!(invalid(&create(&id, "db", sealed(1, 0))), "secret value is empty");
    let mut labelled = create(&id, "db", sealed(1, 5));
    if let Command::CreateSecret { labels, .. } = &mut labelled {
        labels.insert("bad key".into(), "v".into());
    }
    assert!(invalid(&labelled).starts_with("invalid label key"));
    assert_eq!(refused(&view, &create(&id, "db", sealed(0, 5))), Rejection::StaleDataKey);
}

#[test]
fn versions_follow_one_another_and_only_the_newest_ten_are_kept() {
    let (view, _) = initialised();
    let id = SecretId::random();
    apply(&view, &create(&id, "db", sealed(1, 5))).unwrap();
    assert_eq!(
        refused(&view, &add(&id, 3, sealed(1, 6))),
        Rejection::SecretUpdatedMeanwhile { name: "db".into(), next: 2, proposed: 3 }
    );
    assert_eq!(refused(&view, &add(&id, 2, sealed(0, 6))), Rejection::StaleDataKey);
    assert!(matches!(refused(&view, &add(&id, 2, sealed(1, 0))), Rejection::Invalid(_)));
    let stranger = SecretId::random();
    assert_eq!(refused(&view, &add(&stranger, 2, sealed(1, 6))), Rejection::NotFound(Missing::Secret(stranger)));
    for v in 2..=12 {
        apply(&view, &add(&id, v, sealed(1, v as u8))).unwrap();
    }
    let rec = view.secret(&id).unwrap().unwrap();
    let kept: Vec<u32> = rec.versions.iter().map(|v| v.version).collect();
    assert_eq!(kept, (3..=12).collect::<Vec<_>>());
    assert_eq!(view.secret_data(&id, 2).unwrap(), None, "the value of a dropped version is deleted");
    assert_eq!(view.secret_data(&id, 12).unwrap(), Some(sealed(1, 12)));
}

#[test]
fn a_secret_in_use_is_not_removed_and_a_removed_one_frees_its_name() {
    let (view, _) = initialised();
    let id = SecretId::random();
    apply(&view, &create(&id, "db", sealed(1, 5))).unwrap();
    let mut spec = spec();
    spec.secrets.push(SecretRef {
        secret: id.clone(),
        name: "db".into(),
        target: "db".into(),
        uid: 0,
        gid: 0,
        mode: 0o400,
        pin: None,
    });
    let svc =
        ServiceRecord { id: ServiceId::random(), name: "web".into(), spec, version: 1, created_at: 1, updated_at: 1 };
    apply(&view, &Command::CreateService(Box::new(svc.clone()))).unwrap();
    let rm = Command::RemoveSecret { id: id.clone() };
    assert_eq!(refused(&view, &rm), Rejection::SecretInUse { name: "db".into(), services: vec!["web".into()] });
    apply(&view, &Command::RemoveService { id: svc.id.clone() }).unwrap();
    apply(&view, &rm).unwrap();
    assert!(view.secret(&id).unwrap().is_none());
    assert_eq!(view.secret_data(&id, 1).unwrap(), None);
    assert_eq!(refused(&view, &rm), Rejection::NotFound(Missing::Secret(id)));
    apply(&view, &create(&SecretId::random(), "db", sealed(1, 5))).unwrap();
}
