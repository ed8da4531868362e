//! `swarmd`: create, join and run cluster nodes. See `swarmd --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Before anything else, and while this process has one thread: private
    // file modes, no core dumps, and no join token in argv or environ.
    if let Err(e) = swarmd::harden_process() {
        eprintln!("swarmd: error: {e:#}");
        return ExitCode::FAILURE;
    }
    let cli: swarmd::daemon::Cli = match swarmd::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = swarmd::daemon::reexec_without_token(&cli) {
        eprintln!("swarmd: error: {e:#}");
        return ExitCode::FAILURE;
    }
    swarmd::init_logging("info");
    swarmd_certs::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("swarmd: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(swarmd::daemon::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swarmd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
