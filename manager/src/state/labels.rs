//! Labels, as nodes and secrets carry them: the rules every label key and
//! value obeys. Labels have no records or commands of their own; the node and
//! secret commands check them with these.

/// Longest label value accepted.
pub const MAX_LABEL_VALUE: usize = 4096;

/// A label: key as [`check_label_key`], value at most 4 KiB.
pub fn check_label(k: &str, v: &str) -> Result<(), String> {
    check_label_key(k)?;
    if v.len() > MAX_LABEL_VALUE {
        return Err(format!("label {k:?}: value of {} bytes is over the {MAX_LABEL_VALUE}-byte limit", v.len()));
    }
    Ok(())
}

/// Label keys: 1–128 characters of `[A-Za-z0-9._/-]`, starting with a letter or digit.
pub fn check_label_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= 128
        && k.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {:?}: use 1-128 characters of [A-Za-z0-9._/-], starting with a letter or digit",
            k.chars().take(140).collect::<String>()
        ))
    }
}
