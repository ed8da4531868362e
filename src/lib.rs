//! The `swarmd` and `secretctl` command lines.
//!
//! The binaries in `src/bin/` only parse arguments and call into [`daemon`]
//! (node commands) and [`secretctl`] (the control API client). Errors print as
//! one line on stderr with a non-zero exit.

pub mod daemon;
pub mod secretctl;

use anyhow::Context;

/// What every swarmd binary does first, before it reads anything or starts
/// a thread (invariant 11):
///
/// * umask 0077: whatever this process or a library it uses creates (sled's
///   files, runc's state) is private to its owner. Node code also sets modes
///   explicitly; the umask is the net below it.
/// * `PR_SET_DUMPABLE` 0: no core dump, and no other process of the same user
///   may ptrace it or read its `/proc/PID/environ`, `mem` or `fd/` (the kernel
///   gives those files to root). `execve` resets this, so each binary sets it.
/// * `RLIMIT_CORE` 0, soft and hard: no core file even if something makes the
///   process dumpable again; inherited by the processes it starts.
pub fn harden_process() -> anyhow::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    use nix::sys::stat::{umask, Mode};
    umask(Mode::from_bits_truncate(0o077));
    nix::sys::prctl::set_dumpable(false).context("cannot make this process non-dumpable (prctl PR_SET_DUMPABLE)")?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).context("cannot turn core dumps off (setrlimit RLIMIT_CORE)")?;
    Ok(())
}

/// Parses the command line; on a usage error, prints clap's message with
/// anything that looks like a token or key masked, and gives the exit code.
pub fn parse_args<T: clap::Parser>() -> Result<T, std::process::ExitCode> {
    T::try_parse().map_err(|e| {
        let text = daemon::redact(&e.render().to_string());
        if e.use_stderr() {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
        std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
    })
}

/// Sets up logging to stderr; `RUST_LOG` overrides `default`. openraft's own
/// chatter is kept at `warn`, and h2's protocol warnings (which any client can
/// cause once per connection) at `error`, unless `RUST_LOG` asks for them.
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},openraft=warn,h2=error")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
