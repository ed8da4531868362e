//! The workload signer's policy: what the certificate says (whatever the CSR
//! asks), its lifetime, the keys it refuses, and that it never passes as a
//! node certificate.

use super::*;
use crate::tls::PeerIdentity;
use crate::{generate_key_and_csr, CertInfo};
use ::time::OffsetDateTime;
use rcgen::PKCS_ECDSA_P256_SHA256;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::extensions::ParsedExtension;

fn ca() -> RootCa {
    RootCa::generate(&ClusterId::random()).unwrap()
}

fn id(ca: &RootCa, service: &str) -> WorkloadId {
    WorkloadId::new(ca.cluster_id().clone(), service, TaskId::random()).unwrap()
}

fn parse(pem: &str) -> X509Certificate<'static> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let der: &'static [u8] = Box::leak(der.to_vec().into_boxed_slice());
    X509Certificate::from_der(der).unwrap().1
}

#[test]
fn the_certificate_names_the_task_and_service_and_nothing_the_csr_asks_for() {
    let ca = ca();
    let who = id(&ca, "web-api");
    // A CSR that asks to be a manager, with a DNS SAN and a URI SAN of its own.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(vec!["swarm-manager".to_string(), "swarm-ca".to_string()]).unwrap();
    p.subject_alt_names.push(SanType::URI(Ia5String::try_from("spiffe://evil/service/admin").unwrap()));
    p.distinguished_name.push(DnType::CommonName, "evil");
    p.distinguished_name.push(DnType::OrganizationalUnitName, "swarm-manager");
    p.distinguished_name.push(DnType::OrganizationName, ca.cluster_id().as_str());
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();

    let issued = sign_workload(&ca, &csr, &who, IdentityTtl::DEFAULT).unwrap();
    let cert = parse(&issued.pem);
    let subject = cert.subject();
    assert_eq!(first_attr(subject.iter_common_name()), who.task.as_str());
    assert_eq!(first_attr(subject.iter_organizational_unit()), WORKLOAD_OU);
    assert_eq!(subject.iter_organization().count(), 0, "no O: a node certificate's O is the cluster ID");
    assert_eq!(subject.iter().count(), 2, "CN and OU only: {subject}");
    let san = cert.subject_alternative_name().unwrap().expect("a SAN");
    let names: Vec<String> = san.value.general_names.iter().map(|n| format!("{n:?}")).collect();
    assert_eq!(names, vec![format!("URI({:?})", format!("spiffe://{}/service/web-api", ca.cluster_id()))]);
    let bc = cert.basic_constraints().unwrap().expect("basic constraints");
    assert!(!bc.value.ca, "a workload certificate is no CA");
    let eku = cert.extended_key_usage().unwrap().expect("EKU").value;
    assert!(eku.client_auth && eku.server_auth && !eku.any);
    assert!(cert
        .extensions()
        .iter()
        .any(|e| matches!(e.parsed_extension(), ParsedExtension::AuthorityKeyIdentifier(_))));
    assert_eq!(hex::encode(cert.raw_serial()), issued.serial);
    // It chains to the cluster CA and is for the CSR's key.
    assert!(cert.verify_signature(Some(parse(ca.cert_pem()).public_key())).is_ok());
    assert_eq!(*cert.public_key().subject_public_key.data, *key.der_bytes());
    let checked = check_issued(&issued.pem, &key.serialize_pem(), who.task.as_str()).unwrap();
    assert_eq!(checked.spiffe_id, who.spiffe_id());
}

#[test]
fn the_lifetime_is_the_cluster_setting_from_now() {
    let ca = ca();
    let (_k, csr) = generate_key_and_csr().unwrap();
    for secs in [30, 3600, 30 * 86400] {
        let ttl = IdentityTtl::from_secs(secs).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let issued = sign_workload(&ca, &csr, &id(&ca, "svc"), ttl).unwrap();
        let cert = parse(&issued.pem);
        let after = cert.validity().not_after.timestamp();
        assert!((after - (now + secs as i64)).abs() <= 2, "{secs}s: not after {after}, now {now}");
        assert_eq!(issued.not_after, after);
        // Backdated a little for skew, never by a lifetime.
        let before = cert.validity().not_before.timestamp();
        assert!(now - before <= 61 && now - before >= 59, "not before {before}, now {now}");
    }
    assert_eq!(renew_after(Duration::from_secs(3600)), Duration::from_secs(1800));
    // A lifetime that bypassed the bounds (deserialized) is refused by the signer.
    let forged: IdentityTtl = serde_json::from_str(r#"{"secs":5,"nanos":0}"#).unwrap();
    assert!(matches!(sign_workload(&ca, &csr, &id(&ca, "svc"), forged), Err(CertError::InvalidLifetime { .. })));
    let forged: IdentityTtl = serde_json::from_str(&format!("{{\"secs\":{},\"nanos\":0}}", u64::MAX)).unwrap();
    assert!(matches!(sign_workload(&ca, &csr, &id(&ca, "svc"), forged), Err(CertError::InvalidLifetime { .. })));
}

#[test]
fn identity_ttl_is_bounded_and_parses() {
    assert_eq!(IdentityTtl::default().duration(), Duration::from_secs(3600));
    assert!("29s".parse::<IdentityTtl>().is_err());
    assert!("30s".parse::<IdentityTtl>().is_ok());
    assert!("30d".parse::<IdentityTtl>().is_ok());
    let e = "31d".parse::<IdentityTtl>().unwrap_err();
    assert!(e.contains("30s to 30d"), "{e}");
    assert!("9999999999999d".parse::<IdentityTtl>().is_err());
    assert_eq!("2m".parse::<IdentityTtl>().unwrap().to_string(), "120s");
    assert!(IdentityTtl::from_secs(0).is_err());
}

#[test]
fn invariant_8_csrs_for_other_keys_and_bad_csrs_are_refused() {
    let ca = ca();
    let who = id(&ca, "svc");
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let csr = CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
        let err = sign_workload(&ca, &csr, &who, IdentityTtl::DEFAULT).unwrap_err();
        assert!(matches!(err, CertError::InvalidCsr { .. }), "{err}");
        assert!(err.to_string().contains("P-256"), "{err}");
    }
    let huge =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", "A".repeat(MAX_CSR));
    for bad in ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", &huge]
    {
        let err = sign_workload(&ca, bad, &who, IdentityTtl::DEFAULT).unwrap_err();
        assert!(matches!(err, CertError::InvalidCsr { .. }), "{err}");
    }
    // A CSR whose signature does not verify (one bit of the signature flipped).
    let (_k, csr) = generate_key_and_csr().unwrap();
    let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap().as_ref().to_vec();
    let last = der.len() - 3;
    der[last] ^= 1;
    let tampered = pem_of("CERTIFICATE REQUEST", &der);
    assert!(sign_workload(&ca, &tampered, &who, IdentityTtl::DEFAULT).is_err());
    assert!(sign_workload(&ca, &csr, &who, IdentityTtl::DEFAULT).is_ok());
}

fn pem_of(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b = String::new();
    for c in der.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            b.push(if i <= c.len() { B64[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).unwrap());
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

#[test]
fn a_workload_certificate_is_no_node_certificate() {
    let ca = ca();
    let (_k, csr) = generate_key_and_csr().unwrap();
    let issued = sign_workload(&ca, &csr, &id(&ca, "svc"), IdentityTtl::DEFAULT).unwrap();
    let err = CertInfo::parse(&issued.pem).unwrap_err();
    assert!(matches!(err, CertError::NoIdentity { .. }), "{err}");
    let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
    assert_eq!(PeerIdentity::from_chain(&[der]), None);
    assert!(parse(&issued.pem)
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .all(|n| !matches!(n, GeneralName::DNSName(_))));
}

#[test]
fn service_names_must_be_spiffe_path_segments_and_keys_must_match() {
    let ca = ca();
    for bad in ["", ".", "..", "a/b", "a b", "é", &"a".repeat(65), "a%2f"] {
        assert!(WorkloadId::new(ca.cluster_id().clone(), bad, TaskId::random()).is_err(), "{bad:?}");
    }
    let who = id(&ca, "svc_1.v-2");
    assert_eq!(who.spiffe_id(), format!("spiffe://{}/service/svc_1.v-2", ca.cluster_id()));
    let (key, csr) = generate_key_and_csr().unwrap();
    let issued = sign_workload(&ca, &csr, &who, IdentityTtl::DEFAULT).unwrap();
    assert!(check_issued(&issued.pem, &key, who.task.as_str()).is_ok());
    let (other, _) = generate_key_and_csr().unwrap();
    assert!(check_issued(&issued.pem, &other, who.task.as_str()).is_err(), "another key");
    assert!(check_issued(&issued.pem, &key, TaskId::random().as_str()).is_err(), "another task");
}
