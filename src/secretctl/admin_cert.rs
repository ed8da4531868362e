//! `secretctl admin-cert --out DIR [--expiry DUR]`: an operator's client
//! certificate for the control API over mTLS, issued through a manager's
//! control socket (so only someone who may open that socket gets one).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use swarmd_proto::control::IssueAdminCertificateRequest;
use tonic::transport::Channel;

use super::client::explain;
use super::output::timestamp;

/// `admin-cert --out DIR [--expiry DUR]`
#[derive(Args, Debug)]
pub(super) struct AdminCertArgs {
    /// Directory for admin.crt, admin.key and ca.crt (all 0600; the directory is made 0700).
    #[arg(long)]
    out: PathBuf,
    /// Lifetime, e.g. 12h or 7d [default: the cluster's node certificate lifetime; at most 30d].
    #[arg(long, value_parser = swarmd_certs::parse_duration)]
    expiry: Option<std::time::Duration>,
}

pub(super) async fn run(channel: Channel, a: AdminCertArgs) -> anyhow::Result<()> {
    let (key, csr) = swarmd_certs::generate_key_and_csr()?;
    let req = IssueAdminCertificateRequest { csr_pem: csr, validity_secs: a.expiry.map_or(0, |d| d.as_secs()) };
    let r = super::client::control(channel).issue_admin_certificate(req).await.map_err(explain)?.into_inner();
    swarmd_certs::create_private_dir(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    // Every file 0600; an older admin key here is overwritten in place.
    swarmd_certs::replace_secret_file(&a.out.join("admin.key"), key.as_bytes(), 0o600)?;
    swarmd_certs::write_atomic(&a.out.join("admin.crt"), r.certificate_pem.as_bytes(), 0o600)?;
    swarmd_certs::write_atomic(&a.out.join("ca.crt"), r.ca_pem.as_bytes(), 0o600)?;
    let d = a.out.display();
    println!("Admin certificate {} written to {d} (valid until {}).", r.id, timestamp(r.not_after));
    println!("Use it from any host that reaches a manager:");
    println!("    secretctl --host tcp://MANAGER:4242 --tls-cert {d}/admin.crt --tls-key {d}/admin.key --tls-ca {d}/ca.crt ls");
    Ok(())
}
