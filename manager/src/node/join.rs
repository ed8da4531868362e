//! A manager's join: into an empty data dir with a manager token, or as a
//! promoted worker. The root package's `node` module obtains the certificate
//! (`swarmd_certs::join`); this takes the data key and joins raft.

use std::sync::Arc;
use std::time::Duration;

use swarmd_certs::join::Issued;
use swarmd_certs::{NodeIdentity, Role};
use swarmd_proto::cluster::cluster_client::ClusterClient;
use swarmd_proto::cluster::{GetDataKeyRequest, JoinRaftRequest};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{bind, check_fresh, io_err, Manager, CREATED};
use crate::autolock::NodeKeyWrap;
use crate::config::{default_advertise, JoinOptions, ManagerConfig, CONFIG_FILE};
use crate::keys::{KeyDir, Keyring};
use crate::membership::RunOutcome;
use crate::ManagerError;

impl Manager {
    /// First half of a manager join, before any certificate is asked for:
    /// checks that the data dir holds no node (other than the worker being
    /// promoted, [`JoinOptions::promoted_from`]) and binds the listen address.
    pub async fn prepare_join(opts: JoinOptions) -> Result<JoinSite, ManagerError> {
        if opts.promoted_from.is_none() {
            check_fresh(&opts.data_dir)?;
        }
        let listener = bind(&opts.listen_addr).await?;
        std::fs::create_dir_all(&opts.data_dir).map_err(io_err(&opts.data_dir))?;
        Ok(JoinSite { opts, listener })
    }

    /// Second half of a manager join, with a manager certificate issued (by a
    /// manager token through [`swarmd_certs::join::request_certificate`], or
    /// by a promoted worker's renewal): takes the data key over mTLS, joins
    /// raft as a learner and, once caught up, as a voter, then writes
    /// `manager.json` (and removes the promoted worker's config). Runs until
    /// `shutdown`. On failure, removes what it created.
    pub async fn join(site: JoinSite, issued: Issued, shutdown: CancellationToken) -> Result<RunOutcome, ManagerError> {
        let JoinSite { opts, listener } = site;
        if issued.identity.info.role != Role::Manager {
            return Err(ManagerError::Join("the issued certificate is not a manager certificate".into()));
        }
        let result = Self::join_in(&opts, listener, issued, shutdown.clone()).await;
        if let Err(e) = &result {
            shutdown.cancel();
            if !opts.data_dir.join(CONFIG_FILE).exists() {
                // A promoted worker keeps its certificates.
                let created: &[&str] = if opts.promoted_from.is_some() { &["keys", "raft"] } else { &CREATED };
                for d in created {
                    let _ = std::fs::remove_dir_all(opts.data_dir.join(d));
                }
            }
            tracing::debug!(error = %e, "manager join failed");
        }
        result
    }

    async fn join_in(
        opts: &JoinOptions,
        listener: TcpListener,
        issued: Issued,
        shutdown: CancellationToken,
    ) -> Result<RunOutcome, ManagerError> {
        let data_dir = &opts.data_dir;
        let bound = listener.local_addr().map_err(io_err(data_dir))?;
        let advertise = opts.advertise_addr.clone().unwrap_or_else(|| default_advertise(bound));
        let cfg = Arc::new(swarmd_certs::tls::client_config(&issued.identity)?);
        let chan = swarmd_certs::dial::connect(&issued.addr, cfg)
            .await
            .map_err(|e| ManagerError::Join(format!("cannot reach {}: {e}", issued.addr)))?;
        let mut cluster = ClusterClient::new(chan);
        let handed = cluster
            .get_data_key(GetDataKeyRequest {})
            .await
            .map_err(|s| {
                ManagerError::Join(format!("the manager at {} refused the data key: {}", issued.addr, s.message()))
            })?
            .into_inner();
        let key = zeroize::Zeroizing::new(handed.key);
        let bootstrap_managers = handed.manager_ids.iter().filter_map(|m| m.parse().ok()).collect();
        let denied = swarmd_certs::tls::Denied {
            nodes: handed.denied_nodes.iter().filter_map(|n| n.parse().ok()).collect(),
            serials: handed.denied_serials.into_iter().collect(),
        };
        let keyring = Keyring::decode(&key).ok_or_else(|| ManagerError::Join("malformed data keys".into()))?;
        drop(key);
        KeyDir::new(data_dir).create(&keyring)?;
        let keydir = KeyDir::new(data_dir).loaded()?;
        let wrap = Arc::new(NodeKeyWrap::new(keydir.kek_key()?, false));
        issued.identity.save(&NodeIdentity::dir(data_dir))?;
        let raft_id = random_raft_id();
        let cfg = ManagerConfig {
            node_id: issued.identity.info.node_id.clone(),
            cluster_id: issued.identity.info.cluster_id.clone(),
            raft_id,
            listen_addr: bound.to_string(),
            advertise_addr: advertise.clone(),
            control_socket: opts.control_socket.clone().unwrap_or_else(|| data_dir.join("control.sock")),
            raft: opts.raft.clone(),
        };
        let mut manager =
            Self::start(cfg.clone(), data_dir, issued.identity, (keydir, wrap, None), listener, &opts.raft).await?;
        manager.bootstrap_managers = bootstrap_managers;
        manager.deny.extend(denied);
        let run = tokio::spawn(manager.run(shutdown.clone()));
        if let Err(s) = join_raft(&mut cluster, raft_id, &advertise).await {
            shutdown.cancel();
            let _ = run.await;
            return Err(ManagerError::Join(format!("could not join raft: {}", s.message())));
        }
        cfg.save(data_dir)?;
        // A promoted worker stops being one only now.
        if let Some(worker_config) = &opts.promoted_from {
            let _ = std::fs::remove_file(worker_config);
        }
        tracing::info!(node.id = %cfg.node_id, raft_id, "joined the cluster as a manager");
        println!("This node joined the cluster as a manager ({}).", cfg.node_id);
        run.await.map_err(|e| ManagerError::Join(format!("manager task failed: {e}")))?
    }
}

/// A checked data dir and a bound listener: a manager join half done
/// ([`Manager::prepare_join`]).
pub struct JoinSite {
    opts: JoinOptions,
    listener: TcpListener,
}

/// Asks to become a raft voter, again while the answer is UNAVAILABLE (no
/// leader yet, a leader change, another manager's join under way), with
/// jittered pauses, for at most [`JOIN_RAFT_TIME`].
async fn join_raft(
    cluster: &mut ClusterClient<tonic::transport::Channel>,
    raft_id: u64,
    advertise: &str,
) -> Result<(), tonic::Status> {
    let deadline = tokio::time::Instant::now() + JOIN_RAFT_TIME;
    let mut pause = Duration::from_millis(200);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut req =
            tonic::Request::new(JoinRaftRequest { raft_id, addr: advertise.to_owned(), node_id: String::new() });
        req.set_timeout(left.max(Duration::from_secs(1)));
        match cluster.join_raft(req).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() + pause < deadline => {
                tracing::info!(reason = %s.message(), "joining raft: retrying");
                tokio::time::sleep(pause + Duration::from_millis(rand::random::<u64>() % pause.as_millis() as u64))
                    .await;
                pause = (pause * 2).min(Duration::from_secs(3));
            }
            Err(s) => return Err(s),
        }
    }
}

/// How long a manager join may take to become a voter, retries included.
const JOIN_RAFT_TIME: Duration = Duration::from_secs(150);

pub(super) fn random_raft_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}
