//! `secretctl`: manage a swarmd cluster. See `secretctl --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Private file modes (admin keys) and no core dump of a process that
    // holds secret values on their way to the cluster.
    if let Err(e) = swarmd::harden_process() {
        eprintln!("secretctl: error: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    swarmd::init_logging("warn");
    swarmd_certs::install_crypto_provider();
    let cli = swarmd::secretctl::Cli::parse();
    match swarmd::secretctl::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("secretctl: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
