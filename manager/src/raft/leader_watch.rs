//! Faster failover: followers watch the leader's port.
//!
//! openraft 0.9 lets a follower refuse votes until `election_timeout_max`
//! after the last heartbeat it received (its leader lease). With the default
//! timers (500–1000 ms), the first follower to time out is usually refused and
//! then waits another random timeout, so a dead leader is replaced after
//! 1.5–2 s. Here each follower checks every 100 ms that the leader still
//! accepts TCP connections; once it has not for longer than the lease, the
//! follower starts an election at once (after a random 0–100 ms, so two
//! followers rarely split the vote). A live but slow leader keeps accepting
//! connections and is never challenged by this.
//!
//! Nor is a leader whose appends still arrive: a port that takes no new
//! connections is not a dead leader. Under a join storm the leader's accept
//! queue overflows and new connections time out, while raft travels on
//! connections opened long before (seen in CI: both followers called an
//! election against a leader that was heartbeating them).

use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Raft, RaftSettings};
use crate::auth::LeaderContact;

const PROBE_EVERY: Duration = Duration::from_millis(100);

/// Runs until cancelled.
pub async fn run(raft: Raft, settings: RaftSettings, contact: LeaderContact, shutdown: CancellationToken) {
    let lease = settings.election_max + PROBE_EVERY;
    let mut last_ok = Instant::now();
    let mut watched = None;
    let mut last_trigger: Option<Instant> = None;
    let mut interval = tokio::time::interval(PROBE_EVERY);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let m = raft.metrics().borrow().clone();
        let leader = m.current_leader.filter(|l| *l != m.id);
        let addr = leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()));
        let (true, Some(leader), Some(addr)) = (m.state == ServerState::Follower, leader, addr) else {
            last_ok = Instant::now();
            watched = None;
            continue;
        };
        if watched != Some(leader) {
            watched = Some(leader);
            last_ok = Instant::now();
        }
        let up = contact.within(lease)
            || matches!(tokio::time::timeout(PROBE_EVERY, TcpStream::connect(&addr)).await, Ok(Ok(_)));
        let now = Instant::now();
        if up {
            last_ok = now;
            continue;
        }
        let recently = last_trigger.is_some_and(|t| now.duration_since(t) < settings.election_min);
        if now.duration_since(last_ok) > lease && !recently {
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 100)).await;
            tracing::info!(
                leader = format!("{leader:016x}"),
                "leader unreachable past its lease: starting an election"
            );
            last_trigger = Some(Instant::now());
            let _ = raft.trigger().elect().await;
        }
    }
}
