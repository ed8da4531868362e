//! Dialing managers: tonic channels over our own rustls client configuration.
//!
//! tonic's built-in TLS cannot follow a rotating certificate, so the connector
//! here reads the newest [`ClientConfig`] from a `watch` channel for each new
//! connection. Established HTTP/2 connections keep the configuration they were
//! made with, which is what lets a node swap certificates without dropping its
//! session. The connector tries the known manager addresses in turn, starting
//! with the last one that worked.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::tls::manager_server_name;

const TCP_TIMEOUT: Duration = Duration::from_secs(3);
const TLS_TIMEOUT: Duration = Duration::from_secs(5);

/// The manager addresses a node knows, shared and updatable.
#[derive(Clone, Debug, Default)]
pub struct Remotes {
    addrs: Arc<RwLock<Vec<String>>>,
    preferred: Arc<AtomicUsize>,
}

impl Remotes {
    /// A list of `host:port` addresses.
    pub fn new(addrs: Vec<String>) -> Self {
        Self { addrs: Arc::new(RwLock::new(addrs)), preferred: Arc::default() }
    }
    /// The current addresses.
    pub fn get(&self) -> Vec<String> {
        self.addrs.read().expect("remotes lock").clone()
    }
    /// Replaces the addresses (ignored when empty).
    pub fn set(&self, addrs: Vec<String>) {
        if !addrs.is_empty() {
            *self.addrs.write().expect("remotes lock") = addrs;
        }
    }
}

/// Opens TCP then TLS to one address.
pub async fn tls_connect(addr: &str, cfg: Arc<ClientConfig>) -> io::Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(TCP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{addr}: connect timed out")))?
        .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
    tcp.set_nodelay(true)?;
    tokio::time::timeout(TLS_TIMEOUT, TlsConnector::from(cfg).connect(manager_server_name(), tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{addr}: TLS handshake timed out")))?
        .map_err(|e| io::Error::new(e.kind(), format!("{addr}: TLS: {e}")))
}

/// What a manager says of this node's certificate, asked on a fresh
/// connection (see [`probe_standing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// The manager accepted the certificate and began HTTP/2.
    Accepted,
    /// The manager refused the certificate as revoked: it is on the cluster's
    /// deny-list.
    Revoked,
    /// No answer either way (unreachable, another refusal, a timeout).
    Unknown,
}

/// Whether `e` is the TLS alert `certificate_revoked` received from the peer,
/// found by type.
pub fn is_revoked_alert(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)))
}

/// Connects to `addr` with `cfg` and sends the HTTP/2 preface, to learn what
/// the manager says of the certificate. In TLS 1.3 a client learns that its
/// certificate was refused only after its own handshake ends, from an alert on
/// the first read; HTTP/2 keeps only the text of such an error, so a node that
/// must tell "removed" from "unreachable" asks here, where the alert keeps its
/// type. The alert comes encrypted under keys of a handshake in which `cfg`
/// verified the manager's certificate: it is that manager's word.
pub async fn probe_standing(addr: &str, cfg: Arc<ClientConfig>) -> Standing {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// The client connection preface and an empty SETTINGS frame.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    // An alert during the handshake is not authenticated (anyone on the path
    // can send one): only one after it counts.
    let Ok(mut s) = tls_connect(addr, cfg).await else { return Standing::Unknown };
    let exchange = async {
        s.write_all(PREFACE).await?;
        s.flush().await?;
        let mut buf = [0u8; 64];
        s.read(&mut buf).await
    };
    let standing = match tokio::time::timeout(TLS_TIMEOUT, exchange).await {
        Ok(Ok(n)) if n > 0 => Standing::Accepted,
        Ok(Err(e)) if is_revoked_alert(&e) => Standing::Revoked,
        _ => Standing::Unknown,
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), s.shutdown()).await;
    standing
}

async fn connect_any(remotes: &Remotes, cfg: Arc<ClientConfig>) -> io::Result<TlsStream<TcpStream>> {
    let addrs = remotes.get();
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no manager address known"));
    }
    let start = remotes.preferred.load(Ordering::Relaxed);
    let mut errors = Vec::new();
    for k in 0..addrs.len() {
        let i = (start + k) % addrs.len();
        match tls_connect(&addrs[i], cfg.clone()).await {
            Ok(s) => {
                remotes.preferred.store(i, Ordering::Relaxed);
                return Ok(s);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(io::Error::new(io::ErrorKind::ConnectionRefused, errors.join("; ")))
}

fn endpoint() -> Endpoint {
    Endpoint::from_static("http://swarm-manager")
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
}

/// A channel that connects on first use (and reconnects after failures) to any
/// of `remotes`, with the newest configuration from `tls`.
pub fn lazy_channel(remotes: Remotes, tls: watch::Receiver<Arc<ClientConfig>>) -> Channel {
    endpoint().connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
        let remotes = remotes.clone();
        let cfg = tls.borrow().clone();
        async move { connect_any(&remotes, cfg).await.map(TokioIo::new) }
    }))
}

/// A channel to one address with a fixed configuration, connected now so that
/// errors surface here.
pub async fn connect(addr: &str, cfg: Arc<ClientConfig>) -> io::Result<Channel> {
    let addr = addr.to_owned();
    let stream = tls_connect(&addr, cfg.clone()).await?;
    let slot = Arc::new(std::sync::Mutex::new(Some(stream)));
    endpoint()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let first = slot.lock().expect("slot lock").take();
            let addr = addr.clone();
            let cfg = cfg.clone();
            async move {
                match first {
                    Some(s) => Ok(TokioIo::new(s)),
                    None => tls_connect(&addr, cfg).await.map(TokioIo::new),
                }
            }
        }))
        .await
        .map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stranger on a manager's address (or on the path) answers every
    /// ClientHello with a plaintext `certificate_revoked` alert: that must not
    /// count as the cluster's word (it would wipe workers and demote managers).
    #[tokio::test]
    async fn invariant_7_an_unauthenticated_revoked_alert_is_not_a_removal() {
        crate::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut hello = [0u8; 2048];
                let _ = tcp.read(&mut hello).await;
                // TLS record: alert, TLS 1.2, length 2, fatal, certificate_revoked (44).
                let _ = tcp.write_all(&[21, 3, 3, 0, 2, 2, 44]).await;
            }
        });
        let ca = crate::RootCa::generate(&crate::ClusterId::random()).unwrap();
        let cfg = Arc::new(crate::tls::anonymous_client_config(ca.cert_pem()).unwrap());
        let err = tls_connect(&addr, cfg.clone()).await.expect_err("no TLS with a stranger");
        assert!(err.to_string().contains("CertificateRevoked"), "the stranger's alert arrived: {err}");
        assert_eq!(probe_standing(&addr, cfg).await, Standing::Unknown);
    }
}
