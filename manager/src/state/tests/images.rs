//! Image records: recorded only once a majority of the managers hold the
//! blobs, names that move, removal refused while a service runs the image.

use super::*;

fn digest(s: &str) -> String {
    swarmd_image::Digest::of(s.as_bytes()).to_string()
}

fn image(tag: &str, holders: &[&NodeId]) -> ImageRecord {
    ImageRecord {
        digest: digest(&format!("manifest {tag}")),
        manifest_size: 400,
        platform: "linux/amd64".into(),
        config: ImageBlob {
            digest: digest(&format!("config {tag}")),
            size: 300,
            media_type: "c".into(),
            diff_id: String::new(),
        },
        layers: vec![ImageBlob {
            digest: digest(&format!("layer {tag}")),
            size: 1000,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: digest(&format!("tar {tag}")),
        }],
        holders: holders.iter().map(|h| (*h).clone()).collect(),
        created_at: 5,
    }
}

/// Three managers that are raft members; the first is the initial one.
fn three_managers() -> (StateView, [NodeId; 3]) {
    let (view, m1) = initialised();
    let mut ids = vec![m1.id.clone()];
    apply(&view, &Command::SetRaftMember { node: m1.id.clone(), raft_id: 1, addr: "a:1".into() }).unwrap();
    for raft_id in [2, 3] {
        let m = node(Role::Manager);
        apply(&view, &Command::AddNode(m.clone())).unwrap();
        apply(&view, &Command::SetRaftMember { node: m.id.clone(), raft_id, addr: format!("a:{raft_id}") }).unwrap();
        ids.push(m.id);
    }
    (view, ids.try_into().unwrap())
}

fn put(img: &ImageRecord, name: Option<&str>) -> Command {
    Command::PutImage { image: Box::new(img.clone()), name: name.map(str::to_owned) }
}

#[test]
fn an_image_is_recorded_only_once_a_majority_of_managers_hold_its_blobs() {
    let (view, [m1, m2, m3]) = three_managers();
    let e = refused(&view, &put(&image("a", &[&m1]), Some("app:1")));
    assert!(matches!(&e, Rejection::Invalid(m) if m.contains("majority (2)")), "{e}");
    // A worker cannot count toward it.
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    let e = refused(&view, &put(&image("a", &[&m1, &w.id]), None));
    assert!(matches!(&e, Rejection::Invalid(m) if m.contains("not a manager")), "{e}");
    apply(&view, &put(&image("a", &[&m1, &m2]), Some("app:1"))).unwrap();
    let rec = view.resolve_image("app:1").unwrap().unwrap();
    assert_eq!(rec.digest, image("a", &[]).digest);
    assert_eq!(view.resolve_image(&rec.digest).unwrap().unwrap(), rec);
    assert_eq!(view.resolve_image(&format!("app@{}", rec.digest)).unwrap().unwrap(), rec);
    assert!(view.resolve_image("app:2").unwrap().is_none());
    // The third manager fetched the blobs later.
    apply(&view, &Command::ImageHeld { digest: rec.digest.clone(), node: m3.clone() }).unwrap();
    let mut want = vec![m1, m2, m3];
    want.sort();
    assert_eq!(view.image(&rec.digest).unwrap().unwrap().holders, want);
    assert!(matches!(
        refused(&view, &Command::ImageHeld { digest: digest("none"), node: want[0].clone() }),
        Rejection::Invalid(_)
    ));
    assert_eq!(rec.size(), 1700);
}

#[test]
fn names_move_and_bad_records_are_refused() {
    let (view, [m1, m2, _]) = three_managers();
    apply(&view, &put(&image("a", &[&m1, &m2]), Some("app:1"))).unwrap();
    apply(&view, &put(&image("b", &[&m1, &m2]), Some("app:1"))).unwrap();
    assert_eq!(view.resolve_image("app:1").unwrap().unwrap().digest, image("b", &[]).digest);
    assert_eq!(view.image_names(&image("a", &[]).digest).unwrap(), Vec::<String>::new());
    assert_eq!(view.images().unwrap().len(), 2);
    for name in ["", "a b", "sha256:abc", "x@sha256:abc"] {
        assert!(
            matches!(refused(&view, &put(&image("c", &[&m1, &m2]), Some(name))), Rejection::Invalid(_)),
            "{name:?}"
        );
    }
    let mut bad = image("c", &[&m1, &m2]);
    bad.layers[0].diff_id = "md5:00".into();
    assert!(matches!(refused(&view, &put(&bad, None)), Rejection::Invalid(_)));
    let mut none = image("c", &[&m1, &m2]);
    none.layers.clear();
    assert!(matches!(refused(&view, &put(&none, None)), Rejection::Invalid(_)));
}

#[test]
fn an_image_a_service_runs_is_not_removed() {
    let (view, [m1, m2, _]) = three_managers();
    let img = image("a", &[&m1, &m2]);
    apply(&view, &put(&img, Some("app:1"))).unwrap();
    // Services that name it, pinned as admission pins them.
    let mut web = service("web", 1);
    web.spec.image = format!("app:1@{}", img.digest);
    let mut api = service("api", 1);
    api.spec.image = img.digest.clone();
    for s in [&web, &api] {
        apply(&view, &Command::CreateService(Box::new(s.clone()))).unwrap();
    }
    let rm = Command::RemoveImage { digest: img.digest.clone() };
    assert_eq!(
        refused(&view, &rm),
        Rejection::ImageInUse { image: img.digest.clone(), services: vec!["api".into(), "web".into()] }
    );
    apply(&view, &Command::RemoveService { id: web.id.clone() }).unwrap();
    apply(&view, &Command::RemoveService { id: api.id.clone() }).unwrap();
    apply(&view, &rm).unwrap();
    assert!(view.image(&img.digest).unwrap().is_none());
    assert!(view.resolve_image("app:1").unwrap().is_none());
    assert!(matches!(refused(&view, &rm), Rejection::Invalid(_)));
}

#[test]
fn a_service_runs_a_host_directory_only_where_the_cluster_allows_it() {
    let view = empty();
    let m = node(Role::Manager);
    apply(&view, &Command::InitCluster { cluster: Box::new(sample_cluster()), manager: m }).unwrap();
    assert!(!view.host_rootfs_allowed().unwrap(), "allowed by default");
    let web = service("web", 1);
    let e = refused(&view, &Command::CreateService(Box::new(web.clone())));
    assert!(matches!(&e, Rejection::Invalid(m) if m.contains("--allow-host-rootfs")), "{e}");
    apply(&view, &Command::SetHostRootfs { allowed: true }).unwrap();
    apply(&view, &Command::CreateService(Box::new(web.clone()))).unwrap();
    // Turned off again: the service keeps its directory through updates that
    // leave the image alone, and cannot move to another directory.
    apply(&view, &Command::SetHostRootfs { allowed: false }).unwrap();
    let mut spec = web.spec.clone();
    spec.replicas = 3;
    apply(
        &view,
        &Command::UpdateService { id: web.id.clone(), spec: Box::new(spec.clone()), expected_version: 1, at: 2 },
    )
    .unwrap();
    spec.image = "/srv/other".into();
    let e = refused(
        &view,
        &Command::UpdateService { id: web.id.clone(), spec: Box::new(spec), expected_version: 1, at: 3 },
    );
    assert!(matches!(&e, Rejection::Invalid(m) if m.contains("does not allow")), "{e}");
}

#[test]
fn a_service_s_image_must_be_pinned_to_an_image_the_cluster_holds() {
    let (view, [m1, m2, _]) = three_managers();
    let img = image("a", &[&m1, &m2]);
    let mut web = service("web", 1);
    web.spec.image = format!("app:1@{}", img.digest);
    let e = refused(&view, &Command::CreateService(Box::new(web.clone())));
    assert!(matches!(&e, Rejection::Invalid(m) if m.contains("no image")), "{e}");
    // A name alone is not pinned: admission resolves names, the log never holds one.
    let mut named = service("named", 1);
    named.spec.image = "app:1".into();
    assert!(matches!(refused(&view, &Command::CreateService(Box::new(named))), Rejection::InvalidSpec(_)));
    apply(&view, &put(&img, Some("app:1"))).unwrap();
    // An image brings its own command.
    web.spec.args.clear();
    apply(&view, &Command::CreateService(Box::new(web))).unwrap();
    // Names are written with a tag: "app" is "app:latest".
    apply(&view, &put(&image("b", &[&m1, &m2]), Some("app"))).unwrap();
    assert!(view.resolve_image("app").unwrap().is_some());
    assert!(view.resolve_image("app:latest").unwrap().is_some());
    assert_eq!(normalize_image_name("registry:5000/app"), "registry:5000/app:latest");
    assert_eq!(normalize_image_name("registry:5000/app:2"), "registry:5000/app:2");
}
