//! Invariant 11 in the file system: a running cluster's state and run dirs
//! are private. Every directory below a manager's and a worker's data dir and
//! below the worker's run dir is 0700 or stricter, every file 0600 or stricter
//! (the control socket too), and uid 65534 can read none of them — with the
//! test's own directory opened up (0755), so only swarmd's modes protect them.
//! Needs root, runc and busybox (skipped loudly without them, mandatory in CI).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// tmpfs mount points below `dir` (a task's secret filesystem).
fn tmpfs_mounts_below(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"tmpfs")).then(|| PathBuf::from(f[1]))
        })
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Every path below `dir` (not following symlinks), `dir` included.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Whether uid/gid 65534 (no groups) can read `path`.
fn nobody_can_read(path: &Path) -> bool {
    Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "cat"])
        .arg(path)
        .output()
        .unwrap()
        .status
        .success()
}

/// Checks the modes below `root` and that uid 65534 reads no file there;
/// returns how many files were checked. Below a task's secret tmpfs (whose
/// root must be 0700) the files have the modes the service asked for (a
/// container user must read them): those are checked for unreadability only.
fn check_private(root: &Path, problems: &mut Vec<String>) -> usize {
    let secret_fs = tmpfs_mounts_below(root);
    let mut files = 0;
    for p in walk(root) {
        let Ok(meta) = fs::symlink_metadata(&p) else { continue };
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        let in_secret_fs = secret_fs.iter().any(|m| p.starts_with(m) && &p != m);
        // runc's own synchronisation FIFO (0622, for the moment between create
        // and start) lives below the runtime's state dir, which is itself
        // checked to be 0700 here.
        if ft.is_fifo() && p.file_name().is_some_and(|n| n == "exec.fifo") {
            continue;
        }
        if secret_fs.contains(&p) && mode != 0o700 {
            problems.push(format!("{}: a secret tmpfs root of mode {mode:04o}", p.display()));
        }
        if !in_secret_fs && mode & 0o077 != 0 {
            let kind = if ft.is_dir() {
                "directory"
            } else if ft.is_socket() {
                "socket"
            } else {
                "file"
            };
            problems.push(format!("{}: {kind} of mode {mode:04o}", p.display()));
        }
        if ft.is_file() {
            files += 1;
            if nobody_can_read(&p) {
                problems.push(format!("{}: readable by uid 65534", p.display()));
            }
        }
    }
    files
}

#[test]
fn invariant_11_node_state_and_run_dirs_are_private() {
    if !can_run_containers("private_files::invariant_11_node_state_and_run_dirs_are_private") {
        return;
    }
    let mut env = Env::new();
    // Open the test's own directory up: only swarmd's own modes may protect its files.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = env.start_manager("m1", &["--heartbeat", "1s"]);
    let image = busybox_image(&env, &m);
    let w = env.join_worker("w1", &m.token("worker"), &m.addr);
    m.wait_ready(2);
    let canary = format!("env-canary-{}-{}", std::process::id(), free_port());
    let o = m.ctl_stdin(&["create", "db_pass"], format!("secret-canary-{}", std::process::id()).as_bytes());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let env_arg = format!("SECRET_ENV={canary}");
    let img = image.as_str();
    let spec = ["service", "create", "web", "--image", img, "--secret", "db_pass", "--env", &env_arg];
    m.ctl_ok(&[&spec[..], &["--", "sh", "-c", "sleep 3600"]].concat());
    let running = wait_for("the task to run", Duration::from_secs(60), || {
        let o = m.ctl(&["--format", "json", "service", "ps", "web"]);
        let tasks: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
        tasks.into_iter().find(|t| t["state"] == "running")
    });
    let run_root = PathBuf::from(std::env::var("SWARMD_RUN_DIR").unwrap_or_else(|_| "/run/swarmd".into()));
    let run_dir = run_root.join(w.node_id());
    assert!(run_dir.join("bundles").exists(), "no bundles in {}: {running}", run_dir.display());
    // The bundle holds the service's environment: it must be among what is checked.
    let bundle_has_env = walk(&run_dir.join("bundles"))
        .iter()
        .any(|p| p.ends_with("config.json") && fs::read_to_string(p).unwrap_or_default().contains(&canary));
    assert!(bundle_has_env, "no bundle config.json holds the service's environment");

    let mut problems = Vec::new();
    if std::env::var_os("SWARMD_RUN_DIR").is_none() {
        let mode = fs::metadata(&run_root).unwrap().permissions().mode() & 0o7777;
        if mode != 0o700 {
            problems.push(format!("{}: mode {mode:04o}", run_root.display()));
        }
    }
    let mut checked = 0;
    for root in [&m.data, &w.data, &run_dir] {
        checked += check_private(root, &mut problems);
    }
    assert!(checked > 15, "too few files checked ({checked}): is the cluster running?");
    assert!(m.data.join("control.sock").exists());
    assert!(problems.is_empty(), "files and directories others can reach:\n{}", problems.join("\n"));
}
