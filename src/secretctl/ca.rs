//! `secretctl ca show|rotate`: the cluster's root CA.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;
use swarmd_proto::control::{GetCaRequest, RotateCaRequest};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::client::explain;
use super::output::{json, timestamp};
use super::Format;

#[derive(Subcommand, Debug)]
pub(super) enum CaCmd {
    /// Print the root certificate (PEM); with --format json also its SHA-256
    /// fingerprint, expiry, signer and the state of a rotation.
    Show,
    /// Rotate the root CA without downtime: a new root (generated, or the
    /// given certificate and key), cross-signed by the current one; every live
    /// node renews, then the new root becomes the only trust root and both
    /// join tokens change. Shows progress until done (Ctrl-C stops watching;
    /// the rotation goes on). Rotating again while one runs starts it over.
    Rotate {
        /// The new root's certificate (PEM); with --ca-key.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// Its private key (PKCS#8 PEM); with --ca-cert.
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Start the rotation and return at once.
        #[arg(long)]
        detach: bool,
    },
}

/// Reads a PEM file of at most 64 KiB.
fn read_pem(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut s = Zeroizing::new(String::new());
    f.take(64 << 10).read_to_string(&mut s).with_context(|| format!("cannot read {} as text", path.display()))?;
    if s.len() >= 64 << 10 {
        anyhow::bail!("{} is larger than 64 KiB: not a PEM certificate or key", path.display());
    }
    Ok(s)
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
        CaCmd::Rotate { ca_cert, ca_key, detach } => {
            let (cert_pem, key_pem) = match (ca_cert, ca_key) {
                (Some(c), Some(k)) => (read_pem(&c)?.to_string(), read_pem(&k)?),
                _ => (String::new(), Zeroizing::new(String::new())),
            };
            let mut client = super::client::control(channel);
            let started = client
                .rotate_ca(RotateCaRequest { cert_pem, key_pem: key_pem.to_string() })
                .await
                .map_err(explain)?
                .into_inner();
            let target = started.rotation.as_ref().map(|r| r.target_sha256.clone()).unwrap_or_default();
            println!("root CA rotation started toward sha256 {target}");
            if detach {
                println!("follow it with: secretctl ca show --format json");
                return Ok(());
            }
            println!("(Ctrl-C stops watching; the rotation goes on)");
            let mut last = None;
            loop {
                let ca = client.get_ca(GetCaRequest {}).await.map_err(explain)?.into_inner();
                let Some(r) = ca.rotation else {
                    println!("root CA rotated: the trust root is sha256 {}; join tokens changed", ca.sha256);
                    return Ok(());
                };
                let now = (r.target_sha256.clone(), r.converged.len(), r.converged.len() + r.unconverged.len());
                if last.as_ref() != Some(&now) {
                    if last.as_ref().is_some_and(|l: &(String, usize, usize)| l.0 != now.0) {
                        println!("the rotation was started over toward sha256 {}", now.0);
                    }
                    println!("{}/{} nodes converged", now.1, now.2);
                    last = Some(now);
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}
