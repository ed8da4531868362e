//! etcd as a peer, measured in the same run: three etcd members (Debian's
//! `etcd-server`) on 127.0.0.1 with their own data dirs (the WAL is fsynced on
//! every commit, as ours), 64-byte puts from a Rust gRPC client.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use swarmd_proto::etcdserverpb::kv_client::KvClient;
use swarmd_proto::etcdserverpb::PutRequest;
use tonic::transport::{Channel, Endpoint};

/// Three running members; killed on drop.
pub struct Etcd {
    members: Vec<Child>,
    /// Client URLs.
    pub clients: Vec<String>,
    _dir: tempfile::TempDir,
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
        for i in 0..3 {
            let child = Command::new("etcd")
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("e{i}")))
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", peers[i])])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", peers[i])])
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", clients[i])])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", clients[i])])
                .args(["--initial-cluster", &cluster.join(",")])
                .args(["--initial-cluster-state", "new", "--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            members.push(child);
        }
        let me =
            Self { members, clients: clients.iter().map(|p| format!("http://127.0.0.1:{p}")).collect(), _dir: dir };
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
