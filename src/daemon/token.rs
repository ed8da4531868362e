//! Where a join token comes from, and how it stays out of `/proc`.
//!
//! Every local user can read any process's `/proc/PID/cmdline`, and the
//! `/proc/PID/environ` of their own (and, for a dumpable process, of others
//! with the same uid); both show what the last `execve` was given, for the
//! life of the process. A join token is a credential — whoever holds the
//! manager token can become a manager — so it must be in neither:
//!
//! * standard input: `swarmd worker join - …`, or no token and no other source;
//! * `--token-file F`: a regular file of mode 0600 or stricter;
//! * `SWARMD_JOIN_TOKEN`, as `docker swarm join` users script it;
//! * the command line, still accepted for compatibility.
//!
//! When the token is on the command line or in the environment, the process
//! re-executes itself before it does anything else ([`reexec_without_token`]):
//! the same program, the same arguments minus the token, the environment minus
//! `SWARMD_JOIN_TOKEN`, and the token in a pipe it inherits (the hidden
//! `--token-fd N` names only the descriptor). No long-lived process carries it.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use zeroize::Zeroizing;

/// The environment variable a join token may come from.
pub const TOKEN_ENV: &str = "SWARMD_JOIN_TOKEN";

/// Longer input is not a token (the real ones are 108 characters).
const MAX_TOKEN: usize = 4096;

/// How `worker join` and `manager join` get their token.
#[derive(Args, Clone)]
pub struct TokenArgs {
    /// The join token (SWDTKN-1-…). `-`, or no token at all, reads it from standard
    /// input; see also --token-file and SWARMD_JOIN_TOKEN. (A token given here is
    /// taken off this process's command line at once, by re-executing without it.)
    #[arg(value_name = "TOKEN")]
    token: Option<String>,
    /// Read the join token from FILE: a regular file of mode 0600 or stricter.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Internal: the token in an inherited pipe (how a re-executed swarmd gets it).
    #[arg(long, hide = true, value_name = "FD", conflicts_with_all = ["token", "token_file"])]
    token_fd: Option<i32>,
}

impl std::fmt::Debug for TokenArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenArgs")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("token_fd", &self.token_fd)
            .finish()
    }
}

impl TokenArgs {
    /// The token from whichever source was given; read once.
    pub fn read(&self) -> anyhow::Result<Zeroizing<String>> {
        let raw = if let Some(fd) = self.token_fd {
            read_fd(fd)?
        } else if let Some(path) = &self.token_file {
            read_file(path)?
        } else {
            match (self.token.as_deref(), env_token()?) {
                // Only when nothing re-executed this process (a library caller).
                (Some(t), _) if t != "-" => Zeroizing::new(t.as_bytes().to_vec()),
                (None, Some(t)) => Zeroizing::new(t.as_bytes().to_vec()),
                _ => read_stdin()?,
            }
        };
        let text = std::str::from_utf8(&raw).map_err(|_| anyhow::anyhow!("the join token is not text"))?;
        let token = text.trim();
        if token.is_empty() {
            bail!(
                "no join token: give it on standard input, with --token-file FILE (mode 0600) or in \
                 {TOKEN_ENV}; `secretctl join-token worker -q` on a manager prints it"
            );
        }
        Ok(Zeroizing::new(token.to_owned()))
    }

    /// The token this invocation would carry into a re-executed image, if it
    /// sits on the command line or in the environment.
    fn exposed(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        if self.token_fd.is_some() || self.token_file.is_some() {
            return Ok(None);
        }
        match self.token.as_deref() {
            Some("-") => Ok(None),
            Some(t) => Ok(Some(Zeroizing::new(t.to_owned()))),
            None => env_token(),
        }
    }
}

fn env_token() -> anyhow::Result<Option<Zeroizing<String>>> {
    match std::env::var_os(TOKEN_ENV) {
        None => Ok(None),
        Some(v) => match v.into_string() {
            Ok(s) => Ok(Some(Zeroizing::new(s))),
            Err(v) => {
                drop(Zeroizing::new(v.into_encoded_bytes()));
                bail!("{TOKEN_ENV} is not valid text")
            }
        },
    }
}

/// Re-executes this program without a token on its command line or
/// `SWARMD_JOIN_TOKEN` in its environment, if either is there; the token the
/// join will use (if any) goes to the new image through an inherited pipe.
/// Returns only when there was nothing to remove (or on failure). Call it
/// first thing in `main`, while the process has a single thread: no other
/// thread may fork while the pipe's read end lacks close-on-exec.
pub fn reexec_without_token(args: Option<&TokenArgs>) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let in_env = std::env::var_os(TOKEN_ENV).is_some();
    let argv_token = args.and_then(|a| a.token.as_deref()).filter(|t| *t != "-");
    if !in_env && argv_token.is_none() {
        return Ok(());
    }
    let carry = match args {
        Some(a) => a.exposed()?,
        None => None,
    };
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let arg0 = if argv.is_empty() { OsString::from("swarmd") } else { argv.remove(0) };
    if let Some(t) = argv_token {
        // The exec below shortens the window; it cannot close it, nor reach
        // the shell's history.
        eprintln!(
            "warning: a join token given as an argument was readable by every local user (/proc/PID/cmdline) \
             until now, and may be in your shell's history; pass it on standard input, with --token-file, or \
             in {TOKEN_ENV}"
        );
        // Every copy goes, wherever it was.
        argv.retain(|a| a.as_encoded_bytes() != t.as_bytes());
    }
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0(arg0).env_remove(TOKEN_ENV);
    let _pipe = match carry {
        None => {
            cmd.args(argv);
            None
        }
        Some(token) => {
            if token.len() > MAX_TOKEN {
                bail!("the join token is too long to be one (more than {MAX_TOKEN} bytes)");
            }
            let fd = token_pipe(token.as_bytes())?;
            // Before a `--` (options after it would be operands), else at the end.
            let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
            argv.splice(at..at, [OsString::from("--token-fd"), OsString::from(fd.as_raw_fd().to_string())]);
            cmd.args(argv);
            Some(fd)
        }
    };
    let err = cmd.exec();
    Err(anyhow::Error::new(err).context("cannot re-execute swarmd without the join token on its command line"))
}

/// A pipe holding `token`, closed for writing; its read end survives exec.
fn token_pipe(token: &[u8]) -> anyhow::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("cannot create a pipe for the join token")?;
    // A token is far below the pipe's capacity: this write does not block.
    let mut w = fs::File::from(w);
    std::io::Write::write_all(&mut w, token).context("cannot write the join token to its pipe")?;
    drop(w);
    fcntl(&r, FcntlArg::F_SETFD(FdFlag::empty())).context("cannot pass the join token's pipe on")?;
    Ok(r)
}

/// Reads the token from the pipe a re-executing swarmd left at `fd`, then closes it.
fn read_fd(fd: i32) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if fd < 3 {
        bail!("--token-fd is internal to swarmd (use standard input, --token-file or {TOKEN_ENV})");
    }
    // Opening the pipe anew through /proc needs no unsafe code; O_NONBLOCK
    // keeps open(2) from waiting for a writer (the write end is closed).
    let path = format!("/proc/self/fd/{fd}");
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("--token-fd {fd}: cannot open the token pipe"))?;
    if !f.metadata().map(|m| m.file_type().is_fifo()).unwrap_or(false) {
        bail!("--token-fd {fd}: not a pipe");
    }
    let flags = OFlag::from_bits_truncate(fcntl(&f, FcntlArg::F_GETFL)?);
    fcntl(&f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    let out = read_bounded(f, "--token-fd")?;
    // The inherited descriptor is not needed any more (nor by children).
    let _ = nix::unistd::close(fd);
    Ok(out)
}

/// O_ flags for `custom_flags`, from nix (the workspace has no direct libc here).
mod libc_flags {
    pub const O_NONBLOCK: i32 = nix::fcntl::OFlag::O_NONBLOCK.bits();
}

fn read_bounded(r: impl Read, what: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    // Room for all of it up front: no reallocation leaves a copy behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_TOKEN + 1));
    r.take(MAX_TOKEN as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("{what}: cannot read the join token"))?;
    if buf.len() > MAX_TOKEN {
        bail!("{what}: more than {MAX_TOKEN} bytes: not a join token");
    }
    Ok(buf)
}

/// Reads a token file, refused unless it is a regular file that only its
/// owner can read or write.
fn read_file(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let f = open_owner_only(path, "--token-file", "the join token")?;
    read_bounded(f, &format!("--token-file {}", path.display()))
}

/// Opens a file holding a secret given as `flag`, refused unless it is a
/// regular file that only its owner can read or write (mode 0600 or stricter).
pub(crate) fn open_owner_only(path: &Path, flag: &str, what: &str) -> anyhow::Result<fs::File> {
    let shown = path.display();
    // O_NONBLOCK: a FIFO is refused below instead of blocking open(2).
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("{flag} {shown}: cannot open it"))?;
    let meta = f.metadata().with_context(|| format!("{flag} {shown}"))?;
    if !meta.is_file() {
        bail!("{flag} {shown}: not a regular file; write {what} to a file of mode 0600");
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "{flag} {shown}: mode {mode:04o} lets other users read {what}; \
             run `chmod 600 {shown}` (such a file must be mode 0600 or stricter)"
        );
    }
    Ok(f)
}

/// One line of standard input.
fn read_stdin() -> anyhow::Result<Zeroizing<Vec<u8>>> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Join token (SWDTKN-1-…): ");
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_TOKEN + 1));
    stdin
        .lock()
        .take(MAX_TOKEN as u64 + 1)
        .read_until(b'\n', &mut buf)
        .context("cannot read the join token from standard input")?;
    if buf.len() > MAX_TOKEN {
        bail!("standard input: more than {MAX_TOKEN} bytes on one line: not a join token");
    }
    Ok(buf)
}

/// `text` with the secret part of anything that looks like a join token
/// (`SWDTKN-…-<secret>`) or an unlock key (`SWDKEY-1-<key>`) masked, for
/// error messages that echo arguments (clap's).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["SWDTKN-", "SWDKEY-"].iter().filter_map(|p| rest.find(p)).min() {
        out.push_str(&rest[..at]);
        let word_len = rest[at..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).unwrap_or(rest.len() - at);
        let word = &rest[at..at + word_len];
        match word.rfind('-') {
            Some(cut) if cut + 1 < word.len() => {
                out.push_str(&word[..=cut]);
                out.push_str("<redacted>");
            }
            _ => out.push_str(word),
        }
        rest = &rest[at + word_len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_masks_secret_parts_only() {
        let t = format!("SWDTKN-1-{}-{}", "a".repeat(64), "b".repeat(32));
        let r = redact(&format!("error: unexpected argument '{t}' found"));
        assert!(!r.contains(&"b".repeat(32)), "{r}");
        assert!(r.contains(&format!("SWDTKN-1-{}-<redacted>", "a".repeat(64))), "{r}");
        let k = format!("SWDKEY-1-{}", "c".repeat(64));
        assert!(!redact(&format!("x {k} y")).contains(&"c".repeat(64)));
        assert_eq!(redact("no secrets here"), "no secrets here");
        assert_eq!(redact("SWDTKN-"), "SWDTKN-");
    }

    #[test]
    fn invariant_11_a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        fs::write(&p, "SWDTKN-1-x-y\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let args = TokenArgs { token: None, token_file: Some(p.clone()), token_fd: None };
        let e = args.read().unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&*args.read().unwrap(), "SWDTKN-1-x-y");
        let d = TokenArgs { token: None, token_file: Some(dir.path().to_owned()), token_fd: None };
        assert!(d.read().unwrap_err().to_string().contains("not a regular file"));
    }
}
