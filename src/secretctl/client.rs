//! Connecting to the control API and turning gRPC errors into sentences.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use hyper_util::rt::TokioIo;
use swarmd_certs::NodeIdentity;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Where the control API is.
#[derive(Debug)]
pub enum Host {
    /// The manager's local socket.
    Unix(PathBuf),
    /// A manager's mTLS port, with an administrator certificate.
    Tcp { addr: String, identity: Box<NodeIdentity> },
}

impl Host {
    /// Parses `--host` and the TLS options.
    pub fn parse(host: &str, cert: Option<PathBuf>, key: Option<PathBuf>, ca: Option<PathBuf>) -> anyhow::Result<Self> {
        if let Some(path) = host.strip_prefix("unix://") {
            return Ok(Host::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = host.strip_prefix("tcp://") {
            let (Some(cert), Some(key), Some(ca)) = (cert, key, ca) else {
                bail!("--host tcp://… needs --tls-cert, --tls-key and --tls-ca");
            };
            let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
            let identity = NodeIdentity::new(read(&ca)?, read(&cert)?, zeroize::Zeroizing::new(read(&key)?))
                .context("unusable TLS client certificate")?;
            return Ok(Host::Tcp { addr: addr.to_owned(), identity: Box::new(identity) });
        }
        bail!("invalid --host {host:?}: use unix:///PATH or tcp://HOST:PORT")
    }
}

/// Connects to the control API.
pub async fn connect(host: &Host) -> anyhow::Result<Channel> {
    match host {
        Host::Unix(path) => {
            let p = path.clone();
            Endpoint::from_static("http://control.sock")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let p = p.clone();
                    async move { UnixStream::connect(p).await.map(TokioIo::new) }
                }))
                .await
                .map_err(|e| {
                    anyhow!(
                        "cannot connect to the control socket {}: {} (is a manager running there, and may you open it? set --host or SWARMD_HOST)",
                        path.display(),
                        std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string())
                    )
                })
        }
        Host::Tcp { addr, identity } => {
            let cfg = swarmd_certs::tls::client_config(identity)?;
            swarmd_certs::dial::connect(addr, Arc::new(cfg))
                .await
                .map_err(|e| anyhow!("cannot connect to the manager at {addr}: {e}"))
        }
    }
}

/// A one-line explanation of a failed RPC. (A TLS refusal of our certificate
/// arrives as UNAVAILABLE whose text names the alert: HTTP/2 keeps no more of
/// it, so it is shown as it is rather than guessed from its words.)
pub fn explain(s: tonic::Status) -> anyhow::Error {
    use tonic::Code::*;
    match s.code() {
        PermissionDenied | Unauthenticated => anyhow!("access denied: {}", s.message()),
        _ => anyhow!("{}", s.message()),
    }
}

/// A control API client. Listings of large clusters (labels, later secrets'
/// metadata) exceed tonic's default 4 MiB response limit.
pub fn control(channel: Channel) -> swarmd_proto::control::control_client::ControlClient<Channel> {
    swarmd_proto::control::control_client::ControlClient::new(channel).max_decoding_message_size(256 << 20)
}
