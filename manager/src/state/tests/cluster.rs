//! The cluster record's commands.

use super::*;

#[test]
fn the_cluster_is_initialised_once() {
    let (view, m) = initialised();
    assert_eq!(view.node(&m.id).unwrap().unwrap(), m);
    let again = Command::InitCluster { cluster: Box::new(sample_cluster()), manager: node(Role::Manager) };
    assert_eq!(refused(&view, &again), Rejection::AlreadyInitialised);
}

#[test]
fn every_command_that_needs_the_cluster_is_refused_before_it_exists() {
    let view = empty();
    let cmds = [
        Command::RotateJoinToken { role: Role::Worker, token: sealed(1, 4) },
        Command::AddDataKey { key_id: 2, check: sealed(2, 4) },
        Command::Reseal { cluster: vec![], secrets: vec![] },
        Command::SetAutolock { unlock_key: None },
        Command::RetireDataKeys { below: 1 },
        Command::AddNode(node(Role::Worker)),
        Command::CreateSecret {
            id: SecretId::random(),
            name: "s".into(),
            labels: BTreeMap::new(),
            created_at: 1,
            data: sealed(1, 4),
        },
        Command::AddSecretVersion { id: SecretId::random(), version: 2, created_at: 1, data: sealed(1, 4) },
    ];
    for cmd in &cmds {
        assert_eq!(refused(&view, cmd), Rejection::NotInitialised, "{cmd:?}");
    }
}

#[test]
fn join_tokens_rotate_under_the_active_key_only() {
    let (view, _) = initialised();
    apply(&view, &Command::RotateJoinToken { role: Role::Worker, token: sealed(1, 7) }).unwrap();
    apply(&view, &Command::RotateJoinToken { role: Role::Manager, token: sealed(1, 8) }).unwrap();
    let c = view.cluster().unwrap().unwrap();
    assert_eq!((c.worker_token, c.manager_token), (sealed(1, 7), sealed(1, 8)));
    let stale = Command::RotateJoinToken { role: Role::Worker, token: sealed(0, 9) };
    assert_eq!(refused(&view, &stale), Rejection::StaleDataKey);
    let admin = Command::RotateJoinToken { role: Role::Admin, token: sealed(1, 9) };
    assert_eq!(refused(&view, &admin), Rejection::Invalid("there is no admin join token".into()));
}

#[test]
fn data_keys_count_up_by_one_with_a_check_under_the_new_key() {
    let (view, _) = initialised();
    let skip = Command::AddDataKey { key_id: 3, check: sealed(3, 4) };
    assert_eq!(refused(&view, &skip), Rejection::DataKeyOutOfOrder { key_id: 3, active: 1 });
    let wrong_check = Command::AddDataKey { key_id: 2, check: sealed(1, 4) };
    assert_eq!(refused(&view, &wrong_check), Rejection::DataKeyOutOfOrder { key_id: 2, active: 1 });
    apply(&view, &Command::AddDataKey { key_id: 2, check: sealed(2, 4) }).unwrap();
    let c = view.cluster().unwrap().unwrap();
    assert_eq!((c.data_key_id, c.data_key_check), (2, Some(sealed(2, 4))));
    // The rotation that read key 1 as active lost the race.
    let late = Command::AddDataKey { key_id: 2, check: sealed(2, 5) };
    assert_eq!(refused(&view, &late), Rejection::DataKeyOutOfOrder { key_id: 2, active: 2 });
}

#[test]
fn autolock_turns_on_under_the_active_key_and_off() {
    let (view, _) = initialised();
    let stale = Command::SetAutolock { unlock_key: Some(sealed(0, 4)) };
    assert_eq!(refused(&view, &stale), Rejection::StaleDataKey);
    apply(&view, &Command::SetAutolock { unlock_key: Some(sealed(1, 4)) }).unwrap();
    assert_eq!(view.cluster().unwrap().unwrap().unlock_key, Some(sealed(1, 4)));
    apply(&view, &Command::SetAutolock { unlock_key: None }).unwrap();
    assert_eq!(view.cluster().unwrap().unwrap().unlock_key, None);
}

#[test]
fn keys_retire_only_when_nothing_is_sealed_under_them() {
    let (view, _) = initialised();
    apply(&view, &Command::AddDataKey { key_id: 2, check: sealed(2, 4) }).unwrap();
    let too_far = Command::RetireDataKeys { below: 3 };
    assert_eq!(refused(&view, &too_far), Rejection::RetiresActiveKey { active: 2, below: 3 });
    let retire = Command::RetireDataKeys { below: 2 };
    assert_eq!(refused(&view, &retire), Rejection::FieldUnderOldKey { field: "CA key".into() });
    let c = view.cluster().unwrap().unwrap();
    let cluster = [
        (ClusterField::CaKey, c.ca_key.clone()),
        (ClusterField::WorkerToken, c.worker_token.clone()),
        (ClusterField::ManagerToken, c.manager_token.clone()),
    ]
    .into_iter()
    .map(|(field, old)| ResealField { field, old, new: sealed(2, 6) })
    .collect();
    apply(&view, &Command::Reseal { cluster, secrets: vec![] }).unwrap();
    let id = SecretId::random();
    // A secret sealed under key 1 is not possible any more (stale); put one
    // there through the state as it was before the rotation.
    let old = sealed(1, 5);
    let rec = SecretRecord {
        id: id.clone(),
        name: "old".into(),
        labels: BTreeMap::new(),
        created_at: 1,
        versions: vec![SecretVersion { version: 1, created_at: 1, size: 5, key_id: 1 }],
    };
    view.tree.insert(crate::state::secrets::secret_key(&id), encode(&rec)).unwrap();
    view.tree.insert(crate::state::secrets::secret_data_key(&id, 1), encode(&old)).unwrap();
    assert_eq!(refused(&view, &retire), Rejection::SecretsUnderOldKey { versions: 1 });
    let reseal = ResealSecret { id: id.clone(), version: 1, old, new: sealed(2, 5) };
    apply(&view, &Command::Reseal { cluster: vec![], secrets: vec![reseal] }).unwrap();
    apply(&view, &retire).unwrap();
    assert_eq!(view.cluster().unwrap().unwrap().retired_below, 2);
}

#[test]
fn a_reseal_replaces_only_what_it_read_and_only_under_the_active_key() {
    let (view, _) = initialised();
    let id = SecretId::random();
    let v1 = sealed(1, 5);
    let create = Command::CreateSecret {
        id: id.clone(),
        name: "s".into(),
        labels: BTreeMap::new(),
        created_at: 1,
        data: v1.clone(),
    };
    apply(&view, &create).unwrap();
    apply(&view, &Command::AddDataKey { key_id: 2, check: sealed(2, 4) }).unwrap();
    let reseal = |old: Sealed, new: Sealed| Command::Reseal {
        cluster: vec![ResealField { field: ClusterField::UnlockKey, old: sealed(1, 1), new: sealed(2, 1) }],
        secrets: vec![ResealSecret { id: id.clone(), version: 1, old, new }],
    };
    assert_eq!(refused(&view, &reseal(v1.clone(), sealed(1, 6))), Rejection::StaleDataKey);
    // A value other than the stored one: skipped, as is the absent unlock key.
    let before = view.digest().unwrap();
    apply(&view, &reseal(sealed(1, 7), sealed(2, 5))).unwrap();
    assert_eq!(view.digest().unwrap(), before, "a re-seal replaced a value it did not read");
    apply(&view, &reseal(v1, sealed(2, 5))).unwrap();
    assert_eq!(view.secret_data(&id, 1).unwrap().unwrap(), sealed(2, 5));
    assert_eq!(view.secret(&id).unwrap().unwrap().versions[0].key_id, 2);
}
