//! `secretctl ca show`: the cluster's root CA.

use clap::Subcommand;
use serde::Serialize;
use swarmd_proto::control::GetCaRequest;
use tonic::transport::Channel;

use super::client::explain;
use super::output::{json, timestamp};
use super::Format;

#[derive(Subcommand, Debug)]
pub(super) enum CaCmd {
    /// Print the root certificate (PEM); with --format json also its SHA-256
    /// fingerprint, expiry, signer and the state of a rotation.
    Show,
}

#[derive(Serialize)]
struct CaView {
    root_pem: String,
    sha256: String,
    not_after: i64,
    expiry: String,
    external_signer: bool,
    rotation: Option<RotationView>,
}

#[derive(Serialize)]
struct RotationView {
    target_sha256: String,
    converged: Vec<String>,
    unconverged: Vec<String>,
}

pub(super) async fn run(channel: Channel, cmd: CaCmd, format: Format) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Show => {
            let ca = super::client::control(channel).get_ca(GetCaRequest {}).await.map_err(explain)?.into_inner();
            if format != Format::Json {
                print!("{}", ca.root_pem);
                return Ok(());
            }
            json(&CaView {
                expiry: timestamp(ca.not_after),
                root_pem: ca.root_pem,
                sha256: ca.sha256,
                not_after: ca.not_after,
                external_signer: ca.external_signer,
                rotation: ca.rotation.map(|r| RotationView {
                    target_sha256: r.target_sha256,
                    converged: r.converged,
                    unconverged: r.unconverged,
                }),
            })
        }
    }
}
