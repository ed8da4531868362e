//! Who is calling, and may they.
//!
//! Every accepted connection is wrapped in a [`Conn`] that carries a
//! [`ConnInfo`]: `Local` for the unix control socket (file permissions already
//! decided), `Anonymous` for a TLS client without a certificate, or `Node` with
//! the identity read from its verified certificate. tonic puts it into each
//! request's extensions, and every RPC handler asks the [`Authorizer`] before
//! doing anything. The role always comes from the certificate, never from a
//! request field. Only `GetRootCa` and `IssueNodeCertificate` skip the check.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use swarmd_certs::tls::{DenyList, PeerIdentity};
use swarmd_certs::{ClusterId, Role};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Status};

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The local control socket.
    Local,
    /// TLS without a client certificate.
    Anonymous,
    /// TLS with a verified node certificate.
    Node(PeerIdentity),
}

/// Per-connection information, visible to every request on it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The caller.
    pub caller: Caller,
    /// The remote socket address (TCP only).
    pub remote: Option<SocketAddr>,
}

/// An accepted connection and what we know about its peer.
pub struct Conn<S> {
    io: S,
    info: ConnInfo,
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<S> Connected for Conn<S> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and completes TLS handshakes (each in its own task,
/// so a slow client cannot stall others), with the newest configuration
/// published on `tls`. Handshake failures — including certificates refused by
/// the verifier — are logged and dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
) -> ReceiverStream<io::Result<Conn<TlsStream<TcpStream>>>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let caller = match stream.get_ref().1.peer_certificates() {
                            Some(chain) => match PeerIdentity::from_chain(chain) {
                                Some(id) => Caller::Node(id),
                                None => return,
                            },
                            None => Caller::Anonymous,
                        };
                        let conn = Conn { io: stream, info: ConnInfo { caller, remote: Some(remote) } };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts connections on the local control socket.
pub fn unix_incoming(listener: UnixListener) -> ReceiverStream<io::Result<Conn<UnixStream>>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            match accepted {
                Ok((s, _)) => {
                    let conn = Conn { io: s, info: ConnInfo { caller: Caller::Local, remote: None } };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Decides per RPC whether the caller may proceed.
#[derive(Clone, Debug)]
pub struct Authorizer {
    cluster_id: ClusterId,
    deny: DenyList,
}

impl Authorizer {
    /// Checks callers against this cluster and deny-list.
    pub fn new(cluster_id: ClusterId, deny: DenyList) -> Self {
        Self { cluster_id, deny }
    }

    /// The connection information of a request.
    pub fn info<T>(req: &Request<T>) -> ConnInfo {
        req.extensions().get::<ConnInfo>().cloned().unwrap_or(ConnInfo { caller: Caller::Anonymous, remote: None })
    }

    /// Requires a node certificate with one of `roles`; returns its identity.
    ///
    /// UNAUTHENTICATED without a certificate, PERMISSION_DENIED for another role,
    /// another cluster, a removed node or the local socket.
    pub fn require<T>(&self, req: &Request<T>, roles: &[Role]) -> Result<PeerIdentity, Status> {
        match Self::info(req).caller {
            Caller::Anonymous => Err(Status::unauthenticated("this RPC requires a node certificate (mutual TLS)")),
            Caller::Local => Err(Status::permission_denied("this RPC is for cluster nodes, not the control socket")),
            Caller::Node(id) => {
                if id.cluster_id != self.cluster_id {
                    return Err(Status::permission_denied("certificate belongs to another cluster"));
                }
                if self.deny.contains(&id.node_id) {
                    return Err(Status::permission_denied(format!("node {} was removed from the cluster", id.node_id)));
                }
                if !roles.contains(&id.role) {
                    return Err(Status::permission_denied(format!("a {} certificate cannot call this RPC", id.role)));
                }
                Ok(id)
            }
        }
    }

    /// Requires an administrator: the local control socket, an admin
    /// certificate, or a manager certificate (managers forward to each other).
    pub fn require_admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match Self::info(req).caller {
            Caller::Local => Ok(()),
            Caller::Anonymous => Err(Status::unauthenticated(
                "the control API requires the local socket or an administrator certificate",
            )),
            Caller::Node(_) => self
                .require(req, &[Role::Manager, Role::Admin])
                .map(|_| ())
                .map_err(|s| Status::permission_denied(format!("control API: {}", s.message()))),
        }
    }
}
