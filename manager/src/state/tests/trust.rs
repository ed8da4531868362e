//! Content trust records: keys, signatures, the verdict and its message.

use super::*;
use swarmd_image::trust::{payload, sign, PublicKey};

fn keypair() -> (String, PublicKey) {
    use base64::Engine;
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
    let (_, public) = sign(&pem, b"x").unwrap();
    (pem, public)
}

fn key(name: &str, public: &PublicKey, scope: &str) -> Command {
    Command::AddTrustKey(Box::new(TrustKeyRecord {
        name: name.into(),
        public_key: public.spki_der(),
        scope: scope.into(),
        created_at: 1,
    }))
}

fn signature(private: &str, digest: &str, repository: &str) -> Command {
    let p = payload(&digest.parse().unwrap(), repository);
    let (sig, _) = sign(private, &p).unwrap();
    Command::AddImageSignature {
        digest: digest.into(),
        signature: Box::new(SignatureRecord { payload: p, signature: sig, added_at: 2 }),
    }
}

/// An initialised store with one image (its only manager holds it).
fn with_image() -> (StateView, String) {
    let (view, m) = initialised();
    apply(&view, &Command::SetRaftMember { node: m.id.clone(), raft_id: 1, addr: "a:1".into() }).unwrap();
    let d = |s: &str| swarmd_image::Digest::of(s.as_bytes()).to_string();
    let image = ImageRecord {
        digest: d("manifest"),
        manifest_size: 10,
        platform: "linux/amd64".into(),
        config: ImageBlob { digest: d("config"), size: 10, media_type: "c".into(), diff_id: String::new() },
        layers: vec![ImageBlob {
            digest: d("layer"),
            size: 10,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            diff_id: d("tar"),
        }],
        holders: vec![m.id],
        created_at: 1,
    };
    apply(&view, &Command::PutImage { image: Box::new(image.clone()), name: Some("acme/app:1".into()) }).unwrap();
    (view, image.digest)
}

#[test]
fn an_image_is_trusted_only_through_a_key_whose_scope_covers_what_it_signed() {
    let (view, digest) = with_image();
    let (k1, p1) = keypair();
    let (k2, p2) = keypair();
    let why = view.trust_verdict(&digest).unwrap().unwrap_err();
    assert!(why.contains("no signature") && why.contains("no key is trusted"), "{why}");
    // A signature kept before its key is trusted counts once it is.
    apply(&view, &signature(&k1, &digest, "acme/app")).unwrap();
    apply(&view, &key("k2", &p2, "*")).unwrap();
    let why = view.trust_verdict(&digest).unwrap().unwrap_err();
    assert!(why.contains("for acme/app") && why.contains("k2 (scope *)"), "{why}");
    apply(&view, &key("k1", &p1, "other/*")).unwrap();
    assert!(view.trust_verdict(&digest).unwrap().is_err(), "out of scope");
    apply(&view, &Command::RemoveTrustKey { name: "k1".into() }).unwrap();
    apply(&view, &key("k1", &p1, "acme/*")).unwrap();
    let v = view.trust_verdict(&digest).unwrap().unwrap();
    assert_eq!((v.key.as_str(), v.repository.as_str()), ("k1", "acme/app"));
    // k2 signs too; removing k1 leaves k2's.
    apply(&view, &signature(&k2, &digest, "acme/app")).unwrap();
    apply(&view, &Command::RemoveTrustKey { name: "k1".into() }).unwrap();
    assert_eq!(view.trust_verdict(&digest).unwrap().unwrap().key, "k2");
    // The image goes with its signatures.
    apply(&view, &Command::RemoveImage { digest: digest.clone() }).unwrap();
    assert!(view.image_signatures(&digest).unwrap().is_empty());
}

#[test]
fn bad_keys_and_signatures_are_refused_and_change_nothing() {
    let (view, digest) = with_image();
    let (k, p) = keypair();
    assert!(matches!(refused(&view, &key("bad name", &p, "*")), Rejection::Invalid(_)));
    assert!(matches!(refused(&view, &key("k", &p, "a b")), Rejection::Invalid(_)));
    let mut bad = key("k", &p, "*");
    if let Command::AddTrustKey(r) = &mut bad {
        r.public_key[30] ^= 0xff;
        r.public_key.truncate(40);
    }
    assert!(matches!(refused(&view, &bad), Rejection::Invalid(_)));
    apply(&view, &key("k", &p, "*")).unwrap();
    assert!(matches!(refused(&view, &key("k", &p, "*")), Rejection::Invalid(m) if m.contains("exists")));
    assert!(matches!(refused(&view, &Command::RemoveTrustKey { name: "nope".into() }), Rejection::Invalid(_)));
    // A payload for another digest, and a signature of an unknown image.
    let other = swarmd_image::Digest::of(b"other").to_string();
    let mut wrong = signature(&k, &other, "acme/app");
    if let Command::AddImageSignature { digest: d, .. } = &mut wrong {
        *d = digest.clone();
    }
    assert!(matches!(refused(&view, &wrong), Rejection::Invalid(m) if m.contains("signs")));
    assert!(matches!(refused(&view, &signature(&k, &other, "x")), Rejection::Invalid(m) if m.contains("no image")));
    // Content trust refuses unsigned images and directories at admission.
    apply(&view, &Command::SetContentTrust { required: true }).unwrap();
    let mut web = service("web", 1);
    web.spec.image = digest.clone();
    let e = refused(&view, &Command::CreateService(Box::new(web.clone())));
    assert!(matches!(&e, Rejection::Invalid(m) if m.contains("content trust")), "{e}");
    let dir = service("dir", 1);
    let e = refused(&view, &Command::CreateService(Box::new(dir)));
    assert!(matches!(&e, Rejection::Invalid(m) if m.contains("directory")), "{e}");
    apply(&view, &signature(&k, &digest, "acme/app")).unwrap();
    apply(&view, &Command::CreateService(Box::new(web))).unwrap();
}
