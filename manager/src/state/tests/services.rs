//! The service commands.

use super::*;

fn with_secret(view: &StateView) -> (SecretId, SecretRef) {
    let id = SecretId::random();
    let create = Command::CreateSecret {
        id: id.clone(),
        name: "db".into(),
        labels: BTreeMap::new(),
        created_at: 1,
        data: sealed(1, 5),
    };
    apply(view, &create).unwrap();
    let r = SecretRef {
        secret: id.clone(),
        name: "db".into(),
        target: "db".into(),
        uid: 0,
        gid: 0,
        mode: 0o400,
        pin: None,
    };
    (id, r)
}

#[test]
fn services_are_created_with_unique_names_and_ids() {
    let (view, _) = initialised();
    let web = service("web", 2);
    apply(&view, &Command::CreateService(Box::new(web.clone()))).unwrap();
    assert_eq!(view.service(&web.id).unwrap().unwrap(), web);
    assert_eq!(view.service_id_by_name("web").unwrap(), Some(web.id.clone()));
    let mut twin = service("web", 1);
    assert_eq!(
        refused(&view, &Command::CreateService(Box::new(twin.clone()))),
        Rejection::NameInUse { kind: ObjectKind::Service, name: "web".into(), holder: web.id.to_string() }
    );
    twin.id = web.id.clone();
    twin.name = "web2".into();
    assert_eq!(
        refused(&view, &Command::CreateService(Box::new(twin))),
        Rejection::IdInUse { kind: ObjectKind::Service, id: web.id.to_string() }
    );
}

#[test]
fn invalid_services_are_refused_with_what_is_wrong() {
    let (view, _) = initialised();
    let create = |f: &dyn Fn(&mut ServiceRecord)| {
        let mut s = service("web", 1);
        f(&mut s);
        refused(&view, &Command::CreateService(Box::new(s)))
    };
    match create(&|s| s.name = "-web".into()) {
        Rejection::Invalid(why) => assert!(why.starts_with("invalid service name"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(create(&|s| s.spec.image = "rel".into()), Rejection::InvalidSpec(SpecError::Image("rel".into())));
    assert_eq!(create(&|s| s.spec.args.clear()), Rejection::InvalidSpec(SpecError::NoCommand));
    assert_eq!(create(&|s| s.spec.replicas = 1001), Rejection::InvalidSpec(SpecError::Replicas(1001)));
    assert_eq!(create(&|s| s.spec.env = vec!["=x".into()]), Rejection::InvalidSpec(SpecError::Env("=x".into())));
    assert_eq!(create(&|s| s.spec.memory = Some(1000)), Rejection::InvalidSpec(SpecError::Memory));
    assert_eq!(create(&|s| s.spec.pids = Some(0)), Rejection::InvalidSpec(SpecError::Pids));
    // References to secrets that are not there.
    let (id, r) = with_secret(&view);
    let ghost = SecretId::random();
    let missing = create(&|s| s.spec.secrets = vec![SecretRef { secret: ghost.clone(), ..r.clone() }]);
    assert_eq!(missing, Rejection::NotFound(Missing::SecretRef { name: "db".into(), id: ghost.clone() }));
    let pinned = create(&|s| s.spec.secrets = vec![SecretRef { pin: Some(2), ..r.clone() }]);
    assert_eq!(pinned, Rejection::NotFound(Missing::SecretVersion { name: "db".into(), version: 2 }));
    let twice = create(&|s| s.spec.secrets = vec![r.clone(), SecretRef { secret: id.clone(), ..r.clone() }]);
    assert_eq!(twice, Rejection::InvalidSpec(SpecError::DuplicateTarget("db".into())));
    let mode = create(&|s| s.spec.secrets = vec![SecretRef { mode: 0o1777, ..r.clone() }]);
    assert_eq!(mode, Rejection::InvalidSpec(SpecError::Mode { name: "db".into(), mode: 0o1777 }));
    let target = create(&|s| s.spec.secrets = vec![SecretRef { target: "..".into(), ..r.clone() }]);
    assert!(matches!(target, Rejection::InvalidSpec(SpecError::Target(_))), "{target:?}");
}

#[test]
fn updates_apply_to_the_version_they_read_and_only_a_new_spec_bumps_it() {
    let (view, _) = initialised();
    let web = service("web", 1);
    apply(&view, &Command::CreateService(Box::new(web.clone()))).unwrap();
    let update = |spec: ServiceSpec, expected_version| Command::UpdateService {
        id: web.id.clone(),
        spec: Box::new(spec),
        expected_version,
        at: 9,
    };
    let mut scaled = web.spec.clone();
    scaled.replicas = 3;
    apply(&view, &update(scaled.clone(), 1)).unwrap();
    let got = view.service(&web.id).unwrap().unwrap();
    assert_eq!((got.version, got.spec.replicas, got.updated_at), (1, 3, 9), "scaling keeps the version");
    let mut changed = scaled.clone();
    changed.env.push("B=2".into());
    apply(&view, &update(changed.clone(), 1)).unwrap();
    assert_eq!(view.service(&web.id).unwrap().unwrap().version, 2);
    assert_eq!(refused(&view, &update(scaled, 1)), Rejection::ServiceUpdatedMeanwhile { name: "web".into() });
    let mut bad = changed;
    bad.pids = Some(0);
    assert_eq!(refused(&view, &update(bad, 2)), Rejection::InvalidSpec(SpecError::Pids));
    let ghost = ServiceId::random();
    let stranger = Command::UpdateService { id: ghost.clone(), spec: Box::new(spec()), expected_version: 1, at: 9 };
    assert_eq!(refused(&view, &stranger), Rejection::NotFound(Missing::Service(ghost)));
}

#[test]
fn removal_frees_the_name_and_stops_the_tasks() {
    let (view, _) = initialised();
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    let web = service("web", 1);
    apply(&view, &Command::CreateService(Box::new(web.clone()))).unwrap();
    let t = task(&web, 1, &w.id);
    apply(&view, &Command::Schedule { create: vec![t.clone()], stop: vec![], delete: vec![] }).unwrap();
    apply(&view, &Command::RemoveService { id: web.id.clone() }).unwrap();
    assert!(view.service(&web.id).unwrap().is_none());
    assert!(!view.task(&t.id).unwrap().unwrap().desired_running, "its tasks are told to stop");
    assert_eq!(
        refused(&view, &Command::RemoveService { id: web.id.clone() }),
        Rejection::NotFound(Missing::Service(web.id))
    );
    apply(&view, &Command::CreateService(Box::new(service("web", 1)))).unwrap();
}
