//! What one node may cost the managers (invariant 12): per-node token buckets
//! for the RPCs a worker certificate can call, and the caps on what one
//! request may carry.
//!
//! A worker is a potential attacker. Each of its RPCs either costs nothing
//! durable (heartbeats, in memory) or is bounded here: task reports and
//! renewals become raft entries on every manager's disk, task output lives in
//! the memory of the manager holding the session, workload identities cost a
//! signature each. Past its budget a node gets
//! RESOURCE_EXHAUSTED with a retry hint, and nothing is written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use swarmd_certs::NodeId;
use tonic::Status;

/// Task status updates one request may carry.
pub const MAX_UPDATES_PER_REQUEST: usize = 64;
/// Bytes of a task status message kept (longer ones are cut).
pub const MAX_STATUS_MESSAGE: usize = 1024;
/// Output lines one `PushLogs` request may carry.
pub const MAX_LOG_LINES_PER_REQUEST: usize = 1000;
/// Bytes of one output line kept (longer ones are cut).
pub const MAX_LOG_LINE: usize = 4096;
/// Largest request a node may send the dispatcher (a worker pushes output in
/// requests of at most 256 KiB).
pub const MAX_NODE_REQUEST: usize = 512 << 10;
/// Largest request to the CA, which anonymous joiners reach (a CSR is at most
/// 16 KiB; a token and a hostname are short).
pub const MAX_CA_REQUEST: usize = 32 << 10;

/// Joins a manager works on at once, and (apart) renewals: past either,
/// RESOURCE_EXHAUSTED. Apart, so that a storm of joins (a token holder can
/// make one) never keeps the cluster's nodes from renewing.
pub const CA_IN_FLIGHT: usize = 256;

/// RESOURCE_EXHAUSTED with `message`, and `wait` in the `retry-after-ms` metadata.
pub fn retry_after(message: String, wait: Duration) -> Status {
    let mut s = Status::resource_exhausted(message);
    if let Ok(v) = wait.as_millis().to_string().parse() {
        s.metadata_mut().insert(swarmd_proto::RETRY_AFTER_METADATA, v);
    }
    s
}

/// Certificate work on this manager (issue 13): at most [`CA_IN_FLIGHT`]
/// joins and as many renewals at once, past which callers are told when to come back
/// (a random 250–1,000 ms, so a storm spreads out), and CSR checks and
/// signatures on a pool of blocking threads, one per core, so that a storm of
/// them never occupies the async workers that serve sessions.
#[derive(Clone)]
pub struct CaWork {
    joins: Arc<tokio::sync::Semaphore>,
    renewals: Arc<tokio::sync::Semaphore>,
    signers: Arc<tokio::sync::Semaphore>,
}

/// What a caller of the CA asks for.
#[derive(Clone, Copy, Debug)]
pub enum CaRequest {
    /// A join with a token.
    Join,
    /// A node's renewal.
    Renewal,
}

impl Default for CaWork {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        Self {
            joins: Arc::new(tokio::sync::Semaphore::new(CA_IN_FLIGHT)),
            renewals: Arc::new(tokio::sync::Semaphore::new(CA_IN_FLIGHT)),
            signers: Arc::new(tokio::sync::Semaphore::new(cores)),
        }
    }
}

impl CaWork {
    /// A place for one join or renewal, held until it is answered.
    pub fn admit(&self, what: CaRequest) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let (places, name) = match what {
            CaRequest::Join => (&self.joins, "joins"),
            CaRequest::Renewal => (&self.renewals, "renewals"),
        };
        places.clone().try_acquire_owned().map_err(|_| {
            let wait = Duration::from_millis(250 + rand::random::<u64>() % 750);
            retry_after(format!("too many {name} in progress: retry in {} ms", wait.as_millis()), wait)
        })
    }

    /// Runs `f` (a CSR check and signature) on the signing pool.
    pub async fn sign<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
        let _signer = self.signers.acquire().await.map_err(|_| Status::unavailable("shutting down"))?;
        tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("signing failed: {e}")))
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The refill rate and size of one kind of bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Most tokens held.
    pub burst: f64,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self { tokens: rate.burst, at: now }
    }

    /// Takes `cost` tokens if there are that many; otherwise how long until there are.
    pub fn take(&mut self, rate: Rate, cost: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        self.at = now;
        if self.tokens >= cost {
            self.tokens -= cost;
            Ok(())
        } else {
            let missing = cost.min(rate.burst) - self.tokens;
            Err(Duration::from_secs_f64((missing / rate.per_sec).max(0.001)))
        }
    }
}

/// The budgets of one node.
#[derive(Clone, Copy, Debug)]
struct NodeBudget {
    status_updates: Bucket,
    log_bytes: Bucket,
    renewals: Bucket,
    sessions: Bucket,
    heartbeats: Bucket,
    identities: Bucket,
    seen: Instant,
}

/// Which budget an RPC spends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spend {
    /// Task status updates (raft entries): 20 a second, bursts of 200.
    StatusUpdates,
    /// Task output bytes (manager memory and CPU): 4 MiB a second, bursts of 16 MiB.
    LogBytes,
    /// Certificate renewals (a signature and a raft entry each): one per 5 s, bursts of 5.
    Renewals,
    /// Session opens: one a second, bursts of 10.
    Sessions,
    /// Heartbeats: 20 a second, bursts of 100.
    Heartbeats,
    /// Workload identities (a CSR check and a signature each, no raft entry):
    /// 5 a second, bursts of 100 (a worker starting many tasks at once).
    Identities,
}

impl Spend {
    fn rate(self) -> Rate {
        match self {
            Spend::StatusUpdates => Rate { per_sec: 20.0, burst: 200.0 },
            Spend::LogBytes => Rate { per_sec: 4.0 * 1048576.0, burst: 16.0 * 1048576.0 },
            Spend::Renewals => Rate { per_sec: 0.2, burst: 5.0 },
            Spend::Sessions => Rate { per_sec: 1.0, burst: 10.0 },
            Spend::Heartbeats => Rate { per_sec: 20.0, burst: 100.0 },
            Spend::Identities => Rate { per_sec: 5.0, burst: 100.0 },
        }
    }
    fn what(self) -> &'static str {
        match self {
            Spend::StatusUpdates => "task status updates",
            Spend::LogBytes => "task output",
            Spend::Renewals => "certificate renewals",
            Spend::Sessions => "session opens",
            Spend::Heartbeats => "heartbeats",
            Spend::Identities => "workload identities",
        }
    }
}

/// Per-node budgets, shared by the dispatcher and the CA service.
#[derive(Clone)]
pub struct NodeLimits {
    budgets: Arc<Mutex<HashMap<NodeId, NodeBudget>>>,
    enabled: bool,
}

impl Default for NodeLimits {
    fn default() -> Self {
        Self { budgets: Arc::default(), enabled: true }
    }
}

impl NodeLimits {
    /// The budgets, unless `SWARMD_NODE_RATE_LIMITS=off` (for benchmarks that
    /// drive one simulated node far beyond what a real one does; logged loudly).
    pub fn from_env() -> Self {
        let off = std::env::var("SWARMD_NODE_RATE_LIMITS").is_ok_and(|v| v == "off");
        if off {
            tracing::warn!("SWARMD_NODE_RATE_LIMITS=off: nodes' RPCs are not rate-limited (benchmarks only)");
        }
        Self { budgets: Arc::default(), enabled: !off }
    }

    /// Spends `cost` of `node`'s `what` budget, or RESOURCE_EXHAUSTED saying
    /// when to retry (also in the `retry-after-ms` metadata).
    pub fn spend(&self, node: &NodeId, what: Spend, cost: f64) -> Result<(), Status> {
        if !self.enabled {
            return Ok(());
        }
        let now = Instant::now();
        let mut m = self.budgets.lock().expect("node limits lock");
        let b = m.entry(node.clone()).or_insert_with(|| NodeBudget {
            status_updates: Bucket::full(Spend::StatusUpdates.rate(), now),
            log_bytes: Bucket::full(Spend::LogBytes.rate(), now),
            renewals: Bucket::full(Spend::Renewals.rate(), now),
            sessions: Bucket::full(Spend::Sessions.rate(), now),
            heartbeats: Bucket::full(Spend::Heartbeats.rate(), now),
            identities: Bucket::full(Spend::Identities.rate(), now),
            seen: now,
        });
        b.seen = now;
        let bucket = match what {
            Spend::StatusUpdates => &mut b.status_updates,
            Spend::LogBytes => &mut b.log_bytes,
            Spend::Renewals => &mut b.renewals,
            Spend::Sessions => &mut b.sessions,
            Spend::Heartbeats => &mut b.heartbeats,
            Spend::Identities => &mut b.identities,
        };
        bucket.take(what.rate(), cost, now).map_err(|wait| {
            retry_after(
                format!("node {node} is over its budget of {}: retry in {} ms", what.what(), wait.as_millis()),
                wait,
            )
        })
    }

    /// Forgets nodes not heard from for `idle` (their buckets would be full again).
    pub fn prune(&self, idle: Duration) {
        let now = Instant::now();
        self.budgets.lock().expect("node limits lock").retain(|_, b| now.duration_since(b.seen) < idle);
    }
}

/// Joins one manager takes: per source (an IPv4 address, an IPv6 /64,
/// loopback as a whole) 20 a second in bursts of 500, and 200 a second in
/// bursts of 2,000 from all sources. A join token mints identities, each a
/// node record and a set of budgets of its own: this bounds how fast.
#[derive(Clone)]
pub struct JoinLimits {
    buckets: Arc<Mutex<(Bucket, HashMap<std::net::IpAddr, Bucket>)>>,
    enabled: bool,
}

const JOINS_PER_SOURCE: Rate = Rate { per_sec: 20.0, burst: 500.0 };
const JOINS: Rate = Rate { per_sec: 200.0, burst: 2000.0 };

impl JoinLimits {
    /// The limits (lifted, like the node budgets, by `SWARMD_NODE_RATE_LIMITS=off`).
    pub fn from_env() -> Self {
        let off = std::env::var("SWARMD_NODE_RATE_LIMITS").is_ok_and(|v| v == "off");
        Self { buckets: Arc::new(Mutex::new((Bucket::full(JOINS, Instant::now()), HashMap::new()))), enabled: !off }
    }

    /// Spends one join from `source`, or RESOURCE_EXHAUSTED with `retry-after-ms`.
    pub fn spend(&self, source: std::net::IpAddr) -> Result<(), Status> {
        if !self.enabled {
            return Ok(());
        }
        let now = Instant::now();
        let mut g = self.buckets.lock().expect("join limits lock");
        let (global, per_source) = &mut *g;
        if per_source.len() > 100_000 {
            per_source.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(600));
        }
        let local = per_source.entry(source).or_insert_with(|| Bucket::full(JOINS_PER_SOURCE, now));
        let refused = |wait: Duration| retry_after(format!("too many joins: retry in {} ms", wait.as_millis()), wait);
        local.take(JOINS_PER_SOURCE, 1.0, now).map_err(refused)?;
        global.take(JOINS, 1.0, now).map_err(refused)
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invariant_12_joins_are_bounded_per_source_and_in_all() {
        let work = CaWork::default();
        let held: Vec<_> = (0..CA_IN_FLIGHT).map(|_| work.admit(CaRequest::Join).unwrap()).collect();
        let refused = work.admit(CaRequest::Join).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.metadata().get("retry-after-ms").is_some());
        // Joins filling their places leave renewals theirs.
        let _renewal = work.admit(CaRequest::Renewal).unwrap();
        drop(held);
        let _join = work.admit(CaRequest::Join).unwrap();

        let joins = JoinLimits { enabled: true, ..JoinLimits::from_env() };
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..500 {
            joins.spend(a).unwrap();
        }
        let refused = joins.spend(a).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let ms: u64 = refused.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
        assert!((1..=1000).contains(&ms), "retry after {ms} ms");
        // Other sources still join, until the budget of all sources is spent.
        for i in 0..1500 {
            joins.spend(std::net::IpAddr::from([10, 1, (i / 200) as u8, (i % 200) as u8])).unwrap();
        }
        // (The budget refills at 200 a second while this runs: a few more pass.)
        let refused = (0..50u8).find_map(|i| joins.spend(std::net::IpAddr::from([10, 2, 0, i])).err());
        assert_eq!(refused.expect("joins past the budget of all sources").code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate { per_sec: 2.0, burst: 3.0 };
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        for _ in 0..3 {
            b.take(rate, 1.0, t0).unwrap();
        }
        let wait = b.take(rate, 1.0, t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        b.take(rate, 1.0, t0 + Duration::from_millis(500)).unwrap();
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            b.take(rate, 1.0, later).unwrap();
        }
        assert!(b.take(rate, 1.0, later).is_err());
    }

    #[test]
    fn node_budgets_are_per_node_and_say_when_to_retry() {
        let l = NodeLimits::default();
        let (a, b) = (NodeId::random(), NodeId::random());
        for _ in 0..5 {
            l.spend(&a, Spend::Renewals, 1.0).unwrap();
        }
        let s = l.spend(&a, Spend::Renewals, 1.0).unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.metadata().get("retry-after-ms").is_some());
        l.spend(&b, Spend::Renewals, 1.0).unwrap();
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
