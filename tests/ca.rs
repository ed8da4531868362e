//! Issue 15: the cluster CA as a service — `secretctl ca show`.

mod common;

use common::*;

/// `ca show` prints the root every node pins (the data dir's `certs/ca.crt`);
/// in JSON, its fingerprint is openssl's SHA-256 over the DER and its expiry
/// openssl's `notAfter`; no external signer, no rotation running.
#[test]
fn ca_show_prints_the_root_its_fingerprint_and_expiry() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let pem = std::fs::read_to_string(m.data.join("certs/ca.crt")).unwrap();
    assert_eq!(m.ctl_ok(&["ca", "show"]), pem);

    let v: serde_json::Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "ca", "show"])).unwrap();
    assert_eq!(v["root_pem"], pem.as_str());
    let openssl = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-in", m.data.join("certs/ca.crt").to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let fingerprint = openssl(&["-fingerprint", "-sha256"]);
    let hex = fingerprint.trim().rsplit('=').next().unwrap().replace(':', "").to_lowercase();
    assert_eq!(v["sha256"], hex.as_str());
    let end = openssl(&["-enddate"]);
    let end = end.trim().strip_prefix("notAfter=").unwrap().to_owned();
    let o = std::process::Command::new("date").args(["-u", "-d", &end, "+%s"]).output().unwrap();
    let secs: i64 = String::from_utf8(o.stdout).unwrap().trim().parse().unwrap();
    assert_eq!(v["not_after"].as_i64(), Some(secs));
    assert_eq!(v["external_signer"], false);
    assert!(v["rotation"].is_null(), "{v}");
}
