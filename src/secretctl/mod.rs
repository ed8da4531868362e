//! `secretctl`: the control API client. One file per verb.

mod admin_cert;
mod autolock;
mod ca;
mod client;
mod image;
mod info;
mod join_token;
mod node;
mod output;
mod secret;
mod secret_ref;
mod service;
mod trust;

use clap::{Parser, Subcommand, ValueEnum};

pub use client::{connect, Host};

/// secretctl: manage a swarmd cluster through its control API.
#[derive(Parser, Debug)]
#[command(name = "secretctl", version, about)]
pub struct Cli {
    /// Control API: unix:///PATH or tcp://HOST:PORT (with --tls-cert/--tls-key/--tls-ca).
    #[arg(long, global = true, env = "SWARMD_HOST", default_value = "unix:///var/lib/swarmd/control.sock")]
    host: String,
    /// Client certificate for tcp:// hosts (PEM).
    #[arg(long, global = true)]
    tls_cert: Option<std::path::PathBuf>,
    /// Client key for tcp:// hosts (PEM).
    #[arg(long, global = true)]
    tls_key: Option<std::path::PathBuf>,
    /// Cluster root CA for tcp:// hosts (PEM).
    #[arg(long, global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

/// Output formats of list and inspect commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable table.
    Table,
    /// JSON.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a secret from a file or standard input; prints its ID.
    Create(secret::CreateArgs),
    /// Add a new version of a secret (running tasks that use it will see it).
    Update(secret::UpdateArgs),
    /// List secrets (never their values).
    Ls(secret::LsArgs),
    /// Show secrets' metadata and versions (never their values).
    Inspect {
        /// Names or IDs.
        #[arg(required = true)]
        secrets: Vec<String>,
    },
    /// Remove secrets.
    Rm {
        /// Names or IDs.
        #[arg(required = true)]
        secrets: Vec<String>,
    },
    /// The cluster's data keys.
    #[command(subcommand)]
    Keys(secret::KeysCmd),
    /// Services: containers on the workers that get secrets on a tmpfs.
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// Operators' client certificates for --host tcp://: issue (control socket only), ls, revoke.
    AdminCert(admin_cert::AdminCertArgs),
    /// Show (or rotate) the unlock key of an autolocked cluster.
    UnlockKey(autolock::UnlockKeyArgs),
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(autolock::ClusterCmd),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Show (or rotate) a join token.
    JoinToken(join_token::JoinTokenArgs),
    /// The cluster's root certificate authority.
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// This manager's view of raft (leader, term, log) and a digest of its state.
    Info,
    /// Workload images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Content trust: keys trusted to sign images, and images' signatures.
    #[command(subcommand)]
    Trust(trust::TrustCmd),
}

/// Runs `secretctl` with parsed arguments.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Commands that need no manager run before connecting to one.
    let command = match cli.command {
        Command::Image(c) if c.is_offline() => return image::run_offline(c),
        c => c,
    };
    let host = Host::parse(&cli.host, cli.tls_cert, cli.tls_key, cli.tls_ca)?;
    let channel = connect(&host).await?;
    match command {
        Command::Create(a) => secret::create(channel, a).await,
        Command::Update(a) => secret::update(channel, a).await,
        Command::Ls(a) => secret::ls(channel, a, cli.format).await,
        Command::Inspect { secrets } => secret::inspect(channel, secrets, cli.format).await,
        Command::Rm { secrets } => secret::rm(channel, secrets).await,
        Command::Keys(c) => secret::keys(channel, c, cli.format).await,
        Command::Service(c) => service::run(channel, c, cli.format).await,
        Command::UnlockKey(a) => autolock::unlock_key(channel, a).await,
        Command::AdminCert(a) => admin_cert::run(channel, a, cli.format).await,
        Command::Cluster(c) => autolock::cluster(channel, c).await,
        Command::Node(c) => node::run(channel, c, cli.format).await,
        Command::JoinToken(a) => join_token::run(channel, a).await,
        Command::Ca(c) => ca::run(channel, c, cli.format).await,
        Command::Info => info::run(channel, cli.format).await,
        Command::Image(c) => image::run(channel, c, cli.format).await,
        Command::Trust(c) => trust::run(channel, c, cli.format).await,
    }
}
