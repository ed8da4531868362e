//! What connections may cost: the budgets of undecoded request bytes, the
//! caps on connections (global, anonymous share, per source, per identity),
//! and the pool that evicts the oldest anonymous connection to make room.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Undecoded request bytes one worker connection may hold (two of the largest
/// requests a node may send).
pub const NODE_CONN_BUDGET: usize = 2 * crate::limits::MAX_NODE_REQUEST;
/// ...and one anonymous connection (two join requests).
pub const ANONYMOUS_CONN_BUDGET: usize = 2 * crate::limits::MAX_CA_REQUEST;
/// Undecoded request bytes all worker connections together may hold...
pub const NODES_BUDGET: usize = 64 << 20;
/// ...and all anonymous ones.
pub const ANONYMOUS_BUDGET: usize = 16 << 20;

/// What a connection may cost, and how long it may stay quiet.
///
/// # Defaults
/// At most [`ConnLimits::global_from_rlimit`] connections in all; of those at
/// most 4,096 (and at most half the global cap) not authenticated by a
/// certificate (joins, handshakes in progress), half of those from one source;
/// 16 per manager or admin identity, 4 per worker identity and a quarter of
/// the global cap for worker identities from one source; a TLS handshake must finish within 10 s and the first
/// HTTP/2 bytes follow within 10 s; a connection that reads nothing for 120 s is
/// closed; an anonymous connection lives at most 60 s.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// Connections open at once, all kinds.
    pub global: usize,
    /// Connections without a client certificate (including those still in
    /// their handshake), from all sources.
    pub unauthenticated: usize,
    /// Connections from one source without a client certificate (including
    /// those still in their handshake).
    pub per_ip_unauthenticated: usize,
    /// Connections of one manager (or admin) certificate's identity.
    pub per_identity: usize,
    /// Connections of one worker certificate's identity (a worker needs one).
    pub per_worker: usize,
    /// Connections with worker certificates from one source: a join token
    /// mints identities, and this keeps one source's from taking every slot.
    pub per_source_workers: usize,
    /// Time allowed for the TLS handshake.
    pub handshake: Duration,
    /// Time allowed between the handshake and the first bytes (the HTTP/2 preface).
    pub preface: Duration,
    /// A connection that reads nothing for this long is closed.
    pub idle: Duration,
    /// Longest life of a connection without a client certificate.
    pub anonymous_lifetime: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        let global = Self::global_from_rlimit();
        // No source may hold more than half the anonymous share: until a
        // handshake ends every connection is anonymous, so one source that
        // held it all would keep certificate holders out too.
        let unauthenticated = (global / 2).min(4096);
        Self {
            global,
            unauthenticated,
            per_ip_unauthenticated: unauthenticated / 2,
            per_identity: 16,
            // Lifted with the node budgets, for benchmarks that make one
            // simulated worker open connections far faster than a real one.
            per_worker: if std::env::var("SWARMD_NODE_RATE_LIMITS").is_ok_and(|v| v == "off") { 16 } else { 4 },
            per_source_workers: (global / 4).max(1),
            handshake: Duration::from_secs(10),
            preface: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            anonymous_lifetime: Duration::from_secs(60),
        }
    }
}

impl ConnLimits {
    /// The open-files limit (raised to its hard maximum first), less 512
    /// descriptors kept for the stores and peers, at most 65,536.
    pub fn global_from_rlimit() -> usize {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => hard,
                Err(_) => soft,
            },
            Ok((soft, _)) => soft,
            Err(_) => 1024,
        };
        (soft.saturating_sub(512) as usize).clamp(64, 65_536)
    }
}

/// Counts per key, with guards that give their unit back on drop.
#[derive(Clone)]
pub(super) struct Counter<K: std::hash::Hash + Eq + Clone>(Arc<Mutex<HashMap<K, usize>>>);

impl<K: std::hash::Hash + Eq + Clone> Default for Counter<K> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

pub(super) struct CountGuard<K: std::hash::Hash + Eq + Clone> {
    counter: Counter<K>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Counter<K> {
    /// One more for `key`, unless it already has `cap`.
    pub(super) fn try_take(&self, key: K, cap: usize) -> Option<CountGuard<K>> {
        let mut m = self.0.lock().expect("connection counter lock");
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(CountGuard { counter: self.clone(), key })
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for CountGuard<K> {
    fn drop(&mut self) {
        let mut m = self.counter.0.lock().expect("connection counter lock");
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// The connections not (yet) authenticated by a certificate, oldest first,
/// within a cap in all and a cap per source. A new one past a cap closes the
/// oldest of its source, or of all: until a handshake ends every connection is
/// anonymous, and a handshake takes milliseconds, so a flood cannot keep a
/// certificate holder out (refusing the newest would).
#[derive(Clone)]
pub(super) struct AnonymousPool {
    inner: Arc<Mutex<AnonymousInner>>,
    cap: usize,
    per_source: usize,
}

#[derive(Default)]
struct AnonymousInner {
    next: u64,
    all: std::collections::BTreeMap<u64, (IpAddr, CancellationToken)>,
    by_source: HashMap<IpAddr, std::collections::BTreeSet<u64>>,
}

impl AnonymousInner {
    fn remove(&mut self, id: u64) -> Option<CancellationToken> {
        let (source, token) = self.all.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(token)
    }
}

/// A connection's place in an [`AnonymousPool`]; given back on drop.
pub(super) struct AnonymousGuard {
    pool: AnonymousPool,
    id: u64,
}

impl Drop for AnonymousGuard {
    fn drop(&mut self) {
        self.pool.inner.lock().expect("anonymous pool lock").remove(self.id);
    }
}

impl AnonymousPool {
    pub(super) fn new(cap: usize, per_source: usize) -> Self {
        Self { inner: Arc::default(), cap: cap.max(1), per_source: per_source.max(1) }
    }

    /// A place for a new connection from `source`, the token that closes it
    /// when it is evicted, and how many older ones it evicted.
    pub(super) fn admit(&self, source: IpAddr) -> (AnonymousGuard, CancellationToken, usize) {
        let mut g = self.inner.lock().expect("anonymous pool lock");
        let mut evicted = 0;
        let oldest_of_source =
            g.by_source.get(&source).filter(|ids| ids.len() >= self.per_source).and_then(|ids| ids.first().copied());
        if let Some(token) = oldest_of_source.and_then(|id| g.remove(id)) {
            token.cancel();
            evicted += 1;
        }
        if g.all.len() >= self.cap {
            if let Some(token) = g.all.first_key_value().map(|(id, _)| *id).and_then(|id| g.remove(id)) {
                token.cancel();
                evicted += 1;
            }
        }
        let id = g.next;
        g.next += 1;
        let token = CancellationToken::new();
        g.all.insert(id, (source, token.clone()));
        g.by_source.entry(source).or_default().insert(id);
        (AnonymousGuard { pool: self.clone(), id }, token, evicted)
    }
}
