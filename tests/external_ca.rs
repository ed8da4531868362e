//! Issue 15: the cluster CA as an organisation's intermediate
//! (`manager init --ca-cert F --ca-key F --ca-chain F`).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn openssl(args: &[&str]) {
    let o = Command::new("openssl").args(args).output().unwrap();
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A P-256 key in PKCS#8 at `dir/name.key`.
fn key(dir: &Path, name: &str) -> String {
    let sec1 = dir.join(format!("{name}.sec1"));
    let out = dir.join(format!("{name}.key"));
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", sec1.to_str().unwrap()]);
    openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", sec1.to_str().unwrap(), "-out", out.to_str().unwrap()]);
    out.to_str().unwrap().to_owned()
}

/// An organisation's PKI made with openssl: a root, an intermediate under it,
/// and the cluster's CA under that. Returns the directory.
fn org_pki(dir: &Path) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    let root_key = key(dir, "root");
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &root_key,
        "-subj",
        "/CN=Example Root/O=Example",
        "-days",
        "365",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        &p("root.pem"),
    ]);
    for (name, issuer, subject) in
        [("inter", "root", "/CN=Example Issuing CA/O=Example"), ("cluster", "inter", "/CN=swarmd cluster CA/O=Example")]
    {
        let k = key(dir, name);
        openssl(&["req", "-new", "-key", &k, "-subj", subject, "-out", &p(&format!("{name}.csr"))]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p(&format!("{issuer}.pem")),
            "-CAkey",
            &p(&format!("{issuer}.key")),
            "-CAcreateserial",
            "-days",
            "300",
            "-extfile",
            &p("ca.ext"),
            "-out",
            &p(&format!("{name}.pem")),
        ]);
    }
}

/// The certificates of `node.crt` after the leaf, and the leaf, as files.
fn split_chain(cert: &Path, out: &Path) -> (String, String) {
    let text = std::fs::read_to_string(cert).unwrap();
    let marker = "-----END CERTIFICATE-----\n";
    let end = text.find(marker).unwrap() + marker.len();
    let leaf = out.join("leaf.pem");
    let chain = out.join("chain.pem");
    std::fs::write(&leaf, &text[..end]).unwrap();
    std::fs::write(&chain, &text[end..]).unwrap();
    (leaf.to_str().unwrap().to_owned(), chain.to_str().unwrap().to_owned())
}

/// The cluster CA is an intermediate of the organisation's root: node
/// certificates carry the chain, verify against the organisation's root with
/// openssl, and the join token pins the cluster CA; a worker joins with it.
/// A certificate that is not a CA, or a key that is not its own, is refused at
/// init with one line and leaves the data dir empty.
#[test]
fn a_cluster_under_an_organisations_root_issues_certificates_that_chain_to_it() {
    let mut env = Env::new();
    let pki = env.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    org_pki(&pki);
    let p = |f: &str| pki.join(f).to_str().unwrap().to_owned();
    let m = env.start_manager(
        "m1",
        &["--ca-cert", &p("cluster.pem"), "--ca-key", &p("cluster.key"), "--ca-chain", &p("inter.pem")],
    );
    let w = env.join_worker("w1", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let cluster_ca = std::fs::read_to_string(pki.join("cluster.pem")).unwrap();
    assert_eq!(m.ctl_ok(&["ca", "show"]), cluster_ca, "the trust anchor is the cluster CA");
    let token = m.token("worker");
    let digest = token.split('-').nth(2).unwrap().to_owned();
    assert_eq!(digest, hex::encode(swarmd_certs::ca_digest(&cluster_ca)), "the token pins the cluster CA");
    for (name, data) in [("m1", &m.data), ("w1", &w.data)] {
        let out = env.path(&format!("verify-{name}"));
        std::fs::create_dir_all(&out).unwrap();
        let (leaf, chain) = split_chain(&data.join("certs/node.crt"), &out);
        let o = Command::new("openssl")
            .args(["verify", "-CAfile", &p("root.pem"), "-untrusted", &chain, &leaf])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(std::fs::read_to_string(data.join("certs/ca.crt")).unwrap(), cluster_ca);
    }

    // Refused at init: a leaf as the CA, and another CA's key.
    let leaf_key = key(&pki, "leaf");
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &leaf_key,
        "-subj",
        "/CN=leaf",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-out",
        &p("leaf.pem"),
    ]);
    for (cert, key, why) in [("leaf.pem", "leaf.key", "not a CA"), ("cluster.pem", "inter.key", "does not belong")] {
        let dir = env.path(&format!("refused-{why}").replace(' ', "-"));
        let o = env.swarmd(&[
            "manager",
            "init",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen-addr",
            "127.0.0.1:0",
            "--ca-cert",
            &p(cert),
            "--ca-key",
            &p(key),
        ]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why) && err.lines().count() == 1, "{err}");
        assert!(is_absent_or_empty(&dir) || files_below(&dir).is_empty(), "{:?}", files_below(&dir));
    }
}
