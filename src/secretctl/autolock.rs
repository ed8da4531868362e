//! `secretctl unlock-key [-q] [--rotate]` and `cluster update` (`--autolock`,
//! `--identity-ttl`, `--cert-recovery-window`, `--external-ca`).

use clap::{Args, Subcommand};
use swarmd_proto::control::{GetUnlockKeyRequest, UpdateClusterRequest};
use tonic::transport::Channel;

use super::client::explain;

/// `unlock-key [-q] [--rotate]`
#[derive(Args, Debug)]
pub(super) struct UnlockKeyArgs {
    /// Only the key.
    #[arg(short, long)]
    quiet: bool,
    /// Replace the key; every manager re-seals its keys under the new one.
    #[arg(long)]
    rotate: bool,
}

/// `cluster update`
#[derive(Subcommand, Debug)]
pub(super) enum ClusterCmd {
    /// Change cluster-wide settings.
    Update {
        /// Seal every manager's keys under an unlock key (true), or stop (false).
        #[arg(long, action = clap::ArgAction::Set)]
        autolock: Option<bool>,
        /// How long after its certificate expired a node that was off may
        /// still come back without a token (e.g. 7d, 12h; 0s: never).
        #[arg(long, value_name = "DUR", value_parser = parse_window)]
        cert_recovery_window: Option<std::time::Duration>,
        /// Lifetime of tasks' workload identities, 30s to 30d (e.g. 1h); applies
        /// to certificates issued from now on, renewals included.
        #[arg(long)]
        identity_ttl: Option<swarmd_certs::workload::IdentityTtl>,
        /// Another URL, auth key or TLS roots for the external CA, as at init:
        /// `protocol=cfssl,url=https://HOST:PORT[/PATH],authkey=F[,cacert=F]`;
        /// checked against the signer before it is kept.
        #[arg(long, value_name = "SPEC")]
        external_ca: Option<crate::daemon::ExternalCaArg>,
        /// Let services run a root filesystem directory on the workers as
        /// their image (true), or only images loaded into the cluster (false,
        /// the default). A development setting: a directory has no digest.
        #[arg(long, action = clap::ArgAction::Set)]
        allow_host_rootfs: Option<bool>,
        /// required: only images signed by a trusted key run (checked at
        /// service create/update, by the managers handing out images, and
        /// by the workers); off (the default).
        #[arg(long, value_parser = ["required", "off"])]
        content_trust: Option<String>,
    },
}

pub(super) async fn unlock_key(channel: Channel, a: UnlockKeyArgs) -> anyhow::Result<()> {
    let r = super::client::control(channel)
        .get_unlock_key(GetUnlockKeyRequest { rotate: a.rotate })
        .await
        .map_err(explain)?
        .into_inner();
    let key = zeroize::Zeroizing::new(r.key);
    if a.quiet {
        println!("{}", key.as_str());
    } else {
        if a.rotate {
            println!("Unlock key rotated; the previous key no longer unlocks any manager.");
        }
        crate::daemon::print_unlock_key(&key);
    }
    Ok(())
}

fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    swarmd_certs::parse_duration(s)
}

pub(super) async fn cluster(channel: Channel, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Update {
            autolock,
            identity_ttl,
            cert_recovery_window,
            external_ca,
            allow_host_rootfs,
            content_trust,
        } => {
            if autolock.is_none()
                && identity_ttl.is_none()
                && cert_recovery_window.is_none()
                && external_ca.is_none()
                && allow_host_rootfs.is_none()
                && content_trust.is_none()
            {
                anyhow::bail!(
                    "nothing to update: give --autolock=true|false, --identity-ttl DUR, --cert-recovery-window DUR, \
                     --external-ca SPEC, --allow-host-rootfs=true|false or --content-trust required|off"
                );
            }
            let external = match &external_ca {
                Some(ext) => {
                    let (auth_key, tls_roots_pem) = ext.read()?;
                    Some(swarmd_proto::control::ExternalCaUpdate {
                        url: ext.url.clone(),
                        auth_key: auth_key.to_vec(),
                        tls_roots_pem,
                    })
                }
                None => None,
            };
            let req = UpdateClusterRequest {
                autolock,
                identity_ttl_secs: identity_ttl.map(|t| t.duration().as_secs()),
                cert_recovery_window_secs: cert_recovery_window.map(|d| d.as_secs()),
                external_ca: external,
                allow_host_rootfs,
                content_trust: content_trust.clone(),
            };
            let r = super::client::control(channel).update_cluster(req).await.map_err(explain)?.into_inner();
            if let Some(w) = cert_recovery_window {
                println!("Nodes may recover a certificate up to {}s after it expired.", w.as_secs());
            }
            let key = zeroize::Zeroizing::new(r.unlock_key);
            match (autolock, key.is_empty()) {
                (Some(true), false) => {
                    println!("Autolock is on.");
                    crate::daemon::print_unlock_key(&key);
                }
                (Some(true), true) => println!("Autolock was already on (secretctl unlock-key shows the key)."),
                (Some(false), _) => println!("Autolock is off."),
                (None, _) => {}
            }
            if let Some(ttl) = identity_ttl {
                println!("Workload identities now live {ttl} (renewed at half of it).");
            }
            match content_trust.as_deref() {
                Some("required") => println!("Content trust is required: only images signed by a trusted key run."),
                Some(_) => println!("Content trust is off."),
                None => {}
            }
            match allow_host_rootfs {
                Some(true) => {
                    println!("Services may now run a directory on the workers as their image (development only).")
                }
                Some(false) => println!("Services run images loaded into the cluster only."),
                None => {}
            }
            if let Some(ext) = external_ca {
                println!("The external CA is now {} (checked: it signed with the new settings).", ext.url);
            }
            Ok(())
        }
    }
}
