//! The `swarmd` and `secretctl` command lines.
//!
//! The binaries in `src/bin/` only parse arguments and call into [`daemon`]
//! (node commands) and [`secretctl`] (the control API client). Errors print as
//! one line on stderr with a non-zero exit.

pub mod daemon;
pub mod secretctl;

/// Sets up logging to stderr; `RUST_LOG` overrides `default`. openraft's own
/// chatter is kept at `warn` unless `RUST_LOG` asks for it.
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},openraft=warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
