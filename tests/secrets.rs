//! The secret store through secretctl: Docker's rules, versions, exactly one
//! winner among concurrent creates, refusals that change nothing, and tamper
//! detection on a stored ciphertext.

mod common;

use common::*;
use serde_json::Value;

fn digest(m: &Manager) -> Value {
    info(m).unwrap()["state_digest"].clone()
}

fn create(m: &Manager, name: &str, value: &[u8], extra: &[&str]) -> std::process::Output {
    // Flags first, then `--`, so that names starting with `-` reach the server.
    let mut args = vec!["create"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", name]);
    m.ctl_stdin(&args, value)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn secrets_follow_dockers_rules_and_refusals_change_nothing() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);

    let o = create(&m, "db_pass", b"s3cr3t-value", &["--label", "env=prod", "--label", "team=db"]);
    assert!(o.status.success(), "create failed: {}", stderr(&o));
    let id = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    assert_eq!(id.len(), 25, "create prints the new ID, got {id:?}");
    let o = create(&m, "api.key-2", b"other", &["--label", "env=dev"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // ls, filters, -q, inspect: metadata only.
    let all: Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "ls"])).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    let prod = m.ctl_ok(&["ls", "-q", "--filter", "label=env=prod"]);
    assert_eq!(prod.trim(), id);
    let env_any = m.ctl_ok(&["ls", "-q", "--filter", "label=env"]);
    assert_eq!(env_any.lines().count(), 2);
    assert_eq!(m.ctl_ok(&["ls", "-q", "--filter", "label=env=prod", "--filter", "label=team=web"]).trim(), "");
    let table = m.ctl_ok(&["ls"]);
    assert!(table.contains("db_pass") && table.contains("api.key-2"), "{table}");
    let inspect: Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "inspect", "db_pass"])).unwrap();
    assert_eq!(inspect[0]["id"], id.as_str());
    assert_eq!(inspect[0]["versions"][0]["size"], 12);
    assert_eq!(inspect[0]["labels"]["team"], "db");
    let by_prefix: Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "inspect", &id[..8]])).unwrap();
    assert_eq!(by_prefix[0]["name"], "db_pass");
    for out in [m.ctl_ok(&["--format", "json", "inspect", "db_pass"]), m.ctl_ok(&["inspect", "db_pass"]), table] {
        assert!(!out.contains("s3cr3t"), "a read returned the value: {out}");
    }

    // Refusals: each with a clear message, none changing the state.
    let before = digest(&m);
    let too_long = "a".repeat(65);
    let bad_names: Vec<(&str, &str)> = vec![
        ("-lead", "invalid secret name"),
        ("trail_", "invalid secret name"),
        (too_long.as_str(), "invalid secret name"),
        ("has space", "invalid secret name"),
        ("ünicode", "invalid secret name"),
        ("db_pass", "already in use"),
    ];
    for (name, why) in bad_names {
        let o = create(&m, name, b"x", &[]);
        assert!(!o.status.success(), "{name:?} was accepted");
        assert!(stderr(&o).contains(why), "{name:?}: {}", stderr(&o));
    }
    let o = create(&m, "empty", b"", &[]);
    assert!(!o.status.success() && stderr(&o).contains("empty"), "{}", stderr(&o));
    let o = create(&m, "big", &vec![7u8; 500 * 1024], &[]);
    assert!(!o.status.success() && stderr(&o).contains("500 KiB"), "{}", stderr(&o));
    let o = create(&m, "badlabel", b"x", &["--label=-x=1"]);
    assert!(!o.status.success() && stderr(&o).contains("invalid label key"), "{}", stderr(&o));
    let o = m.ctl_stdin(&["update", "db_pass"], &vec![1u8; 600 * 1024]);
    assert!(!o.status.success() && stderr(&o).contains("500 KiB"), "{}", stderr(&o));
    let o = m.ctl_stdin(&["update", "nosuch"], b"x");
    assert!(!o.status.success() && stderr(&o).contains("no such secret"), "{}", stderr(&o));
    let o = m.ctl(&["rm", "nosuch"]);
    assert!(!o.status.success() && stderr(&o).contains("no such secret"), "{}", stderr(&o));
    assert_eq!(digest(&m), before, "a refused request changed the state");

    // The largest value accepted: 500 KiB - 1.
    let o = create(&m, "big", &vec![7u8; 500 * 1024 - 1], &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Versions: update adds one; inspect lists them with timestamps.
    let out = String::from_utf8(m.ctl_stdin(&["update", "db_pass"], b"new-value").stdout).unwrap();
    assert!(out.contains("version 2"), "{out}");
    let inspect: Value = serde_json::from_str(&m.ctl_ok(&["--format", "json", "inspect", "db_pass"])).unwrap();
    let versions = inspect[0]["versions"].as_array().unwrap();
    assert_eq!(versions.iter().map(|v| v["version"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    assert!(versions.iter().all(|v| !v["created_at"].as_str().unwrap().is_empty()));
    assert_eq!(versions[1]["size"], 9);

    // Two (here: eight) concurrent creates of one name: exactly one wins.
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let m = &m;
        let hs: Vec<_> = (0..8).map(|i| s.spawn(move || create(m, "race", format!("v{i}").as_bytes(), &[]))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(winners, 1, "concurrent creates: {winners} won");
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(stderr(o).contains("already in use"), "{}", stderr(o));
    }

    // Every stored version opens.
    let verify = m.ctl_ok(&["keys", "verify"]);
    assert_eq!(verify.lines().filter(|l| l.contains(" ok")).count(), 5, "{verify}");

    // rm by name and by ID; several at once, reporting each.
    let o = m.ctl(&["rm", "db_pass", "nosuch", "api.key-2"]);
    assert!(!o.status.success(), "rm of a missing secret must fail");
    assert!(stderr(&o).contains("nosuch"), "{}", stderr(&o));
    let left = m.ctl_ok(&["ls", "-q"]);
    assert_eq!(left.lines().count(), 2, "db_pass and api.key-2 removed, big and race left: {left}");
    let o = m.ctl(&["inspect", &id]);
    assert!(!o.status.success() && stderr(&o).contains("no such secret"));
    // A removed name can be used again.
    assert!(create(&m, "db_pass", b"again", &[]).status.success());
}

/// One flipped byte in one stored ciphertext: that secret (only) fails its
/// integrity check, and the manager keeps serving.
#[test]
fn a_tampered_ciphertext_fails_for_that_secret_only() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        let o = create(&m, name, format!("value of {name}").as_bytes(), &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        ids.push(String::from_utf8(o.stdout).unwrap().trim().to_owned());
    }
    m.ctl_ok(&["keys", "verify"]);
    let exit = env.proc(m.proc_idx).terminate();
    assert!(exit.success(), "{exit:?}");
    {
        let storage = swarmd_manager::raft::open_storage(&m.data.join("raft")).unwrap();
        let sm = storage.db.open_tree("sm").unwrap();
        let key = format!("secretdata/{}/{:010}", ids[1], 1);
        let mut v = sm.get(&key).unwrap().expect("stored ciphertext").to_vec();
        // bincode: u32 key ID, 24-byte nonce, u64 length, then the ciphertext.
        v[4 + 24 + 8] ^= 0x01;
        sm.insert(key.as_bytes(), v).unwrap();
        storage.db.flush().unwrap();
    }
    env.run_node("m1", &m.data);
    wait_for("the manager to serve again", std::time::Duration::from_secs(30), || info(&m));
    let o = m.ctl(&["--format", "json", "keys", "verify"]);
    assert!(!o.status.success(), "verify passed over a tampered ciphertext");
    assert!(stderr(&o).contains("1 of 3"), "{}", stderr(&o));
    let checks: Value = serde_json::from_slice(&o.stdout).unwrap();
    for c in checks.as_array().unwrap() {
        let err = c["error"].as_str().unwrap();
        if c["id"] == ids[1].as_str() {
            assert!(err.contains("integrity check failed"), "{c}");
        } else {
            assert!(err.is_empty(), "an untouched secret failed: {c}");
        }
    }
    // Still serving reads and writes.
    assert!(create(&m, "four", b"4", &[]).status.success());
    assert_eq!(m.ctl_ok(&["ls", "-q"]).lines().count(), 4);
}

/// Bad service specs are refused with a clear message and change nothing (no
/// containers needed: they never get past the manager).
#[test]
fn bad_service_specs_are_refused_and_change_nothing() {
    let mut env = Env::new();
    let m = env.start_manager("m1", &[]);
    assert!(create(&m, "db_pass", b"x", &[]).status.success());
    let before = digest(&m);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--image", "relative/dir"], "no such image"),
        (vec!["--image", "/img", "--constraint", "node.cpu==4"], "invalid constraint"),
        (vec!["--image", "/img", "--secret", "nosuch"], "no such secret"),
        (vec!["--image", "/img", "--secret", "db_pass@7"], "no version 7"),
        (vec!["--image", "/img", "--secret", "db_pass,target=../etc/passwd"], "invalid secret target"),
        (vec!["--image", "/img", "--secret", "db_pass,mode=999"], "octal mode"),
        (vec!["--image", "/img", "--secret", "db_pass,colour=red"], "unknown option"),
        (vec!["--image", "/img", "--user", "root"], "expected UID"),
        (vec!["--image", "/img", "--env", "NOEQUALS"], "KEY=VALUE"),
        (vec!["--image", "/img", "--memory", "1000"], "at least 4 MiB"),
        (vec!["--image", "/img", "--privileged"], "not allowed"),
        (vec!["--image", "/img", "--cap-add", "SYS_ADMIN"], "not allowed"),
    ];
    for (flags, why) in cases {
        let mut args = vec!["service", "create", "svc"];
        args.extend(&flags);
        args.extend(["--", "true"]);
        let o = m.ctl(&args);
        assert!(!o.status.success(), "{flags:?} was accepted");
        assert!(stderr(&o).contains(why), "{flags:?}: {}", stderr(&o));
    }
    let o = m.ctl(&["service", "create", "-bad", "--image", "/img", "--", "true"]);
    assert!(!o.status.success());
    assert_eq!(digest(&m), before, "a refused service changed the state");
    assert!(m.ctl_ok(&["service", "ls", "-q"]).trim().is_empty());
}
