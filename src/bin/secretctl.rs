//! `secretctl`: manage a swarmd cluster. See `secretctl --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
