//! Invariant 9 from inside a real container: a static C program
//! (`tests/data/seccomp_probe.c`, built here with `gcc -static`) runs in a
//! container built by the worker's executor, under runc and under crun, and
//! tries what Docker's default seccomp profile refuses and what swarmd refuses
//! beyond it, plus controls that must keep working. Needs root, runc, crun,
//! busybox and gcc: skipped loudly without them, mandatory under
//! SWARMD_REQUIRE_ROOT/SWARMD_REQUIRE_RUNC=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use swarmd_worker::executor::{ContainerSpec, Runtime};
use swarmd_worker::userns::{IdBlock, UserNamespace, MAX_BLOCKS};

/// What each probe must print with the filter in place.
const EXPECTED: &[&str] = &[
    "clone_newuser_newnet: errno=1",
    "unshare_newuser: errno=1",
    "clone3: errno=38",
    "io_uring_setup: errno=1",
    "netlink_netfilter: errno=1",
    "netlink_netfilter_highbits: errno=1",
    "vsock: errno=1",
    "ptrace: errno=1",
    "fork: ok",
    "thread: ok",
    "inet: ok",
    "unix: ok",
    "netlink_route: ok",
    "probe: done",
];

fn required() -> bool {
    std::env::var("SWARMD_REQUIRE_RUNC").is_ok_and(|v| v == "1")
}

fn skip(test: &str, why: &str) {
    if required() {
        panic!("{test}: {why} (scripts/setup installs it as root)");
    }
    eprintln!("\n!!!!! SKIPPED {test}: {why}\n");
}

/// Builds the probe with `gcc -static`, or says why it cannot.
fn build_probe(out: &Path) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/seccomp_probe.c");
    let bin = out.join("probe");
    let o = Command::new("gcc")
        .args(["-static", "-O1", "-pthread", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("needs gcc: {e}"))?;
    if !o.status.success() {
        return Err(format!("gcc -static failed: {}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(bin)
}

async fn probe_with(test: &str, runtime: &str) {
    if !can_run_containers(test) {
        return;
    }
    if Command::new(runtime).arg("--version").output().is_err() {
        return skip(test, &format!("needs {runtime}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let probe = match build_probe(dir.path()) {
        Ok(p) => p,
        Err(why) => return skip(test, &why),
    };
    let rootfs = busybox_rootfs(&dir.path().join("rootfs"));
    std::fs::copy(&probe, rootfs.join("bin/probe")).unwrap();
    let rt = Runtime::new(runtime, &dir.path().join("state"), &dir.path().join("bundles"));
    // Inside its own user namespace (where it is root of nothing it could use
    // without capabilities), new namespaces must still be refused.
    let block = IdBlock::new(MAX_BLOCKS - 10 - runtime.len() as u32).unwrap();
    let spec = ContainerSpec {
        rootfs,
        args: vec!["sh".into(), "-c".into(), "cat /proc/self/uid_map; exec /bin/probe".into()],
        userns: UserNamespace::Private(block),
        ..Default::default()
    };
    let id = format!("swarmd-seccomp-{runtime}-{}", std::process::id());
    let mut c = rt.start(&id, &spec).await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(60), c.wait()).await.expect("the probe hung").unwrap();
    // The output pipes may still hold the last lines for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !c.logs.lines().iter().any(|l| l == "probe: done") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = c.logs.lines();
    c.stop(Duration::from_secs(1)).await.unwrap();
    let left = rt.command().args(["list", "-q"]).output().await.unwrap();
    assert!(String::from_utf8_lossy(&left.stdout).trim().is_empty(), "a container is left");
    assert_eq!(code, 0, "{out:#?}");
    let map = format!("0 {} 65536", block.base());
    assert!(
        out.iter().any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == map),
        "the probe did not run in its own user namespace ({map}):\n{}",
        out.join("\n")
    );
    let wrong: Vec<&&str> = EXPECTED.iter().filter(|want| !out.iter().any(|l| l == **want)).collect();
    assert!(wrong.is_empty(), "under {runtime}, expected {wrong:?}; the probe printed:\n{}", out.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_9_seccomp_allowlist_refuses_namespaces_io_uring_and_netfilter_under_runc() {
    probe_with("seccomp::invariant_9_seccomp_allowlist_refuses_namespaces_io_uring_and_netfilter_under_runc", "runc")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invariant_9_seccomp_allowlist_refuses_namespaces_io_uring_and_netfilter_under_crun() {
    probe_with("seccomp::invariant_9_seccomp_allowlist_refuses_namespaces_io_uring_and_netfilter_under_crun", "crun")
        .await;
}
