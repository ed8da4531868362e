//! A manager's life: init or open, then run until shut down.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use swarmd_certs::renew::{CertIssuer, Renewed, Renewer};
use swarmd_certs::tls::{DenyList, TlsCredentials};
use swarmd_certs::{generate_key_and_csr, ClusterId, JoinToken, NodeId, NodeIdentity, Role, RootCa};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::auth::{Admits, Authorizer, Gate};
use crate::autolock::NodeKeyWrap;
use crate::ca_service::CaService;
use crate::cluster::SecretsCache;
use crate::cluster_service::ClusterService;
use crate::config::{default_advertise, InitOptions, ManagerConfig, CONFIG_FILE};
use crate::conn::{tls_incoming, unix_incoming, ConnLimits, ConnRegistry};
use crate::control::ControlService;
use crate::dispatcher::Dispatcher;
use crate::external_ca::ExternalCa;
use crate::keys::{purpose, KeyDir, Keyring, SymmetricKey, UnlockKey};
use crate::membership::{follow_deny_list, forget_other_managers, watch_demotion, RunOutcome};
use crate::raft::{self, Network, Raft, RaftService, RaftSettings};
use crate::state::{ClusterRecord, Command, ExternalCaRecord, NodeRecord, NodeStatus, StateView};
use crate::store::{Peers, Store};
use crate::ManagerError;
use swarmd_certs::now_unix;

mod join;
mod recover;
use join::random_raft_id;
pub use join::JoinSite;

/// How long in-flight requests get to finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(5);
/// HTTP/2 streams open at once on one connection with a certificate...
const NODE_STREAMS: u32 = 256;
/// ...and requests handled at once on it (the rest wait, their bodies unread).
const NODE_CONCURRENCY: usize = 64;
/// Flow-control window of a connection with a certificate (its streams get a
/// quarter): what it can make the manager hold unread, past what its requests
/// hold undecoded (see `crate::budget`).
const NODE_WINDOW: u32 = 1 << 20;
/// The same for a connection without a certificate (a joiner makes two calls).
const ANONYMOUS_STREAMS: u32 = 4;
const ANONYMOUS_CONCURRENCY: usize = 2;
/// Flow-control window of an anonymous connection's streams (the connection's
/// is twice that).
const ANONYMOUS_WINDOW: u32 = 16 << 10;
/// Bytes of headers one anonymous request may send.
const ANONYMOUS_HEADERS: u32 = 8 << 10;
/// The ID of a new cluster's data key (later keys count up from it).
const FIRST_DATA_KEY: u32 = 1;

/// A started manager: raft is running; [`Manager::run`] starts serving.
pub struct Manager {
    cfg: ManagerConfig,
    data_dir: PathBuf,
    raft: Raft,
    db: sled::Db,
    view: StateView,
    creds: Arc<TlsCredentials>,
    deny: DenyList,
    keyring: Keyring,
    /// The key directory with the KEK open.
    keydir: KeyDir,
    /// Seals the node key while autolock is on.
    wrap: Arc<NodeKeyWrap>,
    /// The unlock key this manager's files are sealed under now, if any.
    unlocked_with: Option<UnlockKey>,
    listener: TcpListener,
    applied: tokio::sync::watch::Receiver<u64>,
    /// Set by `recover --force-new-cluster`: once leader, remove the other managers.
    pub(crate) forget_other_managers: bool,
    /// A joining manager's trust until its store catches up: the managers, from
    /// the manager that handed it the data key.
    bootstrap_managers: std::collections::HashSet<NodeId>,
    /// A certificate this manager signed itself at start (see
    /// `recover::recover_identity`), to record once raft takes writes.
    unrecorded: Option<(String, i64)>,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ManagerError + '_ {
    move |source| ManagerError::Io { path: path.to_owned(), source }
}

/// What `init` creates in a data dir (removed again if init fails).
const CREATED: [&str; 3] = ["keys", "certs", "raft"];

fn check_fresh(data_dir: &Path) -> Result<(), ManagerError> {
    for marker in [CONFIG_FILE, "worker.json"] {
        if data_dir.join(marker).exists() {
            return Err(ManagerError::AlreadyInitialised { path: data_dir.to_owned() });
        }
    }
    for d in CREATED {
        if data_dir.join(d).exists() {
            return Err(ManagerError::PartialState { path: data_dir.to_owned(), what: format!("{d}/") });
        }
    }
    Ok(())
}

async fn bind(addr: &str) -> Result<TcpListener, ManagerError> {
    TcpListener::bind(addr).await.map_err(|source| ManagerError::Bind { addr: addr.to_owned(), source })
}

impl Manager {
    /// Creates a new cluster in `opts.data_dir` with this node as its only
    /// manager. On failure, removes what it created.
    pub async fn init(opts: InitOptions) -> Result<Self, ManagerError> {
        check_fresh(&opts.data_dir)?;
        let listener = bind(&opts.listen_addr).await?;
        std::fs::create_dir_all(&opts.data_dir).map_err(io_err(&opts.data_dir))?;
        match Self::init_in(&opts, listener).await {
            Ok(m) => Ok(m),
            Err(e) => {
                for d in CREATED {
                    let _ = std::fs::remove_dir_all(opts.data_dir.join(d));
                }
                Err(e)
            }
        }
    }

    async fn init_in(opts: &InitOptions, listener: TcpListener) -> Result<Self, ManagerError> {
        let data_dir = &opts.data_dir;
        let bound = listener.local_addr().map_err(io_err(data_dir))?;
        let advertise = opts.advertise_addr.clone().unwrap_or_else(|| default_advertise(bound));
        let keyring = Keyring::single(FIRST_DATA_KEY, SymmetricKey::generate());
        KeyDir::new(data_dir).create(&keyring)?;
        let keydir = KeyDir::new(data_dir).loaded()?;
        let unlock = opts.autolock.then(UnlockKey::generate);
        if let Some(k) = &unlock {
            keydir.lock(k)?;
        }
        let wrap = Arc::new(NodeKeyWrap::new(keydir.kek_key()?, unlock.is_some()));

        let cluster_id = ClusterId::random();
        let node_id = NodeId::random();
        let raft_id = random_raft_id();
        // The organisation's CA (checked: a CA valid now, the key its own),
        // whose leaves carry it and the chain to the organisation's root; an
        // external CA's certificate (checked: a CA valid now), whose key
        // stays with the signer; or a generated root.
        let own_chain = |cert_pem: &str, chain_pem: &str| -> Result<String, ManagerError> {
            let chain = format!("{cert_pem}{chain_pem}");
            let certs = swarmd_certs::tls::chain_from_pem(&chain)
                .map_err(|e| ManagerError::Invalid(format!("--ca-cert and --ca-chain: {e}")))?;
            if certs.len() > 5 {
                return Err(ManagerError::Invalid("--ca-chain holds more than four certificates".into()));
            }
            Ok(chain)
        };
        let (ca, chain, external) = match (&opts.ca, &opts.external_ca) {
            (Some(_), Some(_)) => {
                return Err(ManagerError::Invalid("--ca-key and --external-ca exclude each other".into()));
            }
            (Some(own), None) => {
                let chain = own_chain(&own.cert_pem, &own.chain_pem)?;
                let ca = RootCa::from_pem_for(&cluster_id, &own.cert_pem, &own.key_pem)
                    .map_err(|e| ManagerError::Invalid(format!("--ca-cert and --ca-key: {e}")))?;
                (ca.with_chain(chain.clone()), chain, None)
            }
            (None, Some(ext)) => {
                let chain = own_chain(&ext.ca_cert_pem, &ext.chain_pem)?;
                let ca = RootCa::without_key(&cluster_id, &ext.ca_cert_pem)
                    .map_err(|e| ManagerError::Invalid(format!("--ca-cert: {e}")))?;
                let record = ExternalCaRecord {
                    protocol: "cfssl".into(),
                    url: ext.url.clone(),
                    tls_roots_pem: ext.tls_roots_pem.clone(),
                };
                let signer = ExternalCa::new(&record, &ext.ca_cert_pem, &ext.auth_key)
                    .map_err(|e| ManagerError::Invalid(format!("--external-ca: {e}")))?;
                (ca.with_chain(chain.clone()), chain, Some((record, signer)))
            }
            (None, None) => (RootCa::generate(&cluster_id)?, String::new(), None),
        };
        let (key, csr) = generate_key_and_csr()?;
        if let Some((_, signer)) = &external {
            signer
                .check_only_authenticated()
                .await
                .map_err(|e| ManagerError::Invalid(format!("--external-ca: {e}")))?;
        }
        let issued = match &external {
            Some((_, signer)) => signer
                .sign(&ca, &csr, &node_id, Role::Manager, opts.cert_expiry.duration())
                .await
                .map_err(|e| ManagerError::Invalid(format!("--external-ca: {e}")))?,
            None => ca.sign_node(&csr, &node_id, Role::Manager, opts.cert_expiry)?,
        };
        let identity = NodeIdentity::new(ca.cert_pem().to_owned(), issued.pem.clone(), key)?;
        identity.save_with(&NodeIdentity::dir(data_dir), Some(&*wrap))?;

        let cid = cluster_id.as_str();
        let seal_token = |role| {
            let t = JoinToken::generate(ca.digest());
            keyring.seal(FIRST_DATA_KEY, &purpose::join_token(cid, role), t.expose().as_bytes())
        };
        let cluster = ClusterRecord {
            id: cluster_id.clone(),
            ca_cert_pem: ca.cert_pem().to_owned(),
            // With an external CA: the signer's auth key instead.
            ca_key: match (ca.key_pem(), &opts.external_ca) {
                (Some(k), _) => keyring.seal(FIRST_DATA_KEY, &purpose::ca_key(cid), k.as_bytes())?,
                (None, Some(ext)) => keyring.seal(FIRST_DATA_KEY, &purpose::ca_key(cid), &ext.auth_key)?,
                (None, None) => return Err(ManagerError::Invalid("the cluster CA has no key".into())),
            },
            worker_token: seal_token(Role::Worker)?,
            manager_token: seal_token(Role::Manager)?,
            data_key_id: FIRST_DATA_KEY,
            data_key_check: None,
            retired_below: 0,
            unlock_key: match &unlock {
                Some(k) => Some(keyring.seal(FIRST_DATA_KEY, &purpose::unlock_key(cid), k.expose())?),
                None => None,
            },
            cert_validity_secs: opts.cert_expiry.duration().as_secs(),
            heartbeat_ms: opts.heartbeat.as_millis() as u64,
            created_at: now_unix(),
        };
        let me = NodeRecord {
            id: node_id.clone(),
            role: Role::Manager,
            status: NodeStatus::Ready,
            addr: advertise.clone(),
            hostname: swarmd_certs::hostname(),
            cert_serial: issued.serial,
            cert_not_after: issued.not_after,
            created_at: now_unix(),
            raft_id: Some(raft_id),
            labels: Default::default(),
            availability: Default::default(),
            session_manager: None,
        };
        let cfg = ManagerConfig {
            node_id,
            cluster_id,
            raft_id,
            listen_addr: bound.to_string(),
            advertise_addr: advertise.clone(),
            control_socket: opts.control_socket.clone().unwrap_or_else(|| data_dir.join("control.sock")),
            raft: opts.raft.clone(),
        };
        let manager = Self::start(cfg, data_dir, identity, (keydir, wrap, unlock), listener, &opts.raft).await?;
        let init = async {
            let members = BTreeMap::from([(raft_id, BasicNode { addr: advertise })]);
            manager.raft.initialize(members).await.map_err(|e| ManagerError::Raft(e.to_string()))?;
            manager.wait_leader(Duration::from_secs(10)).await?;
            let store = Store::new(manager.raft.clone(), manager.view.clone(), manager.applied.clone());
            store.propose(Command::InitCluster { cluster: Box::new(cluster), manager: me }).await?;
            if let Some((record, _)) = external {
                store.propose(Command::SetExternalCa(Box::new(record))).await?;
            }
            if !chain.is_empty() {
                store.propose(Command::SetCaChain { chain_pem: chain }).await?;
            }
            if let Some(ttl) = opts.identity_ttl {
                store.propose(Command::SetIdentityTtl { secs: ttl.duration().as_secs() }).await?;
            }
            if opts.content_trust {
                store.propose(Command::SetContentTrust { required: true }).await?;
            }
            manager.db.flush_async().await.map_err(|e| ManagerError::Raft(e.to_string()))?;
            manager.cfg.save(data_dir)
        };
        if let Err(e) = init.await {
            let _ = manager.raft.shutdown().await;
            return Err(e);
        }
        tracing::info!(cluster.id = %manager.cfg.cluster_id, node.id = %manager.cfg.node_id, "cluster created");
        Ok(manager)
    }

    /// Restarts the manager whose state is in `data_dir`.
    pub async fn open(data_dir: &Path) -> Result<Self, ManagerError> {
        let cfg = ManagerConfig::load(data_dir)?;
        let (keydir, unlocked_with) = match KeyDir::new(data_dir) {
            kd if kd.is_locked() => {
                let (kd, key) = crate::autolock::wait_for_unlock(&cfg, kd).await?;
                (kd, Some(key))
            }
            kd => (kd.loaded()?, None),
        };
        let wrap = Arc::new(NodeKeyWrap::new(keydir.kek_key()?, unlocked_with.is_some()));
        let identity = NodeIdentity::load_with(&NodeIdentity::dir(data_dir), Some(&*wrap))?;
        let listener = bind(&cfg.listen_addr).await?;
        let settings = cfg.raft.clone();
        // No wait for a leader here: a manager that restarts before a majority
        // of the others keeps waiting for them (and says so, see
        // `watch_demotion`) instead of exiting.
        let mut me = Self::start(cfg, data_dir, identity, (keydir, wrap, unlocked_with), listener, &settings).await?;
        me.recover_identity().await?;
        Ok(me)
    }

    async fn start(
        cfg: ManagerConfig,
        data_dir: &Path,
        identity: NodeIdentity,
        (keydir, wrap, unlocked_with): (KeyDir, Arc<NodeKeyWrap>, Option<UnlockKey>),
        listener: TcpListener,
        settings: &RaftSettings,
    ) -> Result<Self, ManagerError> {
        let deny = DenyList::default();
        let creds = Arc::new(TlsCredentials::with_server(identity, deny.clone())?);
        let storage = raft::open_storage(&data_dir.join("raft"))?;
        let db = storage.db.clone();
        let view = storage.sm.view();
        let applied = storage.sm.applied_watch();
        let raft = raft::start(cfg.raft_id, settings, storage, Network::new(creds.client())).await?;
        Ok(Self {
            cfg,
            data_dir: data_dir.to_owned(),
            raft,
            db,
            view,
            creds,
            deny,
            keyring: keydir.load_keyring()?,
            keydir,
            wrap,
            unlocked_with,
            listener,
            applied,
            forget_other_managers: false,
            bootstrap_managers: Default::default(),
            unrecorded: None,
        })
    }

    async fn wait_leader(&self, timeout: Duration) -> Result<(), ManagerError> {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a raft leader")
            .await
            .map_err(|e| ManagerError::Raft(format!("no raft leader: {e}")))?;
        Ok(())
    }

    /// The unlock key of a cluster just created with autolock, to print once.
    pub fn unlock_key(&self) -> Option<zeroize::Zeroizing<String>> {
        self.unlocked_with.as_ref().map(|k| k.text())
    }

    /// The address the manager listens on.
    pub fn listen_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// This manager's configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// Serves until `outer` is cancelled — or until this manager is demoted —
    /// then drains and stops raft.
    pub async fn run(self, outer: CancellationToken) -> Result<RunOutcome, ManagerError> {
        let shutdown = outer.child_token();
        let demotion: Arc<std::sync::Mutex<Option<RunOutcome>>> = Arc::default();
        let peers = Peers::new(self.creds.client());
        let store = Store::new(self.raft.clone(), self.view.clone(), self.applied.clone()).with_peers(peers.clone());
        let secrets = SecretsCache::new(self.view.clone(), self.keyring.clone(), self.keydir.clone());
        let auth =
            Authorizer::new(self.cfg.cluster_id.clone(), self.deny.clone(), self.view.clone(), self.raft.clone());
        auth.set_bootstrap_managers(self.bootstrap_managers.clone());
        let conns = ConnRegistry::default();
        let advertise = self.cfg.advertise_addr.clone();
        let me = self.cfg.node_id.clone();
        let tasks = shutdown.child_token();

        swarmd_certs::spawn_loop("secrets-cache", secrets.clone().follow(self.applied.clone(), tasks.clone()));
        if let Some((serial, not_after)) = self.unrecorded.clone() {
            swarmd_certs::spawn_loop(
                "record-own-cert",
                recover::record_own_cert(store.clone(), me.clone(), serial, not_after, tasks.clone()),
            );
        }
        swarmd_certs::spawn_loop(
            "data-keys",
            crate::rotation::follow_keys(
                store.clone(),
                secrets.clone(),
                peers.clone(),
                self.applied.clone(),
                tasks.clone(),
            ),
        );
        let files = crate::autolock::LockedFiles {
            keydir: self.keydir.clone(),
            wrap: self.wrap.clone(),
            creds: self.creds.clone(),
            certs_dir: NodeIdentity::dir(&self.data_dir),
        };
        swarmd_certs::spawn_loop(
            "autolock",
            crate::autolock::follow_autolock(
                secrets.clone(),
                files,
                self.unlocked_with.clone(),
                self.applied.clone(),
                tasks.clone(),
            ),
        );
        swarmd_certs::spawn_loop(
            "deny-list",
            follow_deny_list(self.view.clone(), self.deny.clone(), conns.clone(), self.applied.clone(), tasks.clone()),
        );
        swarmd_certs::spawn_loop(
            "leader-watch",
            raft::leader_watch::run(self.raft.clone(), self.cfg.raft.clone(), auth.leader_contact(), tasks.clone()),
        );
        if self.forget_other_managers {
            swarmd_certs::spawn_loop(
                "forget-managers",
                forget_other_managers(store.clone(), secrets.clone(), me.clone(), tasks.clone()),
            );
        }
        swarmd_certs::spawn_loop(
            "demotion-watch",
            watch_demotion(
                store.clone(),
                secrets.clone(),
                self.cfg.clone(),
                (
                    self.applied.clone(),
                    crate::membership::Probe { identity: self.creds.identity_watch(), deny: self.deny.clone() },
                ),
                shutdown.clone(),
                demotion.clone(),
            ),
        );
        swarmd_certs::spawn_loop(
            "scheduler",
            crate::scheduler::run(store.clone(), self.applied.clone(), tasks.clone()),
        );
        let blob_dir = self.data_dir.join("blobs");
        let blobs = swarmd_image::BlobStore::open(&blob_dir)
            .map_err(|e| ManagerError::Invalid(format!("blob store {}: {e}", blob_dir.display())))?;
        let images = crate::images::Images::new(store.clone(), blobs, peers.clone(), me.clone());
        swarmd_certs::spawn_loop("images", images.clone().run(tasks.clone()));
        let limits = crate::limits::NodeLimits::from_env();
        let (dispatcher, writer) =
            Dispatcher::new(store.clone(), auth.clone(), secrets.clone(), limits.clone(), me.clone(), images.clone());
        swarmd_certs::spawn_loop("status-writer", writer.run(tasks.clone()));
        swarmd_certs::spawn_loop("liveness", dispatcher.clone().run_checker(tasks.clone()));
        swarmd_certs::spawn_loop(
            "manager-updates",
            dispatcher.clone().run_manager_updates(self.applied.clone(), tasks.clone()),
        );
        swarmd_certs::spawn_loop("manager-probe", dispatcher.clone().run_manager_probe(peers.clone(), tasks.clone()));
        dispatcher.report(me.clone(), NodeStatus::Ready, Some(advertise.clone()));
        let issuer = LocalIssuer { store: store.clone(), secrets: secrets.clone(), node: me.clone() };
        let renewer = Renewer::new(self.creds.clone(), NodeIdentity::dir(&self.data_dir), issuer)
            .with_key_wrap(self.wrap.clone());
        swarmd_certs::spawn_loop(
            "ca-rotation-local",
            crate::ca_rotation::run_local(
                store.clone(),
                me.clone(),
                renewer.control(),
                self.applied.clone(),
                tasks.clone(),
            ),
        );
        swarmd_certs::spawn_loop(
            "ca-rotation",
            crate::ca_rotation::run_leader(store.clone(), secrets.clone(), self.applied.clone(), tasks.clone()),
        );
        swarmd_certs::spawn_loop("cert-renewer", renewer.run(tasks.clone()));

        let sock = &self.cfg.control_socket;
        if sock.exists() {
            std::fs::remove_file(sock).map_err(io_err(sock))?;
        }
        let unix = UnixListener::bind(sock).map_err(io_err(sock))?;
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600)).map_err(io_err(sock))?;

        let server_tls = self.creds.server().expect("managers have server credentials");
        let ca = CaService::new(store.clone(), secrets.clone(), auth.clone(), limits, advertise);
        let control = ControlService::new(
            store.clone(),
            secrets.clone(),
            dispatcher.clone(),
            auth.clone(),
            peers.clone(),
            images.clone(),
        );
        let raft_service = RaftService::new(self.raft.clone(), auth.clone());
        let cluster = ClusterService::new(store.clone(), secrets, auth.clone(), peers, images);
        // Every service but the CA's is gated before a request's body is read
        // (see `auth::Gate`); anonymous clients meet the same gates, on a server
        // of their own that allows them few streams and small windows.
        let gated = |admits| Gate::new(auth.clone(), admits);
        let incoming = tls_incoming(self.listener, server_tls, ConnLimits::default(), conns);
        let nodes = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(NODE_STREAMS)
            .concurrency_limit_per_connection(NODE_CONCURRENCY)
            .initial_connection_window_size(NODE_WINDOW)
            .initial_stream_window_size(NODE_WINDOW / 4)
            .layer(crate::budget::BudgetLayer::new(crate::conn::NODES_BUDGET))
            .add_service(ca.clone())
            .add_service(InterceptedService::new(dispatcher.service(), gated(Admits::Nodes)))
            .add_service(control.clone())
            .add_service(InterceptedService::new(raft_service.clone(), gated(Admits::RaftMembers)))
            .add_service(InterceptedService::new(cluster.clone(), gated(Admits::Managers)))
            .serve_with_incoming_shutdown(incoming.authenticated, shutdown.clone().cancelled_owned());
        let anonymous = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(ANONYMOUS_STREAMS)
            .concurrency_limit_per_connection(ANONYMOUS_CONCURRENCY)
            .initial_stream_window_size(ANONYMOUS_WINDOW)
            .initial_connection_window_size(ANONYMOUS_WINDOW * 2)
            .http2_max_header_list_size(ANONYMOUS_HEADERS)
            .layer(crate::budget::BudgetLayer::new(crate::conn::ANONYMOUS_BUDGET))
            .add_service(ca)
            .add_service(InterceptedService::new(dispatcher.service(), gated(Admits::Nodes)))
            .add_service(control.clone())
            .add_service(InterceptedService::new(raft_service, gated(Admits::RaftMembers)))
            .add_service(InterceptedService::new(cluster, gated(Admits::Managers)))
            .serve_with_incoming_shutdown(incoming.anonymous, shutdown.clone().cancelled_owned());
        let local = Server::builder()
            .add_service(control)
            .add_service(crate::autolock::not_locked_service())
            .serve_with_incoming_shutdown(unix_incoming(unix), shutdown.clone().cancelled_owned());
        tracing::info!(listen = %self.cfg.listen_addr, advertise = %self.cfg.advertise_addr,
            control = %sock.display(), node.id = %self.cfg.node_id, "manager serving");

        let serving = async { tokio::try_join!(nodes, anonymous, local) };
        tokio::pin!(serving);
        let result = tokio::select! {
            r = &mut serving => r.map(|_| ()),
            _ = async {
                shutdown.cancelled().await;
                // Long-lived session streams would hold the drain open: end them.
                dispatcher.close_all();
                tokio::time::sleep(DRAIN).await
            } => Ok(()),
        };
        tasks.cancel();
        let _ = self.raft.shutdown().await;
        let _ = self.db.flush_async().await;
        let _ = std::fs::remove_file(sock);
        tracing::info!("manager stopped");
        result.map_err(ManagerError::from)?;
        let outcome = demotion.lock().expect("demotion lock").take();
        Ok(outcome.unwrap_or(RunOutcome::Stopped))
    }
}

/// Signs this manager's own renewals with the local CA.
struct LocalIssuer {
    store: Store,
    secrets: SecretsCache,
    node: NodeId,
}

impl CertIssuer for LocalIssuer {
    async fn issue(&self, csr_pem: String) -> Result<Renewed, String> {
        let s = self.secrets.get().map_err(|e| e.to_string())?;
        let issued = s.sign_node(&csr_pem, &self.node, Role::Manager).await.map_err(|e| e.to_string())?;
        self.store
            .propose(Command::RecordCert {
                node: self.node.clone(),
                serial: issued.serial,
                not_after: issued.not_after,
                role: Role::Manager,
                at: now_unix(),
            })
            .await
            .map_err(|e| e.to_string())?;
        if let Some(id) = s.rotation {
            self.store
                .propose(Command::CaConverged { node: self.node.clone(), id })
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(Renewed { cert_pem: issued.pem, ca_bundle_pem: Some(s.trust_pem.clone()) })
    }
}
