//! Docker Swarm as a peer, measured in the same run: secrets created through
//! this machine's Docker Engine in swarm mode (single manager), over the
//! Engine API on its unix socket, from an in-process client.
//!
//! The harness puts the engine in swarm mode only if it is not already, and
//! then leaves swarm mode again (`docker swarm leave --force`) at the end,
//! removing the `docker_gwbridge` network swarm mode made. Where no Docker
//! Engine runs, it installs Debian's `docker.io` (as root, if missing), starts
//! `dockerd` for the measurement and stops it afterwards.

#![allow(dead_code)]

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

/// A Docker Engine for the duration of the measurement: the running one, or a
/// `dockerd` started here (and stopped on drop).
pub struct Engine {
    started: Option<std::process::Child>,
}

fn engine_answers() -> bool {
    std::process::Command::new("docker").args(["info"]).output().is_ok_and(|o| o.status.success())
}

impl Engine {
    /// The running engine, or one started from Debian's `docker.io`; `None` (said why) if neither.
    pub fn ensure() -> Option<Self> {
        if engine_answers() {
            return Some(Self { started: None });
        }
        let uid = std::process::Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("no Docker Engine runs here, and starting one needs root");
            return None;
        }
        if std::process::Command::new("dockerd").arg("--version").output().is_err() {
            eprintln!("installing docker.io from Debian's packages for the Swarm peer");
            let _ = std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "docker.io"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(std::process::Stdio::null())
                .status();
        }
        let log = std::env::temp_dir().join(format!("swarmd-bench-dockerd-{}.log", std::process::id()));
        let child = std::process::Command::new("dockerd")
            .stdout(std::fs::File::create(&log).ok()?)
            .stderr(std::fs::File::create(&log).ok()?)
            .spawn()
            .map_err(|e| eprintln!("cannot start dockerd: {e}"))
            .ok()?;
        let engine = Self { started: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !engine_answers() {
            if Instant::now() > deadline {
                eprintln!("dockerd did not answer within 60 s (its log: {})", log.display());
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(engine)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(child) = &mut self.started {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }
}

/// Swarm mode for the duration of the measurement.
pub struct SwarmMode {
    joined_by_us: bool,
    /// Swarm mode creates the `docker_gwbridge` network and leaving keeps it.
    gwbridge_by_us: bool,
    // Dropped after the fields above: leave swarm mode, then stop an engine started here.
    _engine: Engine,
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
        let engine = Engine::ensure()?;
        let state = std::process::Command::new("docker")
            .args(["info", "--format", "{{.Swarm.LocalNodeState}}"])
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        if state == "active" {
            return Some(Self { joined_by_us: false, gwbridge_by_us: false, _engine: engine });
        }
        let gwbridge_by_us = !gwbridge_exists();
        let ok = std::process::Command::new("docker")
            .args(["swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        ok.then_some(Self { joined_by_us: true, gwbridge_by_us, _engine: engine })
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

/// dockerd's resident memory in swarm mode with no nodes but itself, a few
/// seconds after entering it; `None` without an engine.
pub fn idle_rss() -> Option<u64> {
    let _swarm = SwarmMode::enter()?;
    std::thread::sleep(Duration::from_secs(5));
    let pid = std::process::Command::new("pidof").arg("dockerd").output().ok()?;
    let pid: u32 = String::from_utf8_lossy(&pid.stdout).split_whitespace().next()?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn docker(args: &[&str]) -> Result<String, String> {
    let o = std::process::Command::new("docker").args(args).output().map_err(|e| format!("docker: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    } else {
        Err(format!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

fn docker_secret(name: &str, value: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("docker")
        .args(["secret", "create", name, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("docker: {e}"))?;
    child.stdin.take().expect("stdin").write_all(value.as_bytes()).map_err(|e| e.to_string())?;
    let ok = child.wait().map_err(|e| e.to_string())?.success();
    ok.then_some(()).ok_or_else(|| format!("docker secret create {name} failed"))
}

/// What the Swarm delivery peer made, removed on drop.
struct DeliveryRig {
    service: String,
    secrets: Vec<String>,
    image: Option<String>,
    out: tempfile::TempDir,
}

impl Drop for DeliveryRig {
    fn drop(&mut self) {
        let _ = docker(&["service", "rm", &self.service]);
        // Task containers go away a moment after the service.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && docker(&["ps", "-aq", "--filter", &format!("label=com.docker.swarm.service.name={}", self.service)])
                .is_ok_and(|s| !s.is_empty())
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        for s in &self.secrets {
            let _ = docker(&["secret", "rm", s]);
        }
        if let Some(img) = &self.image {
            let _ = docker(&["image", "rm", img]);
        }
    }
}

/// Swarm's way to change a secret under a running service: a new secret, then
/// `docker service update --secret-rm OLD --secret-add NEW` (a new task).
/// Measures, `trials` times, from the start of that update until the new
/// task's container has read the new value (it copies it to a bind-mounted
/// directory as it starts). The workload exits promptly on SIGTERM, Swarm's
/// best case. `rootfs` is a busybox root file system made into a local image.
pub fn delivery(rootfs: &std::path::Path, trials: usize, start_first: bool) -> Result<Vec<Duration>, String> {
    let _swarm = SwarmMode::enter().ok_or("no Docker Engine that can enter swarm mode")?;
    let tag = std::process::id();
    let image = format!("swarmd-bench-busybox:{tag}");
    let import = format!("tar -C {} -c . | docker import - {image}", rootfs.display());
    let ok = std::process::Command::new("sh").args(["-c", &import]).output().map_err(|e| e.to_string())?;
    if !ok.status.success() {
        return Err(format!("docker import: {}", String::from_utf8_lossy(&ok.stderr)));
    }
    let mut rig = DeliveryRig {
        service: format!("swarmd-bench-delivery-{tag}"),
        secrets: Vec::new(),
        image: Some(image.clone()),
        out: tempfile::tempdir().map_err(|e| e.to_string())?,
    };
    let first = format!("swarmd-bench-{tag}-0");
    docker_secret(&first, "v0")?;
    rig.secrets.push(first.clone());
    let order = if start_first { "start-first" } else { "stop-first" };
    let mount = format!("type=bind,src={},dst=/out", rig.out.path().display());
    docker(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &rig.service,
        "--update-order",
        order,
        "--secret",
        &format!("source={first},target=db_pass"),
        "--mount",
        &mount,
        &image,
        "sh",
        "-c",
        "cat /run/secrets/db_pass > /out/$(hostname); trap 'exit 0' TERM; while true; do sleep 1 & wait $!; done",
    ])?;
    let seen = |value: &str| {
        std::fs::read_dir(rig.out.path())
            .map(|d| d.flatten().any(|f| std::fs::read(f.path()).is_ok_and(|c| c.trim_ascii_end() == value.as_bytes())))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen("v0") {
        if Instant::now() > deadline {
            return Err("the Swarm service's first task never started".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut lat = Vec::with_capacity(trials);
    for i in 1..=trials {
        let (old, new, value) =
            (rig.secrets.last().cloned().expect("a secret"), format!("swarmd-bench-{tag}-{i}"), format!("v{i}"));
        docker_secret(&new, &value)?;
        rig.secrets.push(new.clone());
        let t = Instant::now();
        docker(&[
            "service",
            "update",
            "--detach",
            "--no-resolve-image",
            "--secret-rm",
            &old,
            "--secret-add",
            &format!("source={new},target=db_pass"),
            &rig.service,
        ])?;
        while !seen(&value) {
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!("update {i} never reached a task"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        lat.push(t.elapsed());
        // Let the update finish (the old task stopping) before the next one.
        let deadline = Instant::now() + Duration::from_secs(60);
        while docker(&[
            "service",
            "inspect",
            "--format",
            "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
            &rig.service,
        ])
        .is_ok_and(|s| s == "updating")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    lat.sort();
    Ok(lat)
}
