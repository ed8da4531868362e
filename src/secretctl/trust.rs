//! `secretctl trust key add|ls|rm` and `trust signature add`: content trust.

use std::path::PathBuf;

use base64::Engine;
use clap::Subcommand;
use swarmd_proto::control::{
    AddImageSignatureRequest, AddTrustKeyRequest, ListTrustKeysRequest, RemoveTrustKeyRequest,
};
use tonic::transport::Channel;

use super::client::explain;
use super::output::{json, table, timestamp};
use super::Format;

#[derive(Subcommand, Debug)]
pub(super) enum TrustCmd {
    /// Keys trusted to sign images.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Images' signatures.
    #[command(subcommand)]
    Signature(SignatureCmd),
}

#[derive(Subcommand, Debug)]
pub(super) enum KeyCmd {
    /// Trust an ECDSA P-256 public key (PEM, as `openssl ec -pubout` or
    /// cosign.pub) to sign images of the repositories SCOPE matches.
    Add {
        name: String,
        /// The public key file.
        public_key: PathBuf,
        /// A glob over repositories, e.g. acme/* (default: every repository).
        #[arg(long, default_value = "*")]
        scope: String,
    },
    /// List the trusted keys.
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// Stop trusting keys: images they alone signed get no new tasks under
    /// content trust (running ones keep running).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum SignatureCmd {
    /// Import a signature made elsewhere (cosign, openssl): PAYLOAD is the
    /// simple signing JSON as signed, SIGNATURE the base64 of the DER ECDSA
    /// signature (`openssl dgst -sha256 -sign key.pem PAYLOAD | base64 -w0`).
    Add {
        /// The image: NAME[:TAG], NAME@sha256:… or sha256:….
        image: String,
        #[arg(long)]
        payload: PathBuf,
        #[arg(long)]
        signature: PathBuf,
    },
}

fn read(path: &PathBuf, max: u64) -> anyhow::Result<Vec<u8>> {
    let len = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?.len();
    if len > max {
        anyhow::bail!("{}: larger than {max} bytes", path.display());
    }
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Reads a base64 signature file (whitespace ignored) into DER bytes.
pub(super) fn read_signature(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    let text =
        String::from_utf8(read(path, 4096)?).map_err(|_| anyhow::anyhow!("{}: not base64 text", path.display()))?;
    let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean)
        .map_err(|e| anyhow::anyhow!("{}: not base64 ({e}): give the base64 of the DER signature", path.display()))
}

pub(super) async fn run(channel: Channel, cmd: TrustCmd, format: Format) -> anyhow::Result<()> {
    let mut client = super::client::control(channel);
    match cmd {
        TrustCmd::Key(KeyCmd::Add { name, public_key, scope }) => {
            let pem = String::from_utf8(read(&public_key, 16 << 10)?)
                .map_err(|_| anyhow::anyhow!("{}: not a PEM file", public_key.display()))?;
            let k = client
                .add_trust_key(AddTrustKeyRequest { name, public_key_pem: pem, scope })
                .await
                .map_err(explain)?
                .into_inner();
            println!("{}  sha256:{}  scope {}", k.name, k.fingerprint, k.scope);
        }
        TrustCmd::Key(KeyCmd::Ls { quiet }) => {
            let keys = client.list_trust_keys(ListTrustKeysRequest {}).await.map_err(explain)?.into_inner().keys;
            if quiet {
                keys.iter().for_each(|k| println!("{}", k.name));
            } else if format == Format::Json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({"name": k.name, "scope": k.scope, "fingerprint": k.fingerprint,
                            "public_key_pem": k.public_key_pem, "created_at": timestamp(k.created_at)})
                    })
                    .collect();
                json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            k.scope.clone(),
                            format!("sha256:{}", k.fingerprint),
                            timestamp(k.created_at),
                        ]
                    })
                    .collect();
                table(&["NAME", "SCOPE", "FINGERPRINT", "ADDED"], &rows);
            }
        }
        TrustCmd::Key(KeyCmd::Rm { names }) => {
            for name in names {
                client.remove_trust_key(RemoveTrustKeyRequest { name: name.clone() }).await.map_err(explain)?;
                println!("{name}");
            }
        }
        TrustCmd::Signature(SignatureCmd::Add { image, payload, signature }) => {
            let payload = read(&payload, swarmd_image::trust::MAX_PAYLOAD as u64)?;
            let signature = read_signature(&signature)?;
            let i = client
                .add_image_signature(AddImageSignatureRequest { reference: image, payload, signature })
                .await
                .map_err(explain)?
                .into_inner();
            println!("{}", i.digest);
        }
    }
    Ok(())
}
