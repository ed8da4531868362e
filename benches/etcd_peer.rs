//! etcd as a peer, measured in the same run: three etcd members (Debian's
//! `etcd-server`) on 127.0.0.1 with their own data dirs (the WAL is fsynced on
//! every commit, as ours), 64-byte puts from a Rust gRPC client.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use swarmd_proto::etcdserverpb::kv_client::KvClient;
use swarmd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use swarmd_proto::etcdserverpb::{PutRequest, StatusRequest};
use tonic::transport::{Channel, Endpoint};

/// Three running members; killed on drop.
pub struct Etcd {
    members: Vec<Child>,
    /// Each member's command line, to restart it after a kill.
    args: Vec<Vec<String>>,
    /// Client URLs.
    pub clients: Vec<String>,
    _dir: tempfile::TempDir,
}

fn spawn(args: &[String]) -> Option<Child> {
    Command::new("etcd").args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// Starts three members, or `None` without an `etcd` binary. As root on a
    /// Debian-like machine, a missing etcd is installed from Debian's packages.
    pub async fn start() -> Option<Self> {
        if Command::new("etcd").arg("--version").output().is_err() {
            eprintln!("installing etcd-server from Debian's packages for the etcd peer");
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "etcd-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status();
        }
        Command::new("etcd").arg("--version").output().ok()?;
        let dir = tempfile::tempdir().ok()?;
        let peers: Vec<u16> = (0..3).map(|_| port()).collect();
        let clients: Vec<u16> = (0..3).map(|_| port()).collect();
        let cluster: Vec<String> =
            peers.iter().enumerate().map(|(i, p)| format!("e{i}=http://127.0.0.1:{p}")).collect();
        let mut members = Vec::new();
        let mut all_args = Vec::new();
        for i in 0..3 {
            // etcd's defaults otherwise: heartbeat 100 ms, election timeout 1000 ms.
            let args: Vec<String> = [
                "--name".to_owned(),
                format!("e{i}"),
                "--data-dir".to_owned(),
                dir.path().join(format!("e{i}")).display().to_string(),
                "--listen-peer-urls".to_owned(),
                format!("http://127.0.0.1:{}", peers[i]),
                "--initial-advertise-peer-urls".to_owned(),
                format!("http://127.0.0.1:{}", peers[i]),
                "--listen-client-urls".to_owned(),
                format!("http://127.0.0.1:{}", clients[i]),
                "--advertise-client-urls".to_owned(),
                format!("http://127.0.0.1:{}", clients[i]),
                "--initial-cluster".to_owned(),
                cluster.join(","),
                "--initial-cluster-state".to_owned(),
                "new".to_owned(),
                "--log-level".to_owned(),
                "error".to_owned(),
            ]
            .into();
            members.push(spawn(&args)?);
            all_args.push(args);
        }
        let me = Self {
            members,
            args: all_args,
            clients: clients.iter().map(|p| format!("http://127.0.0.1:{p}")).collect(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(ch) = me.channel(0).await {
                if put(&ch, b"warmup", &[0u8; 64]).await.is_ok() {
                    return Some(me);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A channel to member `i`.
    pub async fn channel(&self, i: usize) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(self.clients[i].clone())?.connect().await
    }

    /// The index of the member that leads, as the members themselves report it.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.clients.len() {
            let Ok(ch) = self.channel(i).await else { continue };
            let mut client = MaintenanceClient::new(ch);
            let call = client.status(StatusRequest {});
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), call).await {
                let s = s.into_inner();
                if s.leader != 0 && s.header.is_some_and(|h| h.member_id == s.leader) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// One failover trial: kill -9 the leader, then put through the other members
    /// (each attempt with a `timeout`) until one succeeds; returns that time.
    /// The killed member is restarted and the cluster has a leader again on return.
    pub async fn failover(&mut self, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            if let Some(l) = self.leader().await {
                break l;
            }
            if Instant::now() > deadline {
                return Err("etcd has no leader".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut survivors = Vec::new();
        for i in (0..self.members.len()).filter(|i| *i != leader) {
            survivors.push(self.channel(i).await.map_err(|e| e.to_string())?);
        }
        let _ = self.members[leader].kill();
        let killed = Instant::now();
        let _ = self.members[leader].wait();
        let mut k = 0usize;
        let took = loop {
            let attempt = tokio::time::timeout(timeout, put(&survivors[k % survivors.len()], b"failover", &[0u8; 64]));
            if matches!(attempt.await, Ok(Ok(()))) {
                break killed.elapsed();
            }
            if killed.elapsed() > Duration::from_secs(30) {
                return Err("no etcd write within 30 s of the kill".into());
            }
            k += 1;
        };
        self.members[leader] = spawn(&self.args[leader]).ok_or("cannot restart the etcd member")?;
        // Back to three members, all answering, before the next trial.
        loop {
            let mut up = 0;
            for i in 0..self.members.len() {
                if let Ok(ch) = self.channel(i).await {
                    let mut client = MaintenanceClient::new(ch);
                    let call = client.status(StatusRequest {});
                    if matches!(tokio::time::timeout(Duration::from_millis(500), call).await, Ok(Ok(s)) if s.get_ref().leader != 0)
                    {
                        up += 1;
                    }
                }
            }
            if up == self.members.len() {
                return Ok(took);
            }
            if Instant::now() > deadline + Duration::from_secs(30) {
                return Err("the restarted etcd member did not rejoin".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One put.
pub async fn put(ch: &Channel, key: &[u8], value: &[u8]) -> Result<(), tonic::Status> {
    let req = PutRequest { key: key.to_vec(), value: value.to_vec(), ..Default::default() };
    KvClient::new(ch.clone()).put(req).await.map(|_| ())
}

/// Sequential put latencies (through member 0, forwarded to the leader as needed), sorted.
pub async fn sequential(e: &Etcd, n: usize, bytes: usize) -> Result<Vec<Duration>, String> {
    let ch = e.channel(0).await.map_err(|x| x.to_string())?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        put(&ch, format!("seq-{i}").as_bytes(), &vec![b'x'; bytes]).await.map_err(|x| x.to_string())?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok(lat)
}

/// Puts per second with `clients` concurrent clients (own connections) for `secs`.
pub async fn throughput(e: &Etcd, clients: usize, secs: u64, bytes: usize) -> Result<f64, String> {
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let ch = e.channel(0).await.map_err(|x| x.to_string())?;
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < stop {
                put(&ch, format!("c{clients}-{c}-{n}").as_bytes(), &vec![b'x'; bytes])
                    .await
                    .map_err(|x| x.to_string())?;
                n += 1;
            }
            Ok::<usize, String>(n)
        }));
    }
    let t = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await.map_err(|x| x.to_string())??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}
