//! The command-line form of a service's secret reference,
//! `SRC[@VERSION][,target=T][,uid=U][,gid=G][,mode=M]`, parsed here into the
//! structured [`SecretReference`] the control API takes, and written back
//! from the one it returns. The manager never sees this grammar.

use swarmd_proto::control::SecretReference;

/// Parses one `--secret` / `--secret-add` value (a clap value parser).
pub(super) fn parse(s: &str) -> Result<SecretReference, String> {
    let mut parts = s.split(',');
    let src = parts.next().unwrap_or_default().trim();
    let (source, version) = match src.split_once('@') {
        Some((n, v)) => (n, Some(v.parse::<u32>().map_err(|_| format!("version {v:?} is not a number"))?)),
        None => (src, None),
    };
    if source.is_empty() {
        return Err("name the secret first".into());
    }
    let mut r = SecretReference { source: source.to_owned(), version, ..Default::default() };
    for p in parts {
        let (k, v) = p.split_once('=').ok_or_else(|| format!("{p:?} is not KEY=VALUE"))?;
        let num = |v: &str| v.parse::<u32>().map_err(|_| format!("{k}={v} is not a number"));
        match k.trim() {
            "target" => r.target = v.strip_prefix("/run/secrets/").unwrap_or(v).to_owned(),
            "uid" => r.uid = Some(num(v)?),
            "gid" => r.gid = Some(num(v)?),
            "mode" => {
                let mode = u32::from_str_radix(v.trim_start_matches("0o"), 8)
                    .map_err(|_| format!("mode={v} is not an octal mode"))?;
                r.mode = Some(mode);
            }
            "source" | "src" => return Err("give the secret first, not as source=".into()),
            other => return Err(format!("unknown option {other:?}: use target, uid, gid or mode")),
        }
    }
    Ok(r)
}

/// The command-line form of a reference as the manager returns it (every
/// field set): only what differs from the defaults is written.
pub(super) fn text(r: &SecretReference) -> String {
    let mut s = r.source.clone();
    if let Some(v) = r.version {
        s.push_str(&format!("@{v}"));
    }
    if !r.target.is_empty() && r.target != r.source {
        s.push_str(&format!(",target={}", r.target));
    }
    if let Some(uid) = r.uid.filter(|u| *u != 0) {
        s.push_str(&format!(",uid={uid}"));
    }
    if let Some(gid) = r.gid.filter(|g| *g != 0) {
        s.push_str(&format!(",gid={gid}"));
    }
    if let Some(mode) = r.mode.filter(|m| *m != 0o444) {
        s.push_str(&format!(",mode={mode:o}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_into_fields_and_back() {
        let r = parse("db@3,target=/run/secrets/pw,uid=10,gid=20,mode=0400").unwrap();
        assert_eq!((r.source.as_str(), r.version, r.target.as_str()), ("db", Some(3), "pw"));
        assert_eq!((r.uid, r.gid, r.mode), (Some(10), Some(20), Some(0o400)));
        assert_eq!(text(&r), "db@3,target=pw,uid=10,gid=20,mode=400");
        let plain = parse("db").unwrap();
        assert_eq!(plain, SecretReference { source: "db".into(), ..Default::default() });
        assert_eq!(text(&plain), "db");
    }

    #[test]
    fn malformed_references_are_refused_with_the_reason() {
        for (bad, why) in [
            ("", "name the secret first"),
            ("@2", "name the secret first"),
            ("db@x", "is not a number"),
            ("db,uid=-1", "is not a number"),
            ("db,mode=999", "octal mode"),
            ("db,colour=red", "unknown option"),
            ("db,target", "KEY=VALUE"),
            ("db,source=x", "give the secret first"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
