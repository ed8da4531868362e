//! `swarmd`: create, join and run nodes.

mod lock;
mod node;
mod token;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use swarmd_certs::CertValidity;
use swarmd_manager::{InitOptions, Manager};
use swarmd_worker::{JoinOptions, Worker};
use tokio_util::sync::CancellationToken;

pub use lock::{DataDirLock, LockError, LOCK_FILE};
pub use token::{redact, TokenArgs, TOKEN_ENV};

/// swarmd: a Swarm-style cluster security plane.
#[derive(Parser, Debug)]
#[command(name = "swarmd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--content-trust`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ContentTrust {
    /// Only images signed by a trusted key run.
    Required,
    /// Any image the cluster holds runs.
    Off,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manager commands.
    #[command(subcommand)]
    Manager(ManagerCmd),
    /// Worker commands.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Restart a node (manager or worker) from its saved state.
    Run(RunArgs),
    /// Unlock a manager that restarted locked (autolock): reads the unlock key
    /// (SWDKEY-1-…) on standard input and hands it to the waiting manager.
    Unlock(UnlockArgs),
}

#[derive(Args, Debug)]
struct UnlockArgs {
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Subcommand, Debug)]
enum ManagerCmd {
    /// Create a new cluster with this node as its manager, then run it.
    Init(InitArgs),
    /// Join a cluster as an additional manager with the manager token, then run.
    Join(ManagerJoinArgs),
    /// After losing quorum: make this (stopped) manager a single-manager cluster
    /// with all the state it has, then run it. The other managers are removed.
    Recover(RecoverArgs),
}

#[derive(Args, Debug)]
struct RecoverArgs {
    /// Required: confirms that the other managers are to be dropped.
    #[arg(long, required = true)]
    force_new_cluster: bool,
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args, Debug)]
struct ManagerJoinArgs {
    /// The manager join token, from `secretctl join-token manager -q`.
    #[command(flatten)]
    token: TokenArgs,
    /// Existing manager address(es), HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    remote: Vec<String>,
    #[command(flatten)]
    dir: DataDir,
    #[command(flatten)]
    addrs: ManagerAddrs,
    #[command(flatten)]
    raft: RaftArgs,
}

#[derive(Subcommand, Debug)]
enum WorkerCmd {
    /// Join a cluster as a worker with a join token, then run.
    Join(JoinArgs),
    /// What this worker holds now: its tasks and the IDs (never the values)
    /// of the secrets in its memory, as JSON.
    Status(DataDir),
    /// Internal: started by a worker; once the worker is gone, removes what
    /// its tasks left (containers, secret mounts). See swarmd_worker::watchdog.
    #[command(hide = true)]
    Watchdog(WatchdogArgs),
}

#[derive(Args, Debug)]
struct WatchdogArgs {
    /// The worker's run dir.
    #[arg(long)]
    run_dir: PathBuf,
    /// The worker's OCI runtime.
    #[arg(long, default_value = "runc", value_parser = ["runc", "crun"])]
    runtime: String,
}

#[derive(Args, Debug)]
struct DataDir {
    /// Where the node keeps its state.
    #[arg(long, default_value = "/var/lib/swarmd", env = "SWARMD_DATA_DIR")]
    data_dir: PathBuf,
}

/// Where a manager listens and what it advertises.
#[derive(Args, Debug)]
struct ManagerAddrs {
    /// Address to listen on for nodes and peers (port 0: pick a free port, kept across restarts).
    #[arg(long, default_value = "0.0.0.0:4242")]
    listen_addr: String,
    /// Address other nodes dial [default: the listen address, or this host's address]
    #[arg(long)]
    advertise_addr: Option<String>,
    /// Control socket path [default: <data-dir>/control.sock]
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InitArgs {
    #[command(flatten)]
    dir: DataDir,
    #[command(flatten)]
    addrs: ManagerAddrs,
    /// Lifetime of node certificates, e.g. 30s, 90m, 24h (minimum 30s).
    #[arg(long, default_value = "24h")]
    cert_expiry: CertValidity,
    /// Heartbeat period of node sessions; a node is down after 3 missed periods.
    #[arg(long, default_value = "5s", value_parser = parse_heartbeat)]
    heartbeat: Duration,
    /// Lifetime of tasks' workload identities (/run/secrets/identity), renewed
    /// at half of it: 30s to 30d [default: 1h]
    #[arg(long)]
    identity_ttl: Option<swarmd_certs::workload::IdentityTtl>,
    /// required: only images signed by a key the cluster trusts run
    /// (`secretctl trust key add`); off [default].
    #[arg(long, value_enum)]
    content_trust: Option<ContentTrust>,
    /// Seal the managers' keys under an unlock key that is printed once; after a
    /// restart a manager serves nothing until `swarmd unlock`.
    #[arg(long)]
    autolock: bool,
    /// The cluster CA is this certificate (PEM, a CA: typically an
    /// intermediate of your organisation's root) instead of a generated root;
    /// with --ca-key, or with --external-ca (the signer's CA certificate).
    #[arg(long, value_name = "F")]
    ca_cert: Option<PathBuf>,
    /// Its private key (PKCS#8 PEM), with --ca-cert.
    #[arg(long, value_name = "F", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// A cfssl signer holds the CA key and signs node certificates:
    /// `protocol=cfssl,url=https://HOST:PORT[/PATH],authkey=F[,cacert=F]`
    /// (authkey: the hex key of the signer's `auth_keys` entry, which only
    /// managers hold; cacert: the roots its TLS certificate chains to;
    /// default --ca-cert). Needs --ca-cert.
    #[arg(long, value_name = "SPEC", requires = "ca_cert", conflicts_with = "ca_key")]
    external_ca: Option<ExternalCaArg>,
    /// The certificates between --ca-cert and your root (PEM), appended to
    /// every node certificate after the cluster CA.
    #[arg(long, value_name = "F", requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    #[command(flatten)]
    raft: RaftArgs,
}

/// `--external-ca protocol=cfssl,url=…[,cacert=F]`, as Docker's `swarm init` takes it.
#[derive(Clone, Debug)]
pub(crate) struct ExternalCaArg {
    pub(crate) url: String,
    pub(crate) authkey: PathBuf,
    pub(crate) cacert: Option<PathBuf>,
}

impl ExternalCaArg {
    /// The auth key, and the TLS roots (empty: the cluster's root), read from their files.
    pub(crate) fn read(&self) -> anyhow::Result<(zeroize::Zeroizing<Vec<u8>>, String)> {
        let roots = match &self.cacert {
            Some(f) => read_pem_file(f)?.to_string(),
            None => String::new(),
        };
        Ok((read_auth_key(&self.authkey)?, roots))
    }
}

impl std::str::FromStr for ExternalCaArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut protocol, mut url, mut cacert, mut authkey) = (None, None, None, None);
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected KEY=VALUE"))?;
            let slot = match k.trim().to_ascii_lowercase().as_str() {
                "protocol" => &mut protocol,
                "url" => &mut url,
                "cacert" => &mut cacert,
                "authkey" => &mut authkey,
                other => return Err(format!("unknown key {other:?}: expected protocol, url, authkey or cacert")),
            };
            if slot.replace(v.trim().to_owned()).is_some() {
                return Err(format!("{k} given twice"));
            }
        }
        match protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("cfssl") => {}
            Some(p) => return Err(format!("protocol {p:?}: only cfssl is supported")),
            None => return Err("protocol=cfssl is required".into()),
        }
        let url = url.ok_or("url=https://… is required")?;
        if !url.starts_with("https://") {
            return Err(format!("url {url:?}: must be https://"));
        }
        // Without it anyone who reaches the signer could have it sign a
        // manager certificate.
        let authkey = authkey.ok_or(
            "authkey=FILE is required: the hex key of the signer's auth_keys entry, so that only managers can have it sign",
        )?;
        Ok(Self { url, authkey: PathBuf::from(authkey), cacert: cacert.map(PathBuf::from) })
    }
}

/// Reads a cfssl auth key: a file of mode 0600 or stricter holding its hex
/// digits (at most 1 KiB).
fn read_auth_key(path: &std::path::Path) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read;
    let mut text = zeroize::Zeroizing::new(String::with_capacity(1025));
    token::open_owner_only(path, "authkey", "the external CA's auth key")?
        .take(1024)
        .read_to_string(&mut text)
        .map_err(|e| anyhow::anyhow!("authkey {}: {e}", path.display()))?;
    let key = hex::decode(text.trim())
        .map_err(|_| anyhow::anyhow!("{}: an auth key is hex digits (as in cfssl's auth_keys)", path.display()))?;
    Ok(zeroize::Zeroizing::new(key))
}

/// Reads a PEM file of at most 64 KiB.
fn read_pem_file(path: &std::path::Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut s = zeroize::Zeroizing::new(String::new());
    f.take(64 << 10).read_to_string(&mut s).with_context(|| format!("cannot read {} as text", path.display()))?;
    if s.len() >= 64 << 10 {
        anyhow::bail!("{} is larger than 64 KiB: not a PEM certificate or key", path.display());
    }
    Ok(s)
}

/// Raft timing and snapshots (managers).
#[derive(Args, Debug)]
struct RaftArgs {
    /// Interval of the raft leader's heartbeats to other managers.
    #[arg(long, default_value = "100ms", value_parser = swarmd_certs::parse_duration)]
    raft_heartbeat: Duration,
    /// Lower bound of the randomized election timeout (the upper bound is twice this).
    /// openraft refuses votes until the upper bound has passed since the last
    /// heartbeat, so it bounds failover time from below.
    #[arg(long, default_value = "400ms", value_parser = swarmd_certs::parse_duration)]
    election_timeout: Duration,
    /// Build a raft snapshot (and compact the log) every N entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_interval: u64,
}

impl RaftArgs {
    fn settings(&self) -> anyhow::Result<swarmd_manager::raft::RaftSettings> {
        swarmd_manager::raft::RaftSettings::new(self.raft_heartbeat, self.election_timeout, self.snapshot_interval)
            .map_err(anyhow::Error::msg)
    }
}

#[derive(Args, Debug)]
struct JoinArgs {
    /// The join token, from `secretctl join-token worker -q`.
    #[command(flatten)]
    token: TokenArgs,
    /// Manager address(es), HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    remote: Vec<String>,
    #[command(flatten)]
    dir: DataDir,
    /// Address to listen on if this node is promoted to manager [default: 0.0.0.0:4242]
    #[arg(long)]
    listen_addr: Option<String>,
    /// The OCI runtime that runs tasks.
    #[arg(long, default_value = "runc", value_parser = ["runc", "crun"])]
    runtime: String,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    dir: DataDir,
}

fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    let d = swarmd_certs::parse_duration(s)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err("heartbeat must be between 100ms and 1h".into());
    }
    Ok(d)
}

/// Cancels the returned token on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

impl Cli {
    /// The join token arguments, for the join commands.
    fn token_args(&self) -> Option<&TokenArgs> {
        match &self.command {
            Command::Manager(ManagerCmd::Join(a)) => Some(&a.token),
            Command::Worker(WorkerCmd::Join(a)) => Some(&a.token),
            _ => None,
        }
    }
}

/// If a join token is on this process's command line or `SWARMD_JOIN_TOKEN`
/// is in its environment, re-executes swarmd without them (the token goes
/// through an inherited pipe); otherwise returns. Call it first in `main`.
pub fn reexec_without_token(cli: &Cli) -> anyhow::Result<()> {
    token::reexec_without_token(cli.token_args())
}

/// Makes a data dir about to receive a new node private: created with mode
/// 0700 if missing, narrowed to 0700 if it exists and is empty (a non-empty
/// directory is not ours to change: the node's own files and directories in it
/// are private anyway). Returns whether it was created here.
fn new_node_dir(dir: &Path) -> anyhow::Result<bool> {
    // A lock file left by an earlier attempt does not make it another's.
    let empty = std::fs::read_dir(dir).map(|d| d.flatten().all(|e| e.file_name() == LOCK_FILE)).ok();
    match empty {
        None => {
            swarmd_certs::create_private_dir(dir)?;
            Ok(true)
        }
        Some(true) => {
            swarmd_certs::create_private_dir(dir)?;
            Ok(false)
        }
        Some(false) => Ok(false),
    }
}

/// After a failed init or join: removes the data dir if this command created it
/// and nothing is left in it.
fn forget_new_node_dir<T>(dir: &Path, created: bool, r: anyhow::Result<T>) -> anyhow::Result<T> {
    if r.is_err() && created {
        let _ = std::fs::remove_file(dir.join(LOCK_FILE));
        let _ = std::fs::remove_dir(dir);
    }
    r
}

/// Locks a data dir about to receive a new node (see [`new_node_dir`]); if
/// another process holds it, removes the dir again if this command created it.
///
/// A dir that already holds a node is not locked here (nor touched): the init
/// or join refuses it as it is ("already holds a swarmd node"), whether its
/// node runs or not.
fn lock_new_node_dir(dir: &Path, created: bool) -> anyhow::Result<Option<DataDirLock>> {
    let holds_node =
        [swarmd_manager::CONFIG_FILE, swarmd_worker::CONFIG_FILE, "certs"].iter().any(|f| dir.join(f).exists());
    if holds_node {
        return Ok(None);
    }
    forget_new_node_dir(dir, created, DataDirLock::acquire(dir).map(Some).map_err(Into::into))
}

/// Runs `swarmd` with parsed arguments.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Manager(ManagerCmd::Init(a)) => {
            let data_dir = a.dir.data_dir.clone();
            let mut opts = InitOptions::new(a.dir.data_dir);
            opts.listen_addr = a.addrs.listen_addr;
            opts.advertise_addr = a.addrs.advertise_addr;
            opts.control_socket = a.addrs.control_socket;
            opts.cert_expiry = a.cert_expiry;
            opts.heartbeat = a.heartbeat;
            opts.raft = a.raft.settings()?;
            opts.autolock = a.autolock;
            if a.ca_cert.is_some() && a.ca_key.is_none() && a.external_ca.is_none() {
                anyhow::bail!("--ca-cert needs --ca-key, or --external-ca when a signer holds the key");
            }
            if let (Some(cert), Some(ext)) = (&a.ca_cert, &a.external_ca) {
                let (auth_key, tls_roots_pem) = ext.read()?;
                opts.external_ca = Some(swarmd_manager::ExternalCaOptions {
                    url: ext.url.clone(),
                    auth_key,
                    tls_roots_pem,
                    ca_cert_pem: read_pem_file(cert)?.to_string(),
                    chain_pem: match &a.ca_chain {
                        Some(c) => read_pem_file(c)?.to_string(),
                        None => String::new(),
                    },
                });
            }
            if let (Some(cert), Some(key)) = (&a.ca_cert, &a.ca_key) {
                opts.ca = Some(swarmd_manager::OwnCa {
                    cert_pem: read_pem_file(cert)?.to_string(),
                    key_pem: read_pem_file(key)?,
                    chain_pem: match &a.ca_chain {
                        Some(c) => read_pem_file(c)?.to_string(),
                        None => String::new(),
                    },
                });
            }
            opts.identity_ttl = a.identity_ttl;
            opts.content_trust = a.content_trust == Some(ContentTrust::Required);
            let created = new_node_dir(&data_dir)?;
            let _lock = lock_new_node_dir(&data_dir, created)?;
            let manager = forget_new_node_dir(&data_dir, created, Manager::init(opts).await.map_err(Into::into))?;
            println!("Swarm initialized: current node ({}) is now a manager.", manager.config().node_id);
            println!("To add a worker, run `secretctl join-token worker` on this host.");
            if let Some(key) = manager.unlock_key() {
                print_unlock_key(&key);
            }
            let shutdown = shutdown_on_signal();
            node::after_manager(&data_dir, manager.run(shutdown.clone()).await?, shutdown).await?;
        }
        Command::Manager(ManagerCmd::Join(a)) => {
            let token = a.token.read()?;
            let token: swarmd_certs::JoinToken = token.as_str().parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let opts = swarmd_manager::JoinOptions {
                remotes: a.remote,
                data_dir: a.dir.data_dir,
                listen_addr: a.addrs.listen_addr,
                advertise_addr: a.addrs.advertise_addr,
                control_socket: a.addrs.control_socket,
                raft: a.raft.settings()?,
                promoted_from: None,
            };
            let data_dir = opts.data_dir.clone();
            let created = new_node_dir(&data_dir)?;
            let _lock = lock_new_node_dir(&data_dir, created)?;
            let shutdown = shutdown_on_signal();
            let outcome =
                forget_new_node_dir(&data_dir, created, node::join_manager(opts, token, shutdown.clone()).await)?;
            node::after_manager(&data_dir, outcome, shutdown).await?;
        }
        Command::Manager(ManagerCmd::Recover(a)) => {
            debug_assert!(a.force_new_cluster);
            let _lock = DataDirLock::acquire(&a.dir.data_dir)?;
            let m = Manager::recover(&a.dir.data_dir).await?;
            println!("Forced a new cluster: this manager ({}) is now the only manager.", m.config().node_id);
            let shutdown = shutdown_on_signal();
            node::after_manager(&a.dir.data_dir, m.run(shutdown.clone()).await?, shutdown).await?;
        }
        Command::Worker(WorkerCmd::Join(a)) => {
            let data_dir = a.dir.data_dir.clone();
            let token = a.token.read()?;
            let opts = JoinOptions {
                token: token.as_str().to_owned(),
                remotes: a.remote,
                data_dir: a.dir.data_dir,
                hostname: swarmd_certs::hostname(),
                listen_addr: a.listen_addr,
                runtime: Some(a.runtime),
            };
            drop(token);
            let created = new_node_dir(&data_dir)?;
            let _lock = lock_new_node_dir(&data_dir, created)?;
            let worker = forget_new_node_dir(&data_dir, created, Worker::join(opts).await.map_err(Into::into))?;
            println!("This node joined the cluster as a worker ({}).", worker.node_id());
            let shutdown = shutdown_on_signal();
            node::after_worker(&data_dir, worker.run(shutdown.clone()).await?, shutdown).await?;
        }
        Command::Run(a) => node::run_existing(&a.dir.data_dir).await?,
        Command::Worker(WorkerCmd::Status(d)) => {
            let cfg = swarmd_worker::WorkerConfig::load(&d.data_dir)?;
            let path = swarmd_worker::run_dir(&cfg.node_id).join("state.json");
            let text = std::fs::read_to_string(&path).unwrap_or_else(|_| r#"{"tasks":[],"secrets":[]}"#.into());
            println!("{text}");
        }
        Command::Worker(WorkerCmd::Watchdog(a)) => swarmd_worker::watchdog::run(&a.run_dir, &a.runtime).await?,
        Command::Unlock(a) => unlock(&a.dir.data_dir).await?,
    }
    Ok(())
}

/// How an unlock key is shown (here and by `secretctl unlock-key`).
pub fn print_unlock_key(key: &str) {
    println!("To unlock a manager after it restarts, run `swarmd unlock` and give it this key:");
    println!();
    println!("    {key}");
    println!();
    println!("Keep it in a password manager: without it a restarted manager stays locked.");
}

async fn unlock(data_dir: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let cfg = swarmd_manager::ManagerConfig::load(data_dir).context("no manager here to unlock")?;
    let mut key = zeroize::Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut key).context("reading the unlock key from standard input")?;
    let channel = crate::secretctl::connect(&crate::secretctl::Host::Unix(cfg.control_socket.clone())).await?;
    let mut client = swarmd_proto::control::lock_client::LockClient::new(channel);
    client
        .unlock(swarmd_proto::control::UnlockRequest { key: key.trim().to_owned() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("Manager unlocked.");
    Ok(())
}
