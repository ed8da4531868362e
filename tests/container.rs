//! The worker's executor and secret mounts with the real parts (root, runc,
//! tmpfs, a busybox root filesystem): invariants 6 and 9 from inside a
//! container. Skipped loudly without root/runc/busybox, mandatory in CI.

mod common;

use std::time::Duration;

use common::*;
use swarmd_worker::executor::{ContainerSpec, ExecError, Runtime};
use swarmd_worker::secret_mount::{require_tmpfs, SecretFile, SecretMount};
use swarmd_worker::userns::{IdBlock, UserNamespace, MAX_BLOCKS};
use zeroize::Zeroizing;

/// A block of host IDs of the test's own (from the top: workers allocate from
/// their own starting points).
fn userns(k: u32) -> UserNamespace {
    UserNamespace::Private(IdBlock::new(MAX_BLOCKS - 1 - k).unwrap())
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn file(name: &str, data: &[u8], mode: u32) -> SecretFile {
    SecretFile { name: name.into(), uid: 0, gid: 0, mode, data: Zeroizing::new(data.to_vec()) }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hardened_container_reads_its_secret_from_a_read_only_tmpfs() {
    if !can_run_containers("container::a_hardened_container_reads_its_secret_from_a_read_only_tmpfs") {
        return;
    }
    hardened_container_with("runc", userns(0)).await;
}

/// The same with crun, which needs the hybrid-cgroup workaround on hosts like
/// this one (`Runtime::command`).
#[tokio::test(flavor = "multi_thread")]
async fn crun_runs_the_same_hardened_container() {
    if !can_run_containers("container::crun_runs_the_same_hardened_container") {
        return;
    }
    if std::process::Command::new("crun").arg("--version").output().is_err() {
        if std::env::var("SWARMD_REQUIRE_RUNC").is_ok_and(|v| v == "1") {
            panic!("crun is missing (scripts/setup installs it as root)");
        }
        eprintln!("\n!!!!! SKIPPED container::crun_runs_the_same_hardened_container: needs crun\n");
        return;
    }
    hardened_container_with("crun", userns(1)).await;
}

async fn hardened_container_with(runtime: &str, ns: UserNamespace) {
    let UserNamespace::Private(block) = ns else { unreachable!() };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(&dir.path().join("rootfs"));
    let task = dir.path().join("task1");
    let mut mount = SecretMount::create(&task, 1 << 20, ns).unwrap();
    require_tmpfs(&task).unwrap();
    let value = format!("s3cret-{}", std::process::id());
    mount.write(&[file("db_pass", value.as_bytes(), 0o444)]).unwrap();
    // Read-only between writes, even for root on the host.
    assert!(std::fs::write(mount.dir().join("x"), b"x").is_err(), "the secret tmpfs is writable");
    let opts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = opts.lines().find(|l| l.contains(task.to_str().unwrap())).expect("mounted").to_owned();
    for flag in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(line.split([' ', ',']).any(|f| f == flag), "missing {flag}: {line}");
    }

    let rt = Runtime::new(runtime, &dir.path().join("state"), &dir.path().join("bundles"));
    let script = "id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
                  sha256sum /run/secrets/db_pass; \
                  touch /rootfs-probe 2>/dev/null && echo ROOTFS-WRITABLE || echo rootfs-ro; \
                  touch /run/secrets/probe 2>/dev/null && echo SECRETS-WRITABLE || echo secrets-ro; \
                  touch /tmp/probe && echo tmp-rw; \
                  mount -t tmpfs none /tmp 2>/dev/null && echo MOUNT-ALLOWED || echo mount-denied; \
                  cat /proc/self/uid_map /proc/self/gid_map; \
                  cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null \
                    || cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/memory.max; \
                  ls /proc | grep -E '^[0-9]+$' | head -5";
    let spec = ContainerSpec {
        rootfs: rootfs.clone(),
        args: vec!["sh".into(), "-c".into(), script.into()],
        secrets_dir: Some(mount.dir().to_owned()),
        memory: Some(64 << 20),
        pids: Some(64),
        userns: ns,
        ..Default::default()
    };
    let id = format!("swarmd-test-{runtime}");
    let mut c = rt.start(&id, &spec).await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(60), c.wait()).await.expect("container hung").unwrap();
    let out = c.logs.lines();
    c.stop(Duration::from_secs(1)).await.unwrap();
    assert_eq!(code, 0, "{out:#?}");
    let text = out.join("\n");
    let want = [
        "65534".to_string(),
        "CapEff:\t0000000000000000".into(),
        "CapPrm:\t0000000000000000".into(),
        "CapBnd:\t0000000000000000".into(),
        "NoNewPrivs:\t1".into(),
        "Seccomp:\t2".into(),
        format!("{}  /run/secrets/db_pass", sha256_hex(value.as_bytes())),
        "rootfs-ro".into(),
        "secrets-ro".into(),
        "tmp-rw".into(),
        "mount-denied".into(),
    ];
    for w in &want {
        assert!(text.contains(w.as_str()), "missing {w:?} in:\n{text}");
    }
    assert_eq!(out.iter().filter(|l| *l == "65534").count(), 2, "uid and gid 65534:\n{text}");
    // Its own user namespace: container IDs 0-65535 are the block's host IDs.
    let map = format!("0 {} 65536", block.base());
    let maps = out.iter().filter(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == map).count();
    assert_eq!(maps, 2, "uid and gid maps {map:?}:\n{text}");
    // The runtime still applies the limits from the host (cgroup v1 here, or v2).
    for limit in ["64", &(64u64 << 20).to_string()] {
        assert!(out.iter().any(|l| l == limit), "limit {limit} not applied:\n{text}");
    }
    // The secret file belongs to the task's root as the host sees it.
    let meta = std::fs::metadata(mount.dir().join("db_pass")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), block.base());
    // A private pid namespace: the shell is PID 1 there and few processes are seen.
    assert!(out.iter().any(|l| l == "1"), "no PID 1 in the container's /proc:\n{text}");

    // In-place rotation: the same container would see the new content; the
    // file is replaced atomically.
    mount.write(&[file("db_pass", b"v2", 0o400)]).unwrap();
    assert_eq!(std::fs::read(mount.dir().join("db_pass")).unwrap(), b"v2");
    let meta = std::fs::metadata(mount.dir().join("db_pass")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o400);

    // Task end: wiped and unmounted, directory gone.
    mount.destroy();
    assert!(!task.exists(), "the task's secret directory is left behind");
    let opts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!opts.contains(task.to_str().unwrap()), "still mounted");

    // Policy: privileged containers and added capabilities are refused.
    let privileged = ContainerSpec { privileged: true, ..spec.clone() };
    assert!(matches!(rt.start("swarmd-test-2", &privileged).await, Err(ExecError::Refused(_))));
    let caps = ContainerSpec { cap_add: vec!["SYS_ADMIN".into()], ..spec };
    assert!(matches!(rt.start("swarmd-test-3", &caps).await, Err(ExecError::Refused(_))));
}

#[test]
fn secrets_are_never_written_outside_a_tmpfs() {
    if !can_run_containers("container::secrets_are_never_written_outside_a_tmpfs") {
        return;
    }
    // A bind mount of a directory on disk looks like a mount, but statfs says ext4/overlay.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    assert!(require_tmpfs(dir.path()).is_err());
}

/// A write that cannot fit (the tmpfs may not grow enough) fails with the
/// error, leaves no partial file and keeps the old value; allowed to grow, the
/// same write succeeds beside the old file.
#[test]
fn invariant_6_a_secret_write_that_cannot_fit_fails_and_leaves_no_partial_file() {
    if !can_run_containers("container::invariant_6_a_secret_write_that_cannot_fit_fails_and_leaves_no_partial_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("task");
    let mut mount = SecretMount::create(&task, 64 << 10, userns(2)).unwrap();
    mount.set_max_size(64 << 10);
    mount.write(&[file("db_pass", b"old value", 0o444)]).unwrap();
    let big = vec![0x5a_u8; 200 << 10];
    let err = mount.write(&[file("db_pass", &big, 0o444)]).unwrap_err();
    assert!(err.to_string().contains("bytes of tmpfs"), "{err}");
    let names: Vec<String> =
        std::fs::read_dir(mount.dir()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    assert_eq!(names, ["db_pass"], "a partial file is left");
    assert_eq!(std::fs::read(mount.dir().join("db_pass")).unwrap(), b"old value");
    // Read-only again after the failure.
    assert!(std::fs::write(mount.dir().join("x"), b"x").is_err());

    mount.set_max_size(swarmd_worker::secret_mount::DEFAULT_MAX_SIZE);
    mount.write(&[file("db_pass", &big, 0o444), file("other", &big, 0o400)]).unwrap();
    assert_eq!(std::fs::read(mount.dir().join("db_pass")).unwrap(), big);
    assert!(mount.size() > 400 << 10, "the tmpfs did not grow: {}", mount.size());
    mount.destroy();
    assert!(!task.exists());
}
