//! Issue 15: the cluster CA as an organisation's intermediate
//! (`manager init --ca-cert F --ca-key F --ca-chain F`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

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

/// Runs `manager init` in `<name>/` with `extra`, which must fail leaving
/// the data dir empty; returns its standard error.
fn refused_init(env: &Env, name: &str, extra: &[&str]) -> String {
    let dir = env.path(name);
    let mut args = vec!["manager", "init", "--data-dir", dir.to_str().unwrap(), "--listen-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let o = env.swarmd(&args);
    assert!(!o.status.success(), "{extra:?} was accepted");
    assert!(is_absent_or_empty(&dir) || files_below(&dir).is_empty(), "{:?}", files_below(&dir));
    String::from_utf8_lossy(&o.stderr).into_owned()
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
        let err = refused_init(
            &env,
            &format!("refused-{why}").replace(' ', "-"),
            &["--ca-cert", &p(cert), "--ca-key", &p(key)],
        );
        assert!(err.contains(why) && err.lines().count() == 1, "{err}");
    }
}

/// A cfssl signer on 127.0.0.1, stopped on drop (even when the test fails).
struct Cfssl {
    child: std::process::Child,
}

/// Which cfssl server signs.
#[derive(Clone, Copy, PartialEq)]
enum Signer {
    /// `multirootca`: serves only authsign.
    MultiRoot,
    /// `cfssl serve`: also serves newcert, whatever the auth key (cfssl#250).
    Serve,
}

impl Cfssl {
    /// Serves signing with `dir/ca.pem` and `ca.sec1` (profile in `config.json`)
    /// over TLS with `tls.pem`/`tls.sec1`, on `port`; returns once it accepts
    /// connections.
    fn start(dir: &Path, port: u16, signer: Signer) -> Self {
        let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let log = std::fs::File::create(dir.join(format!("cfssl-{stamp}.log"))).unwrap();
        let mut cmd = match signer {
            Signer::Serve => {
                let mut c = Command::new("cfssl");
                c.args(["serve", "-address", "127.0.0.1", "-port", &port.to_string()])
                    .args(["-ca", &p("ca.pem"), "-ca-key", &p("ca.sec1"), "-config", &p("config.json")])
                    .args(["-tls-cert", &p("tls.pem"), "-tls-key", &p("tls.sec1")]);
                c
            }
            Signer::MultiRoot => {
                let roots = format!(
                    "[ primary ]\nprivate = file://{}\ncertificate = {}\nconfig = {}\n",
                    p("ca.sec1"),
                    p("ca.pem"),
                    p("config.json")
                );
                std::fs::write(dir.join("roots.conf"), roots).unwrap();
                let mut c = Command::new("multirootca");
                c.args(["-a", &format!("127.0.0.1:{port}"), "-roots", &p("roots.conf"), "-l", "primary"]).args([
                    "-tls-cert",
                    &p("tls.pem"),
                    "-tls-key",
                    &p("tls.sec1"),
                ]);
                c
            }
        };
        let child =
            cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap_or_else(|e| {
                panic!("cannot run cfssl ({e}): install Debian's golang-cfssl (scripts/setup does)")
            });
        let me = Self { child };
        wait_for("the signer to listen", DEADLINE, || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        me
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cfssl {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The external signer's PKI, made with openssl: its CA (the cluster's trust
/// anchor; cfssl holds the key) and the TLS certificate of its HTTPS
/// endpoint, for 127.0.0.1, issued by that CA. cfssl's profile: node
/// certificates live `expiry`.
fn signer_pki(dir: &Path, expiry: &str) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let ca_key = key(dir, "ca");
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &ca_key,
        "-subj",
        "/CN=Example signing CA/O=Example",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        &p("ca.pem"),
    ]);
    let tls_key = key(dir, "tls");
    std::fs::write(
        dir.join("tls.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&["req", "-new", "-key", &tls_key, "-subj", "/CN=127.0.0.1", "-out", &p("tls.csr")]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("tls.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &p("tls.ext"),
        "-out",
        &p("tls.pem"),
    ]);
    signer_config(dir, expiry);
}

/// cfssl's profile in `dir/config.json`, with a new auth key (also in
/// `dir/auth.hex`, mode 0600): signing needs it.
fn signer_config(dir: &Path, expiry: &str) {
    let auth_key = hex::encode(random32());
    write_key_file(&dir.join("auth.hex"), &format!("{auth_key}\n"), 0o600);
    let config = serde_json::json!({
        "signing": {"default": {
            "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
            "expiry": expiry,
            "auth_key": "managers",
        }},
        "auth_keys": {"managers": {"type": "standard", "key": auth_key}},
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn write_key_file(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn random32() -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; 32];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    b
}

/// `--external-ca protocol=cfssl,url=https://…`: a real `cfssl serve` holds
/// the CA key and signs every certificate — the first manager's at init, a
/// worker's join, renewals — after the managers checked what it returns. The
/// cluster never has the key (`ca rotate` is refused, saying why). While the
/// signer is down, a join and a renewal fail saying so, nothing is recorded,
/// and nodes keep their certificates; when it is back the waiting join goes
/// through.
#[test]
fn an_external_cfssl_signer_signs_for_the_cluster_and_its_absence_changes_nothing() {
    let mut env = Env::new();
    let pki = env.path("signer");
    std::fs::create_dir_all(&pki).unwrap();
    // cfssl's profile: node certificates live 10 minutes (the cluster's
    // default would be 24 h).
    signer_pki(&pki, "10m");
    let p = |f: &str| pki.join(f).to_str().unwrap().to_owned();
    let port = free_port();
    let mut cfssl = Cfssl::start(&pki, port, Signer::MultiRoot);
    let url = format!("https://127.0.0.1:{port}");
    // `cfssl serve` with the same auth key still signs through newcert,
    // unauthenticated: refused at init.
    let open_port = free_port();
    let open_signer = Cfssl::start(&pki, open_port, Signer::Serve);

    let auth = p("auth.hex");
    write_key_file(&pki.join("wrong.hex"), &hex::encode(random32()), 0o600);
    write_key_file(&pki.join("nonhex.key"), "not hex digits\n", 0o600);
    write_key_file(&pki.join("auth-0644.hex"), &std::fs::read_to_string(&auth).unwrap(), 0o644);
    let other_key = key(&pki, "other");
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &other_key,
        "-subj",
        "/CN=Other",
        "-days",
        "1",
        "-out",
        &p("root-other.pem"),
    ]);
    // A bad --external-ca, or a signer that cannot be reached or
    // authenticated, is refused at init, nothing written.
    for (spec, why) in [
        (format!("protocol=acme,url={url},authkey={auth}"), "only cfssl"),
        (format!("protocol=cfssl,url=http://127.0.0.1:{port},authkey={auth}"), "https"),
        (format!("protocol=cfssl,authkey={auth}"), "url="),
        // Without the auth key anyone reaching the signer could mint a manager.
        (format!("protocol=cfssl,url={url}"), "authkey"),
        (format!("protocol=cfssl,url={url},authkey={}", p("nonhex.key")), "hex"),
        (format!("protocol=cfssl,url=https://127.0.0.1:{},authkey={auth}", free_port()), "unreachable"),
        // The signer's TLS certificate must chain to `cacert` (here: a CA that did not issue it).
        (format!("protocol=cfssl,url={url},authkey={auth},cacert={}", p("root-other.pem")), "TLS"),
        // The signer refuses a request made with another key.
        (format!("protocol=cfssl,url={url},authkey={}", p("wrong.hex")), "invalid token"),
        // A signer that would sign for anyone.
        (
            format!("protocol=cfssl,url=https://127.0.0.1:{open_port},authkey={auth}"),
            "also serves /api/v1/cfssl/newcert",
        ),
        (format!("protocol=cfssl,url={url},authkey={}", p("auth-0644.hex")), "mode 0644"),
    ] {
        let name = format!("refused-{}", why.replace(' ', "-").replace('=', ""));
        let err = refused_init(&env, &name, &["--ca-cert", &p("ca.pem"), "--external-ca", &spec]);
        assert!(err.contains(why), "{spec}: {err}");
    }

    let spec = format!("protocol=cfssl,url={url},authkey={auth}");
    let m = env.start_manager("m1", &["--ca-cert", &p("ca.pem"), "--external-ca", &spec]);
    let w = env.join_worker("w1", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let ca_pem = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    let show: serde_json::Value = serde_json::from_str(&m.ctl_ok(&["ca", "show", "--format", "json"])).unwrap();
    assert_eq!(show["external_signer"], true, "{show}");
    assert_eq!(m.ctl_ok(&["ca", "show"]), ca_pem);

    // Every node's certificate is cfssl's: it verifies against the signer's
    // CA, and lives as cfssl's profile says, not the cluster's 24 h.
    let leaf_of = |data: &Path| {
        let text = std::fs::read_to_string(data.join("certs/node.crt")).unwrap();
        let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
        text[..end].to_owned()
    };
    for (name, data) in [("m1", &m.data), ("w1", &w.data)] {
        let leaf = pki.join(format!("{name}-leaf.pem"));
        std::fs::write(&leaf, leaf_of(data)).unwrap();
        let o =
            Command::new("openssl").args(["verify", "-CAfile", &p("ca.pem"), leaf.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let info = swarmd_certs::CertInfo::parse(&leaf_of(data)).unwrap();
        assert!(info.not_after - swarmd_certs::now_unix() <= 600, "{name}: not cfssl's 10 min profile: {info:?}");
    }
    let serial = |data: &Path| swarmd_certs::CertInfo::parse(&leaf_of(data)).unwrap().serial;

    // An admin certificate may not live longer than asked: cfssl's profile
    // (10 min) is longer than 60 s.
    let o = m.ctl(&["admin-cert", "--out", env.path("admin").to_str().unwrap(), "--expiry", "60s"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("past what was asked"), "{err}");
    m.ctl_ok(&["admin-cert", "--out", env.path("admin").to_str().unwrap(), "--expiry", "1h"]);

    // The cluster holds no CA key: no rotation from here.
    let o = m.ctl(&["ca", "rotate", "--detach"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("external CA") && err.contains(&url), "{err}");

    // Tasks run, with their secrets but without a workload identity: cfssl
    // signs node certificates only, and the cluster has no key to sign one.
    let test = "external_ca::an_external_cfssl_signer_signs_for_the_cluster_and_its_absence_changes_nothing";
    if can_run_containers(test) {
        let image = busybox_image(&env, &m);
        assert!(m.ctl_stdin(&["create", "token"], b"s3cret").status.success());
        let w1 = w.node_id();
        m.ctl_ok(&[
            "service",
            "create",
            "app",
            "--image",
            image.as_str(),
            "--secret",
            "token",
            "--constraint",
            &format!("node.id=={w1}"),
            "--",
            "sleep",
            "300",
        ]);
        let task = wait_for("the task to run", Duration::from_secs(60), || {
            let o = m.ctl(&["--format", "json", "service", "ps", "app"]);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            v.as_array()?.iter().find(|t| t["state"] == "running").cloned()
        });
        let run = std::path::PathBuf::from(std::env::var("SWARMD_RUN_DIR").unwrap_or_else(|_| "/run/swarmd".into()));
        let secrets = run.join(&w1).join("tasks").join(task["id"].as_str().unwrap()).join("secrets");
        assert_eq!(std::fs::read(secrets.join("token")).unwrap(), b"s3cret");
        assert!(!secrets.join("identity").exists(), "an identity without a CA key to sign it");
        m.ctl_ok(&["service", "rm", "app"]);
    }

    // The signer goes away.
    cfssl.stop();
    let before_nodes = m.nodes().len();
    // A renewal fails saying why; nothing is recorded, the worker keeps its certificate.
    let w1_serial = serial(&w.data);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        use swarmd_proto::ca::{ca_client::CaClient, RenewNodeCertificateRequest};
        let id = swarmd_certs::NodeIdentity::load(&w.data.join("certs")).unwrap();
        let cfg = std::sync::Arc::new(swarmd_certs::tls::client_config(&id).unwrap());
        let ch = swarmd_certs::dial::connect(&m.addr, cfg).await.unwrap();
        let (_, csr_pem) = swarmd_certs::generate_key_and_csr().unwrap();
        CaClient::new(ch).renew_node_certificate(RenewNodeCertificateRequest { csr_pem }).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let msg = status.message();
    assert!(
        msg.contains("external CA") && msg.contains(&url) && msg.contains("keep their current certificates"),
        "{msg}"
    );
    let w1_id = w.node_id();
    assert_eq!(m.node(&w1_id).unwrap()["cert_serial"], serde_json::json!(w1_serial), "a failed renewal was recorded");
    assert_eq!(serial(&w.data), w1_serial);
    // A join waits, saying why, and adds nothing.
    let w2_data = env.path("w2");
    let token = m.token("worker");
    let w2 = env.spawn_with(
        "w2",
        &["worker", "join", "--remote", &m.addr, "--data-dir", w2_data.to_str().unwrap()],
        &[],
        Some(format!("{token}\n").as_bytes()),
    );
    wait_for("the join to say the external CA is unreachable", DEADLINE, || {
        let log = env.proc(w2).log_text();
        (log.contains("external CA") && log.contains(&url) && log.contains("keep their current certificates"))
            .then_some(())
    });
    assert_eq!(m.nodes().len(), before_nodes, "a join the signer did not sign recorded a node");

    drop(open_signer);
    // The signer is back: the waiting join goes through.
    let _cfssl = Cfssl::start(&pki, port, Signer::MultiRoot);
    m.wait_ready(3);

    // The signer moves, with a new auth key: `cluster update --external-ca`
    // checks the new settings against it before keeping them.
    let moved = env.path("signer2");
    std::fs::create_dir_all(&moved).unwrap();
    for f in ["ca.pem", "ca.sec1", "tls.pem", "tls.sec1"] {
        std::fs::copy(pki.join(f), moved.join(f)).unwrap();
    }
    signer_config(&moved, "10m");
    let port2 = free_port();
    let _moved = Cfssl::start(&moved, port2, Signer::MultiRoot);
    let url2 = format!("https://127.0.0.1:{port2}");
    let new_key = moved.join("auth.hex");
    let o = m.ctl(&["cluster", "update", "--external-ca", &format!("protocol=cfssl,url={url2},authkey={auth}")]);
    assert!(!o.status.success(), "the old key was taken for the new signer");
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid token"), "{}", String::from_utf8_lossy(&o.stderr));
    let spec2 = format!("protocol=cfssl,url={url2},authkey={}", new_key.display());
    m.ctl_ok(&["cluster", "update", "--external-ca", &spec2]);
    // Only the new signer is left: a worker joins through it.
    drop(_cfssl);
    let _w3 = env.join_worker("w3", &m.token("worker"), &m.addr);
    m.wait_ready(4);

    // Invariant 5: neither auth key is anywhere in the nodes' data dirs or
    // logs in the clear (hex or raw), though the cluster holds the new one.
    for key_file in [pki.join("auth.hex"), new_key.clone()] {
        let text = std::fs::read_to_string(&key_file).unwrap();
        let hex_key = text.trim().to_owned();
        let raw = hex::decode(&hex_key).unwrap();
        for (what, needle) in
            [("hex", hex_key.as_bytes().to_vec()), ("HEX", hex_key.to_uppercase().into_bytes()), ("raw", raw)]
        {
            for dir in [&m.data, &w.data, &env.path("w2"), &env.path("w3")] {
                let hits = grep_dir(dir, &needle);
                assert!(hits.is_empty(), "the auth key ({what}) in the clear in {hits:?}");
            }
            for idx in [m.proc_idx, w.proc_idx] {
                assert!(!env.proc(idx).log_text().as_bytes().windows(needle.len()).any(|w| w == needle));
            }
        }
    }
}
