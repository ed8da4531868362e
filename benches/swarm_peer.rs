//! Docker Swarm as a peer, measured in the same run: secrets created through
//! this machine's Docker Engine in swarm mode (single manager), over the
//! Engine API on its unix socket, from an in-process client.
//!
//! The harness puts the engine in swarm mode only if it is not already, and
//! then leaves swarm mode again (`docker swarm leave --force`) at the end,
//! removing the `docker_gwbridge` network swarm mode made.

use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const SOCK: &str = "/var/run/docker.sock";

/// One HTTP/1.1 keep-alive connection to the Engine API.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect() -> Result<Self, String> {
        let stream = tokio::net::UnixStream::connect(SOCK).await.map_err(|e| format!("{SOCK}: {e}"))?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    /// `docker secret create NAME` with `data`.
    pub async fn create_secret(&mut self, name: &str, data: &[u8]) -> Result<(), String> {
        let body =
            format!(r#"{{"Name":"{name}","Data":"{}"}}"#, base64::engine::general_purpose::STANDARD.encode(data));
        let req = hyper::Request::post("/v1.41/secrets/create")
            .header("Host", "docker")
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let resp = self.sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if status.as_u16() == 201 {
            Ok(())
        } else {
            Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)))
        }
    }
}

/// Swarm mode for the duration of the measurement.
pub struct SwarmMode {
    joined_by_us: bool,
    /// Swarm mode creates the `docker_gwbridge` network and leaving keeps it.
    gwbridge_by_us: bool,
}

fn gwbridge_exists() -> bool {
    std::process::Command::new("docker")
        .args(["network", "inspect", "docker_gwbridge"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl SwarmMode {
    /// Enters swarm mode unless the engine is in it already; `None` if there is no engine.
    pub fn enter() -> Option<Self> {
        let state = std::process::Command::new("docker")
            .args(["info", "--format", "{{.Swarm.LocalNodeState}}"])
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        if state == "active" {
            return Some(Self { joined_by_us: false, gwbridge_by_us: false });
        }
        let gwbridge_by_us = !gwbridge_exists();
        let ok = std::process::Command::new("docker")
            .args(["swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        ok.then_some(Self { joined_by_us: true, gwbridge_by_us })
    }
}

impl Drop for SwarmMode {
    fn drop(&mut self) {
        if self.joined_by_us {
            let _ = std::process::Command::new("docker").args(["swarm", "leave", "--force"]).output();
        }
        if self.gwbridge_by_us {
            let _ = std::process::Command::new("docker").args(["network", "rm", "docker_gwbridge"]).output();
        }
    }
}

/// Sequential latencies of `n` creates, sorted.
pub async fn sequential(n: usize, bytes: usize) -> Result<Vec<Duration>, String> {
    let mut c = Client::connect().await?;
    let tag = std::process::id();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        c.create_secret(&format!("bench-{tag}-seq-{i}"), &vec![b'x'; bytes]).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok(lat)
}

/// Creates per second with `clients` concurrent connections for `secs`.
pub async fn throughput(clients: usize, secs: u64, bytes: usize) -> Result<f64, String> {
    let stop = Instant::now() + Duration::from_secs(secs);
    let tag = std::process::id();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = Client::connect().await?;
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < stop {
                client.create_secret(&format!("bench-{tag}-c{clients}-{c}-{n}"), &vec![b'x'; bytes]).await?;
                n += 1;
            }
            Ok::<usize, String>(n)
        }));
    }
    let t = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await.map_err(|e| e.to_string())??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}
