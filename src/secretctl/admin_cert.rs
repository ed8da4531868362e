//! `secretctl admin-cert`: operators' client certificates for the control API
//! over mTLS. `--out DIR [--expiry DUR]` issues one through a manager's
//! control socket (so only someone who may open that socket gets one); `ls`
//! lists those not yet expired; `revoke SERIAL` refuses one cluster-wide, at
//! once, open connections included.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use swarmd_proto::control::{
    AdminCertificate, IssueAdminCertificateRequest, ListAdminCertificatesRequest, RevokeAdminCertificateRequest,
};
use tonic::transport::Channel;

use super::client::explain;
use super::output::{json, table, timestamp};
use super::Format;

/// `admin-cert --out DIR [--expiry DUR] | admin-cert ls | admin-cert revoke SERIAL`
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct AdminCertArgs {
    #[command(subcommand)]
    command: Option<AdminCertCmd>,
    #[command(flatten)]
    issue: IssueArgs,
}

#[derive(Subcommand, Debug)]
enum AdminCertCmd {
    /// List the admin certificates not yet expired (revoked ones too).
    Ls {
        /// Print serials only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Revoke an admin certificate: every manager refuses it from now on and
    /// closes its connections.
    Revoke {
        /// The serial `admin-cert ls` shows.
        serial: String,
    },
}

/// Issuing: `--out DIR [--expiry DUR]`.
#[derive(Args, Debug)]
struct IssueArgs {
    /// Directory for admin.crt, admin.key and ca.crt (all 0600; the directory is made 0700).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Lifetime, e.g. 12h or 7d [default: the cluster's node certificate lifetime; at most 30d].
    #[arg(long, value_parser = swarmd_certs::parse_duration)]
    expiry: Option<std::time::Duration>,
}

#[derive(serde::Serialize)]
struct Row {
    serial: String,
    id: String,
    issued_at: String,
    not_after: String,
    revoked: bool,
    revoked_at: String,
}

impl From<AdminCertificate> for Row {
    fn from(c: AdminCertificate) -> Self {
        Row {
            serial: c.serial,
            id: c.id,
            issued_at: timestamp(c.issued_at),
            not_after: timestamp(c.not_after),
            revoked: c.revoked,
            revoked_at: timestamp(c.revoked_at),
        }
    }
}

pub(super) async fn run(channel: Channel, a: AdminCertArgs, format: Format) -> anyhow::Result<()> {
    match a.command {
        Some(AdminCertCmd::Ls { quiet }) => ls(channel, quiet, format).await,
        Some(AdminCertCmd::Revoke { serial }) => {
            let req = RevokeAdminCertificateRequest { serial };
            let c = super::client::control(channel).revoke_admin_certificate(req).await.map_err(explain)?;
            println!("Admin certificate {} revoked.", c.into_inner().serial);
            Ok(())
        }
        None => match a.issue.out {
            Some(out) => issue(channel, out, a.issue.expiry).await,
            None => anyhow::bail!("give --out DIR to issue an admin certificate, or use `admin-cert ls|revoke`"),
        },
    }
}

async fn ls(channel: Channel, quiet: bool, format: Format) -> anyhow::Result<()> {
    let r = super::client::control(channel)
        .list_admin_certificates(ListAdminCertificatesRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    let rows: Vec<Row> = r.certificates.into_iter().map(Row::from).collect();
    if quiet {
        rows.iter().for_each(|r| println!("{}", r.serial));
        return Ok(());
    }
    if format == Format::Json {
        return json(&rows);
    }
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            let state = if r.revoked { format!("revoked {}", r.revoked_at) } else { "valid".into() };
            vec![r.serial, r.id, r.issued_at, r.not_after, state]
        })
        .collect();
    table(&["SERIAL", "ID", "ISSUED", "EXPIRES", "STATE"], &cells);
    Ok(())
}

async fn issue(channel: Channel, out: PathBuf, expiry: Option<std::time::Duration>) -> anyhow::Result<()> {
    let (key, csr) = swarmd_certs::generate_key_and_csr()?;
    let req = IssueAdminCertificateRequest { csr_pem: csr, validity_secs: expiry.map_or(0, |d| d.as_secs()) };
    let r = super::client::control(channel).issue_admin_certificate(req).await.map_err(explain)?.into_inner();
    swarmd_certs::create_private_dir(&out).with_context(|| format!("cannot create {}", out.display()))?;
    // Every file 0600; an older admin key here is overwritten in place.
    swarmd_certs::replace_secret_file(&out.join("admin.key"), key.as_bytes(), 0o600)?;
    swarmd_certs::write_atomic(&out.join("admin.crt"), r.certificate_pem.as_bytes(), 0o600)?;
    swarmd_certs::write_atomic(&out.join("ca.crt"), r.ca_pem.as_bytes(), 0o600)?;
    let d = out.display();
    let serial = swarmd_certs::CertInfo::parse(&r.certificate_pem).map(|i| i.serial).unwrap_or_default();
    println!("Admin certificate {} (serial {serial}) written to {d} (valid until {}).", r.id, timestamp(r.not_after));
    println!("Use it from any host that reaches a manager:");
    println!("    secretctl --host tcp://MANAGER:4242 --tls-cert {d}/admin.crt --tls-key {d}/admin.key --tls-ca {d}/ca.crt ls");
    println!("Revoke it with `secretctl admin-cert revoke {serial}`.");
    Ok(())
}
