//! The CA's CSR handling (`RootCa::sign_node`, certs/src/ca.rs): parse, check
//! the key and signature, sign.
//!
//! Inputs are arbitrary PEM text, arbitrary DER (wrapped in PEM), or —
//! most of the time — a structured CSR: the request info of a valid CSR for a
//! P-256, P-384 or Ed25519 key, mutated byte-wise, then *re-signed* with a
//! chosen key and the signature algorithm ring has for it (so mutations get
//! past the signature check, and a key may claim another's info), and a
//! certificate lifetime from the input. ring cannot sign P-384 with SHA-256:
//! the seed `seed-p384-sha256` is such a CSR, made with openssl. Never panics; when a
//! certificate is issued, its key is the CSR's key and is ECDSA P-256, and its
//! subject is the one the CA chose.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use swarmd_certs::{CertInfo, CertValidity, ClusterId, NodeId, Role, RootCa};

/// OID 1.2.840.10045.3.1.7 (prime256v1), DER contents.
const P256_OID: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

enum Signer {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

struct Key {
    /// The request info of a valid CSR for this key.
    info: Vec<u8>,
    /// The key with each signature algorithm it can sign with, and that
    /// algorithm's DER AlgorithmIdentifier.
    signers: Vec<(Signer, &'static [u8])>,
}

const ECDSA_SHA256: &[u8] = &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const ECDSA_SHA384: &[u8] = &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const ED25519: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];

struct Fixture {
    ca: RootCa,
    node: NodeId,
    keys: Vec<Key>,
    rng: SystemRandom,
}

fn der_len(n: usize) -> Vec<u8> {
    match n {
        0..=0x7f => vec![n as u8],
        0x80..=0xff => vec![0x81, n as u8],
        0x100..=0xffff => vec![0x82, (n >> 8) as u8, n as u8],
        _ => vec![0x83, (n >> 16) as u8, (n >> 8) as u8, n as u8],
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(der_len(content.len()));
    v.extend_from_slice(content);
    v
}

/// The first element inside the DER SEQUENCE `der`, with its header.
fn first_element(der: &[u8]) -> &[u8] {
    fn header(b: &[u8]) -> (usize, usize) {
        match b[1] {
            n @ 0..=0x7f => (2, n as usize),
            0x81 => (3, b[2] as usize),
            0x82 => (4, (b[2] as usize) << 8 | b[3] as usize),
            _ => panic!("CSR too large for this fixture"),
        }
    }
    let (h, _) = header(der);
    let inner = &der[h..];
    let (h2, len) = header(inner);
    &inner[..h2 + len]
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ca = RootCa::generate(&ClusterId::random()).expect("a CA");
        let mut keys = Vec::new();
        for alg in [&PKCS_ECDSA_P256_SHA256, &PKCS_ECDSA_P384_SHA384, &PKCS_ED25519] {
            let kp = KeyPair::generate_for(alg).expect("a key");
            let mut p = CertificateParams::new(vec!["swarm-manager".to_string(), "evil".to_string()]).expect("params");
            p.distinguished_name.push(DnType::CommonName, "evil");
            p.distinguished_name.push(DnType::OrganizationalUnitName, "swarm-manager");
            let csr = p.serialize_request(&kp).expect("a CSR");
            let info = first_element(csr.der()).to_vec();
            let pkcs8 = kp.serialize_der();
            let ecdsa = |a: &'static signature::EcdsaSigningAlgorithm| {
                Signer::Ecdsa(EcdsaKeyPair::from_pkcs8(a, &pkcs8, &SystemRandom::new()).expect("ring loads the key"))
            };
            let signers = if std::ptr::eq(alg, &PKCS_ECDSA_P256_SHA256) {
                vec![(ecdsa(&signature::ECDSA_P256_SHA256_ASN1_SIGNING), ECDSA_SHA256)]
            } else if std::ptr::eq(alg, &PKCS_ECDSA_P384_SHA384) {
                vec![(ecdsa(&signature::ECDSA_P384_SHA384_ASN1_SIGNING), ECDSA_SHA384)]
            } else {
                let k = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).expect("ring loads the key");
                vec![(Signer::Ed25519(k), ED25519)]
            };
            keys.push(Key { info, signers });
        }
        Fixture { ca, node: NodeId::random(), keys, rng: SystemRandom::new() }
    })
}

fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()))
}

fn structured(u: &mut Unstructured, f: &Fixture) -> ArbResult<(String, Option<Vec<u8>>)> {
    let mut info = f.keys[u.choose_index(f.keys.len())?].info.clone();
    for _ in 0..u.int_in_range(0..=3)? {
        let at = u.choose_index(info.len())?;
        match u.int_in_range(0..=2)? {
            0 => info[at] = u.arbitrary()?,
            1 => {
                let n = u.int_in_range(0..=8usize)?.min(u.len());
                let extra = u.bytes(n)?;
                info.splice(at..at, extra.iter().copied());
            }
            _ => {
                let end = (at + u.int_in_range(1..=8usize)?).min(info.len());
                info.drain(at..end);
            }
        }
    }
    let key = &f.keys[u.choose_index(f.keys.len())?];
    let (signer, alg) = &key.signers[u.choose_index(key.signers.len())?];
    let sig = match signer {
        Signer::Ecdsa(k) => k.sign(&f.rng, &info).expect("sign").as_ref().to_vec(),
        Signer::Ed25519(k) => k.sign(&info).as_ref().to_vec(),
    };
    let public = match signer {
        Signer::Ecdsa(k) => k.public_key().as_ref().to_vec(),
        Signer::Ed25519(k) => k.public_key().as_ref().to_vec(),
    };
    let mut bits = vec![0u8];
    bits.extend(sig);
    let mut body = info;
    body.extend_from_slice(alg);
    body.extend(tlv(0x03, &bits));
    Ok((pem_of(&tlv(0x30, &body)), Some(public)))
}

fn check_issued(pem_text: &str, f: &Fixture, role: Role, signer_key: Option<&[u8]>) {
    let info = CertInfo::parse(pem_text).expect("the CA's certificate parses");
    assert_eq!(info.node_id, f.node, "subject CN is not the CA's choice");
    assert_eq!(info.role, role, "OU is not the CA's choice");
    let (_, p) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).expect("PEM");
    let cert = p.parse_x509().expect("DER");
    let spki = cert.public_key();
    assert_eq!(spki.algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY, "not an EC key");
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    assert_eq!(curve.map(|o| o.as_bytes().to_vec()), Some(P256_OID.to_vec()), "issued for a key that is not P-256");
    assert_eq!(spki.subject_public_key.data.len(), 65, "not an uncompressed P-256 point");
    if let Some(k) = signer_key {
        assert_eq!(&*spki.subject_public_key.data, k, "issued for a key the requester does not hold");
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut u = Unstructured::new(data);
    let Ok(mode) = u.int_in_range(0..=7u8) else { return };
    let Ok(secs) = u.arbitrary::<u64>() else { return };
    let validity = match secs % 4 {
        0 => CertValidity::DEFAULT,
        _ => match CertValidity::new(Duration::from_secs(secs)) {
            Ok(v) => v,
            Err(_) => return,
        },
    };
    let role = if secs & 8 == 0 { Role::Worker } else { Role::Manager };
    let (pem_text, key) = match mode {
        0 => (String::from_utf8_lossy(u.take_rest()).into_owned(), None),
        1 => (pem_of(u.take_rest()), None),
        _ => match structured(&mut u, f) {
            Ok(x) => x,
            Err(_) => return,
        },
    };
    if let Ok(issued) = f.ca.sign_node(&pem_text, &f.node, role, validity) {
        check_issued(&issued.pem, f, role, key.as_deref());
    }
});
