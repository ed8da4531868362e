//! Invariant 11 against other local users: nodes and secretctl cannot dump
//! core, and their /proc files are root's (no other process of their user can
//! read their environment or memory).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// Whether this test can switch users (root). Skipped loudly otherwise,
/// mandatory under SWARMD_REQUIRE_ROOT=1.
fn can_switch_users(test: &str) -> bool {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let tools = ["setpriv", "prlimit"].iter().all(|t| Command::new(t).arg("--version").output().is_ok());
    if root && tools {
        return true;
    }
    if std::env::var("SWARMD_REQUIRE_ROOT").is_ok_and(|v| v == "1") {
        panic!("{test}: needs root, setpriv and prlimit (util-linux) (SWARMD_REQUIRE_ROOT=1 makes it mandatory)");
    }
    eprintln!("\n!!!!! SKIPPED {test}: needs root, setpriv and prlimit\n");
    false
}

/// `program ARGS` as uid/gid 65534 with core dumps allowed as far as the
/// kernel lets them (soft and hard RLIMIT_CORE unlimited), output in `log`.
fn as_nobody(program: &str, args: &[&str], envs: &[(&str, &str)], log: &Path) -> Command {
    let out = fs::File::create(log).unwrap();
    let mut c = Command::new("prlimit");
    c.args(["--core=unlimited:unlimited", "--", "setpriv", "--reuid", "65534", "--regid", "65534"])
        .args(["--clear-groups", "--", program])
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "info,openraft=warn")
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    c
}

/// Core size limits (soft, hard) of a process, from /proc/PID/limits.
fn core_limits(pid: u32) -> Option<(String, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max core file size"))?;
    let f: Vec<&str> = line["Max core file size".len()..].split_whitespace().collect();
    Some((f.first()?.to_string(), f.get(1)?.to_string()))
}

/// Waits until process `pid` runs swarmd's hardening: no core size at all, and
/// its /proc files owned by root although it runs as 65534 (the kernel's sign
/// of a non-dumpable process); checks its umask too.
fn wait_hardened(what: &str, pid: u32) {
    wait_for(&format!("{what} (pid {pid}) to be non-dumpable with a core limit of 0"), DEADLINE, || {
        let owner = fs::metadata(format!("/proc/{pid}/environ")).ok()?.uid();
        let limits = core_limits(pid)?;
        let uid = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let runs_as_nobody = uid.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("65534"));
        (runs_as_nobody && owner == 0 && limits == ("0".into(), "0".into())).then_some(())
    });
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Umask:\t0077"), "{what}: umask is not 0077");
}

#[test]
fn invariant_11_nodes_and_secretctl_dump_no_core_and_hide_their_proc_files() {
    if !can_switch_users("invariant_11_nodes_and_secretctl_dump_no_core_and_hide_their_proc_files") {
        return;
    }
    // A directory uid 65534 owns, where it can reach it (the usual test dir is root's, 0700).
    let dir = tempfile::Builder::new().prefix("swarmd-nobody-").tempdir_in("/tmp").unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home: PathBuf = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let mut env = Env::new();
    let (m_data, w_data, run) = (home.join("m1"), home.join("w1"), home.join("run"));
    let addr = format!("127.0.0.1:{}", free_port());
    let sock = m_data.join("control.sock");

    let m_args = ["manager", "init", "--data-dir", m_data.to_str().unwrap(), "--listen-addr", &addr];
    let manager = as_nobody(swarmd_bin(), &m_args, &[], &env.path("m1.log")).stdin(Stdio::null()).spawn().unwrap();
    env.procs.push(Proc { name: "m1 (uid 65534)".into(), child: manager, log: env.path("m1.log") });
    let host = format!("unix://{}", sock.display());
    let ctl = |args: &[&str]| Command::new(secretctl_bin()).arg("--host").arg(&host).args(args).output().unwrap();
    wait_for("the manager to serve", DEADLINE, || ctl(&["node", "ls", "-q"]).status.success().then_some(()));
    wait_hardened("manager", env.procs[0].pid());

    let token = String::from_utf8(ctl(&["join-token", "worker", "-q"]).stdout).unwrap().trim().to_owned();
    let w_args = ["worker", "join", &token, "--remote", &addr, "--data-dir", w_data.to_str().unwrap()];
    let envs = [("SWARMD_RUN_DIR", run.to_str().unwrap())];
    let worker = as_nobody(swarmd_bin(), &w_args, &envs, &env.path("w1.log")).stdin(Stdio::null()).spawn().unwrap();
    env.procs.push(Proc { name: "w1 (uid 65534)".into(), child: worker, log: env.path("w1.log") });
    wait_for("the worker to join", DEADLINE, || w_data.join("worker.json").exists().then_some(()));
    wait_hardened("worker", env.procs[1].pid());

    // secretctl, while it waits for a secret's value on standard input.
    let mut ctl_proc =
        as_nobody(secretctl_bin(), &["--host", &host, "create", "probe", "-"], &[], &env.path("ctl.log"))
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
    let mut stdin = ctl_proc.stdin.take().unwrap();
    env.procs.push(Proc { name: "secretctl (uid 65534)".into(), child: ctl_proc, log: env.path("ctl.log") });
    wait_hardened("secretctl", env.procs[2].pid());
    std::io::Write::write_all(&mut stdin, b"probe value").unwrap();
    drop(stdin);
    let st = wait_for("secretctl to finish", DEADLINE, || env.procs[2].child.try_wait().unwrap());
    assert!(st.success(), "secretctl create failed: {}", env.procs[2].log_text());
}
