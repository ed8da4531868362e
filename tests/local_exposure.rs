//! Invariant 11 against other local users: no join token in any process's
//! command line or environment, token files that others can read refused,
//! and nodes that cannot dump core (nor be read through /proc by their user).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The secret part of a token: the hex after the last '-'.
fn secret_part(token: &str) -> &str {
    let s = token.rsplit('-').next().unwrap();
    assert!(s.len() >= 32, "not a token");
    s
}

/// Every process on the machine whose cmdline or environ holds `needle`,
/// as "PID (what) cmdline" with the needle masked.
fn processes_holding(needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        for what in ["cmdline", "environ"] {
            // Processes come and go: unreadable means gone.
            let Ok(bytes) = fs::read(e.path().join(what)) else { continue };
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ").replace(needle, "<SECRET>");
                hits.push(format!("{pid} ({what}): {cmd}"));
            }
        }
    }
    hits
}

/// How a join command gets its token.
#[derive(Clone, Copy, Debug)]
enum Source {
    Argument,
    Environment,
    File,
    Stdin,
}

const SOURCES: [Source; 4] = [Source::Argument, Source::Environment, Source::File, Source::Stdin];

/// Starts `swarmd <role> join` in `<name>/` with the token from `how`.
fn join(env: &mut Env, role: &str, name: &str, token: &str, how: Source, remote: &str, extra: &[&str]) -> usize {
    let data = env.path(name);
    let token_file = env.path(&format!("{name}.token"));
    let mut args: Vec<String> = vec![role.into(), "join".into()];
    let (mut envs, mut stdin) = (Vec::new(), None);
    match how {
        Source::Argument => args.push(token.into()),
        Source::Environment => envs.push(("SWARMD_JOIN_TOKEN", token)),
        Source::File => {
            fs::write(&token_file, format!("{token}\n")).unwrap();
            fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
            args.extend(["--token-file".into(), token_file.display().to_string()]);
        }
        Source::Stdin => stdin = Some(format!("{token}\n").into_bytes()),
    }
    args.extend(["--remote".into(), remote.into(), "--data-dir".into(), data.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.spawn_with(name, &args, &envs, stdin.as_deref())
}

#[test]
fn invariant_11_no_join_token_in_any_process_cmdline_or_environ() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &[]);
    let (wtoken, mtoken) = (m1.token("worker"), m1.token("manager"));
    let secrets = [secret_part(&wtoken).to_owned(), secret_part(&mtoken).to_owned()];

    for (i, how) in SOURCES.iter().enumerate() {
        join(&mut env, "worker", &format!("w{i}"), &wtoken, *how, &m1.addr, &[]);
    }
    m1.wait_ready(1 + SOURCES.len());
    for (i, how) in SOURCES.iter().enumerate() {
        let name = format!("m{}", i + 2);
        let listen = format!("127.0.0.1:{}", free_port());
        let idx = join(&mut env, "manager", &name, &mtoken, *how, &m1.addr, &["--listen-addr", &listen]);
        let data = env.path(&name);
        wait_for(&format!("{name} ({how:?}) to join raft"), DEADLINE, || {
            if let Ok(Some(st)) = env.procs[idx].child.try_wait() {
                panic!("{name} ({how:?}) exited: {st}\n{}", env.procs[idx].log_text());
            }
            data.join("manager.json").exists().then_some(())
        });
    }
    m1.wait_ready(1 + 2 * SOURCES.len());

    // Every node is up, each through its own source: nothing on the machine
    // shows either token's secret in a command line or an environment.
    for (secret, what) in secrets.iter().zip(["worker token", "manager token"]) {
        let hits = processes_holding(secret);
        assert!(hits.is_empty(), "the {what}'s secret is readable in /proc:\n{}", hits.join("\n"));
    }
    // And no log printed it.
    for p in &env.procs {
        for secret in &secrets {
            assert!(!p.log_text().contains(secret.as_str()), "{} printed a token's secret", p.name);
        }
    }
}

#[test]
fn invariant_11_a_token_file_others_can_read_is_refused() {
    let mut env = Env::new();
    let m1 = env.start_manager("m1", &[]);
    for role in ["worker", "manager"] {
        let token = m1.token(role);
        let file = env.path(&format!("{role}.token"));
        fs::write(&file, format!("{token}\n")).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let data = env.path(&format!("{role}-node"));
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args = vec![role, "join", "--token-file", file.to_str().unwrap(), "--remote", &m1.addr];
        args.extend(["--data-dir", data.to_str().unwrap()]);
        if role == "manager" {
            args.extend(["--listen-addr", &listen]);
        }
        let o = env.swarmd(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{role} join accepted a 0644 token file: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
        for needle in ["mode 0644", "chmod 600", file.to_str().unwrap()] {
            assert!(lines[0].contains(needle), "{needle:?} missing from: {}", lines[0]);
        }
        assert!(!stderr.contains(secret_part(&token)), "the refusal printed the token");
        assert!(!data.exists(), "{role} join wrote {} although it refused the token file", data.display());
    }
    assert_eq!(m1.nodes().len(), 1, "a node joined with a refused token file");
}

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
    let manager = as_nobody(&swarmd_bin(), &m_args, &[], &env.path("m1.log")).stdin(Stdio::null()).spawn().unwrap();
    env.procs.push(Proc { name: "m1 (uid 65534)".into(), child: manager, log: env.path("m1.log") });
    let host = format!("unix://{}", sock.display());
    let ctl = |args: &[&str]| Command::new(secretctl_bin()).arg("--host").arg(&host).args(args).output().unwrap();
    wait_for("the manager to serve", DEADLINE, || ctl(&["node", "ls", "-q"]).status.success().then_some(()));
    wait_hardened("manager", env.procs[0].pid());

    let token = String::from_utf8(ctl(&["join-token", "worker", "-q"]).stdout).unwrap().trim().to_owned();
    let w_args = ["worker", "join", "--remote", &addr, "--data-dir", w_data.to_str().unwrap()];
    let envs = [("SWARMD_RUN_DIR", run.to_str().unwrap())];
    let mut worker =
        as_nobody(&swarmd_bin(), &w_args, &envs, &env.path("w1.log")).stdin(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = worker.stdin.take().unwrap();
        stdin.write_all(format!("{token}\n").as_bytes()).unwrap();
    }
    env.procs.push(Proc { name: "w1 (uid 65534)".into(), child: worker, log: env.path("w1.log") });
    wait_for("the worker to join", DEADLINE, || w_data.join("worker.json").exists().then_some(()));
    wait_hardened("worker", env.procs[1].pid());

    // secretctl, while it waits for a secret's value on standard input.
    let mut ctl_proc =
        as_nobody(&secretctl_bin(), &["--host", &host, "create", "probe", "-"], &[], &env.path("ctl.log"))
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
