//! Accepting connections: TLS handshakes, what a connection may cost, and
//! when it is closed.
//!
//! Every accepted connection is wrapped in a [`Conn`] that carries a
//! [`ConnInfo`] (who is calling, see [`crate::auth`]) and enforces, below
//! HTTP/2:
//!
//! * a **handshake timeout** and an **HTTP/2 preface timeout**: a client that
//!   does not finish TLS, or then sends nothing, is dropped;
//! * an **idle timeout** (nothing read at all; live peers answer the HTTP/2
//!   pings the server sends every 10 s) and a **lifetime for anonymous
//!   connections** (they serve the join RPCs only, which take milliseconds);
//! * **certificate expiry**: a connection is closed when its peer's certificate
//!   expires, and when the deny-list starts to refuse it (removal, demotion,
//!   revocation) — see [`ConnRegistry::close_denied`];
//! * **caps**: a global cap on connections, of which at most a share may be
//!   connections not (yet) authenticated by a certificate (so that nodes and
//!   peers always find room), a cap per source address (IPv4 address, IPv6 /64,
//!   all of loopback) on those, and a cap per node identity. Past the global or
//!   an identity's cap a new connection is closed at once; past an anonymous
//!   cap the oldest anonymous connection (of that source, or of all) is closed
//!   to make room. Connections with a certificate are never disturbed.
//!
//! Connections with a certificate and anonymous ones come out as two streams:
//! they are served by two HTTP/2 servers with different limits (anonymous
//! clients get few streams and small windows: they may only join).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use swarmd_certs::tls::{DenyList, PeerIdentity};
use swarmd_certs::NodeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::auth::{Caller, ConnInfo};
use crate::budget::ConnBudget;

mod caps;
use caps::{AnonymousGuard, AnonymousPool, CountGuard, Counter};
pub use caps::{ConnLimits, ANONYMOUS_BUDGET, ANONYMOUS_CONN_BUDGET, NODES_BUDGET, NODE_CONN_BUDGET};

/// The live connections that carry a certificate, so that they can be closed
/// when the deny-list starts to refuse them.
#[derive(Clone, Default)]
pub struct ConnRegistry {
    conns: Arc<Mutex<HashMap<u64, (PeerIdentity, CancellationToken)>>>,
    next: Arc<AtomicU64>,
}

struct Registered {
    registry: ConnRegistry,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.conns.lock().expect("connection registry lock").remove(&self.id);
    }
}

impl ConnRegistry {
    fn register(&self, peer: PeerIdentity) -> (Registered, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.conns.lock().expect("connection registry lock").insert(id, (peer, token.clone()));
        (Registered { registry: self.clone(), id }, token)
    }

    /// Closes every connection whose certificate `deny` refuses; returns how many.
    pub fn close_denied(&self, deny: &DenyList) -> usize {
        let conns = self.conns.lock().expect("connection registry lock");
        let mut closed = 0;
        for (peer, token) in conns.values() {
            if deny.check(&peer.node_id, &peer.serial).is_some() && !token.is_cancelled() {
                token.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// How many connections with a certificate are open.
    pub fn len(&self) -> usize {
        self.conns.lock().expect("connection registry lock").len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The source a per-address cap counts: an IPv4 address, an IPv6 /64 (one
/// host usually has the whole prefix), or loopback as a whole.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => source_key(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What a connection holds for its life: its share of the caps, its entry in
/// the registry, and the timers that end it.
#[derive(Default)]
struct Watch {
    _global: Option<OwnedSemaphorePermit>,
    _anonymous: Option<AnonymousGuard>,
    _identity: Option<CountGuard<NodeId>>,
    _source_workers: Option<CountGuard<IpAddr>>,
    _registered: Option<Registered>,
    /// Cancelled when the deny-list refuses the peer, or when a newer
    /// anonymous connection evicts this anonymous one.
    closed: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Fires at the peer certificate's NotAfter, or at the end of an
    /// anonymous connection's lifetime.
    end: Option<Pin<Box<Sleep>>>,
    /// Fires when nothing has been read for the current limit.
    idle: Option<(Pin<Box<Sleep>>, Duration)>,
    last_read: Option<Instant>,
    idle_limit: Duration,
}

/// An accepted connection and what we know about its peer.
pub struct Conn<S> {
    io: S,
    info: ConnInfo,
    watch: Watch,
}

fn aborted(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, why)
}

impl<S> Conn<S> {
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        let w = &mut self.watch;
        if let Some(c) = w.closed.as_mut() {
            if c.as_mut().poll(cx).is_ready() {
                return Err(aborted("the peer's certificate is refused by the deny-list"));
            }
        }
        if let Some(e) = w.end.as_mut() {
            if e.as_mut().poll(cx).is_ready() {
                return Err(aborted("the peer's certificate expired, or the connection reached its lifetime"));
            }
        }
        if let Some((sleep, _)) = w.idle.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                // Reads since the timer was set push the deadline out; only a
                // real silence ends the connection.
                match w.last_read {
                    Some(at) if at.elapsed() < w.idle_limit => {
                        sleep.as_mut().reset((at + w.idle_limit).into());
                        let _ = sleep.as_mut().poll(cx);
                    }
                    _ => return Err(aborted("the peer sent nothing for too long")),
                }
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before && self.watch.idle.is_some() {
            let w = &mut self.watch;
            if w.last_read.is_none() {
                // The preface arrived: from now on the idle limit applies.
                if let Some((_, limit)) = &w.idle {
                    w.idle_limit = *limit;
                }
            }
            w.last_read = Some(Instant::now());
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.watch.closed.as_mut().is_some_and(|c| c.as_mut().poll(cx).is_ready()) {
            return Poll::Ready(Err(aborted("the peer's certificate is refused by the deny-list")));
        }
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

/// Logs refused connections at most once a second (a flood must not fill the logs).
#[derive(Default)]
struct RefusalLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RefusalLog {
    fn refused(&self, remote: SocketAddr, why: &str) {
        let mut last = self.last.lock().expect("refusal log lock");
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let more = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(%remote, refused_since_last_report = more, "connection refused: {why}");
    }
}

/// Unix seconds → the `Instant` at which that time is reached.
fn instant_at_unix(secs: i64) -> Instant {
    let now = swarmd_certs::now_unix();
    Instant::now() + Duration::from_secs(secs.saturating_sub(now).max(0) as u64)
}

/// The accepted TLS connections: those with a verified client certificate,
/// and anonymous ones.
pub struct Incoming {
    /// Connections with a node or admin certificate.
    pub authenticated: ReceiverStream<io::Result<Conn<TlsStream<TcpStream>>>>,
    /// Connections without a client certificate (joiners).
    pub anonymous: ReceiverStream<io::Result<Conn<TlsStream<TcpStream>>>>,
}

/// Accepts TCP connections and completes TLS handshakes (each in its own task,
/// so a slow client cannot stall others), with the newest configuration
/// published on `tls`, within `limits`. Handshake failures — including
/// certificates refused by the verifier — are logged and dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    limits: ConnLimits,
    registry: ConnRegistry,
) -> Incoming {
    let (tx, rx) = mpsc::channel(128);
    let (anon_tx, anon_rx) = mpsc::channel(128);
    let global = Arc::new(Semaphore::new(limits.global));
    let anonymous_pool = AnonymousPool::new(limits.unauthenticated, limits.per_ip_unauthenticated);
    let per_identity: Counter<NodeId> = Counter::default();
    let per_source_workers: Counter<IpAddr> = Counter::default();
    let log = Arc::new(RefusalLog::default());
    swarmd_certs::spawn_loop("accept-tcp", async move {
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
            let Ok(permit) = global.clone().try_acquire_owned() else {
                log.refused(remote, "the manager's connection limit is reached");
                continue;
            };
            let (anonymous_guard, evicted, n) = anonymous_pool.admit(source_key(remote.ip()));
            if n > 0 {
                log.refused(remote, "too many unauthenticated connections: the oldest closed");
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.borrow().clone());
            let (tx, anon_tx, limits, per_identity, registry, log) =
                (tx.clone(), anon_tx.clone(), limits.clone(), per_identity.clone(), registry.clone(), log.clone());
            let per_source_workers = per_source_workers.clone();
            tokio::spawn(async move {
                let handshake = tokio::select! {
                    r = tokio::time::timeout(limits.handshake, acceptor.accept(tcp)) => r,
                    _ = evicted.cancelled() => return tracing::debug!(%remote, "evicted during its TLS handshake"),
                };
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "TLS handshake refused"),
                    Err(_) => return tracing::debug!(%remote, "TLS handshake timed out"),
                };
                let mut watch = Watch { _global: Some(permit), ..Default::default() };
                let caller = match stream.get_ref().1.peer_certificates() {
                    Some(chain) => {
                        let Some(id) = PeerIdentity::from_chain(chain) else { return };
                        let worker = id.role == swarmd_certs::Role::Worker;
                        let cap = if worker { limits.per_worker } else { limits.per_identity };
                        let Some(g) = per_identity.try_take(id.node_id.clone(), cap) else {
                            return log.refused(remote, "too many connections with this certificate's identity");
                        };
                        watch._identity = Some(g);
                        if worker {
                            let Some(g) =
                                per_source_workers.try_take(source_key(remote.ip()), limits.per_source_workers)
                            else {
                                return log.refused(remote, "too many worker connections from this address");
                            };
                            watch._source_workers = Some(g);
                        }
                        drop(anonymous_guard);
                        let (registered, token) = registry.register(id.clone());
                        watch._registered = Some(registered);
                        watch.closed = Some(Box::pin(token.cancelled_owned()));
                        watch.end = Some(Box::pin(tokio::time::sleep_until(instant_at_unix(id.not_after).into())));
                        Caller::Node(id)
                    }
                    None => {
                        watch._anonymous = Some(anonymous_guard);
                        watch.closed = Some(Box::pin(evicted.cancelled_owned()));
                        watch.end = Some(Box::pin(tokio::time::sleep(limits.anonymous_lifetime)));
                        Caller::Anonymous
                    }
                };
                watch.idle = Some((Box::pin(tokio::time::sleep(limits.preface)), limits.idle));
                watch.idle_limit = limits.preface;
                let anonymous = matches!(caller, Caller::Anonymous);
                let budget = match &caller {
                    Caller::Node(id) if id.role == swarmd_certs::Role::Worker => {
                        Some(ConnBudget::new(NODE_CONN_BUDGET))
                    }
                    Caller::Anonymous => Some(ConnBudget::new(ANONYMOUS_CONN_BUDGET)),
                    _ => None,
                };
                let conn = Conn { io: stream, info: ConnInfo { caller, remote: Some(remote), budget }, watch };
                let _ = if anonymous { anon_tx.send(Ok(conn)).await } else { tx.send(Ok(conn)).await };
            });
        }
    });
    Incoming { authenticated: ReceiverStream::new(rx), anonymous: ReceiverStream::new(anon_rx) }
}

/// Accepts connections on the local control socket (file permissions decide
/// who may connect; no caps or timers apply).
pub fn unix_incoming(listener: UnixListener) -> ReceiverStream<io::Result<Conn<UnixStream>>> {
    let (tx, rx) = mpsc::channel(16);
    swarmd_certs::spawn_loop("accept-control-socket", async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            match accepted {
                Ok((s, _)) => {
                    let info = ConnInfo { caller: Caller::Local, remote: None, budget: None };
                    let conn = Conn { io: s, info, watch: Watch::default() };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_anonymous_pool_closes_its_oldest_connection_to_make_room() {
        let pool = AnonymousPool::new(3, 2);
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let (_g1, t1, _) = pool.admit(a);
        let (_g2, t2, _) = pool.admit(a);
        // A third from `a` closes `a`'s oldest.
        let (_g3, t3, n) = pool.admit(a);
        assert_eq!(n, 1);
        assert!(t1.is_cancelled() && !t2.is_cancelled());
        let (_g4, t4, _) = pool.admit(b);
        // Full (3): the next from anyone closes the oldest of all.
        let (g5, _t5, n) = pool.admit(b);
        assert_eq!(n, 1);
        assert!(t2.is_cancelled() && !t3.is_cancelled() && !t4.is_cancelled());
        // A connection that leaves gives its place back.
        drop(g5);
        let (_g6, _, n) = pool.admit(b);
        assert_eq!(n, 0);
    }

    #[test]
    fn sources_are_counted_by_address_prefix_and_loopback_as_one() {
        let k = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(k("127.0.0.1"), k("127.0.0.6"));
        assert_ne!(k("10.0.0.1"), k("10.0.0.2"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:10.0.0.1"), k("10.0.0.1"));
    }

    #[test]
    fn counters_cap_per_key_and_give_back_on_drop() {
        let c: Counter<u8> = Counter::default();
        let a = c.try_take(1, 2).unwrap();
        let _b = c.try_take(1, 2).unwrap();
        assert!(c.try_take(1, 2).is_none(), "a third connection past a cap of 2");
        assert!(c.try_take(2, 2).is_some(), "another key has its own cap");
        drop(a);
        assert!(c.try_take(1, 2).is_some(), "a closed connection gives its place back");
    }
}
