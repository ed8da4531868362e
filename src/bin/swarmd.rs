//! `swarmd`: create, join and run cluster nodes. See `swarmd --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    swarmd::init_logging("info");
    swarmd_certs::install_crypto_provider();
    let cli = swarmd::daemon::Cli::parse();
    match swarmd::daemon::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swarmd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
