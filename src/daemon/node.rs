//! Every role transition of a node, in one place: a manager's join (the
//! certificate from `swarmd_certs::join`, then `Manager::join`), a worker's
//! promotion to manager, a manager's demotion to worker, a removal, and a
//! restart in whichever role the data dir holds. The manager and worker
//! crates know nothing of each other: this module carries a node between them.

use std::path::Path;

use anyhow::Context;
use swarmd_certs::join::{renew_as_manager, request_certificate, Issued};
use swarmd_certs::{JoinToken, NodeIdentity, Role};
use swarmd_manager::{Demotion, JoinOptions, Manager, RunOutcome};
use swarmd_worker::{Worker, WorkerConfig, WorkerOutcome};
use tokio_util::sync::CancellationToken;

use super::{shutdown_on_signal, DataDirLock};

/// `swarmd manager join`: checks the data dir and binds the listener, then
/// asks for a manager certificate with the token, then joins raft and runs.
pub(super) async fn join_manager(
    opts: JoinOptions,
    token: JoinToken,
    shutdown: CancellationToken,
) -> anyhow::Result<RunOutcome> {
    let remotes = opts.remotes.clone();
    let site = Manager::prepare_join(opts).await?;
    let issued = request_certificate(&token, &remotes, &swarmd_certs::hostname(), Role::Manager)
        .await
        .map_err(|e| swarmd_manager::ManagerError::Join(e.to_string()))?;
    drop(token);
    Ok(Manager::join(site, issued, shutdown).await?)
}

/// A worker that was promoted (`secretctl node promote`) becomes a manager:
/// renews into a manager certificate, takes the data key, joins raft.
/// `manager.json` replaces `worker.json` once it is a voter.
async fn promote(data_dir: &Path, shutdown: CancellationToken) -> anyhow::Result<RunOutcome> {
    let worker = WorkerConfig::load(data_dir)?;
    let current = NodeIdentity::load(&NodeIdentity::dir(data_dir))?;
    let (addr, identity) = renew_as_manager(&current, &worker.remotes)
        .await
        .map_err(|e| swarmd_manager::ManagerError::Join(format!("no manager renewed the certificate: {e}")))?;
    let opts = JoinOptions {
        remotes: worker.remotes.clone(),
        data_dir: data_dir.to_owned(),
        listen_addr: worker.listen_addr.clone().unwrap_or_else(|| "0.0.0.0:4242".into()),
        advertise_addr: None,
        control_socket: None,
        raft: Default::default(),
        promoted_from: Some(data_dir.join(swarmd_worker::CONFIG_FILE)),
    };
    let site = Manager::prepare_join(opts).await?;
    let issued = Issued { identity, addr, managers: worker.remotes, manager_ids: worker.managers };
    Ok(Manager::join(site, issued, shutdown).await?)
}

/// Rewrites a demoted manager's data dir as a worker's: certificate and
/// `worker.json` first, then the manager's config, keys and raft store are
/// erased (`swarmd_manager::erase_manager_state`: the manager's node key is
/// replaced by the worker's, and every file of `keys/` is overwritten in place
/// before it is unlinked, so the disk keeps no key a manager held).
fn demote(data_dir: &Path, d: &Demotion) -> anyhow::Result<()> {
    d.identity.save(&NodeIdentity::dir(data_dir))?;
    let worker = WorkerConfig {
        node_id: d.identity.info.node_id.clone(),
        cluster_id: d.identity.info.cluster_id.clone(),
        remotes: d.remotes.clone(),
        listen_addr: Some(d.listen_addr.clone()),
        runtime: None,
        managers: d.managers.clone(),
    };
    worker.save(data_dir)?;
    swarmd_manager::erase_manager_state(data_dir)?;
    Ok(())
}

/// What happens after a manager stops: nothing, or — if it was demoted — its
/// data dir becomes a worker's and this process re-executes as `swarmd run`.
pub(super) async fn after_manager(
    data_dir: &Path,
    outcome: RunOutcome,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match outcome {
        RunOutcome::Stopped => Ok(()),
        RunOutcome::Removed => {
            swarmd_manager::erase_removed(data_dir).context("cannot erase the removed manager's keys and state")?;
            anyhow::bail!(
                "this manager was removed from the cluster while it was down (its peers refuse this node: a \
                 `swarmd manager recover --force-new-cluster` on another manager dropped it); its keys and state \
                 in {} are erased: to come back, join again from an empty data dir with a manager token \
                 (`secretctl join-token manager` on a manager)",
                data_dir.display()
            )
        }
        RunOutcome::Demoted(d) => {
            demote(data_dir, &d).context("cannot turn the demoted manager into a worker")?;
            println!("This node was demoted; it now runs as a worker.");
            use std::os::unix::process::CommandExt;
            let err =
                std::process::Command::new(std::env::current_exe()?).arg("run").arg("--data-dir").arg(data_dir).exec();
            Err(anyhow::Error::new(err).context("cannot restart as a worker"))
        }
    }
}

/// What happens after a worker stops: nothing, or — if it was promoted — it
/// becomes a manager in this process.
pub(super) async fn after_worker(
    data_dir: &Path,
    outcome: WorkerOutcome,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match outcome {
        WorkerOutcome::Stopped => Ok(()),
        WorkerOutcome::Removed => anyhow::bail!(
            "this node was removed from the cluster (secretctl node rm): its tasks are stopped and its secrets \
             wiped; to come back, join again from an empty data dir with a new token"
        ),
        WorkerOutcome::Promoted => {
            let outcome = promote(data_dir, shutdown.clone()).await.context("promotion to manager failed")?;
            Box::pin(after_manager(data_dir, outcome, shutdown)).await
        }
    }
}

/// A worker whose certificate expired while it was off, or whose cluster
/// rotated its root meanwhile, recovers it (no token: it proves it holds its
/// key) before it starts; one clear line if the cluster refuses (removed, past
/// the recovery window). While no manager answers it keeps asking. Returns
/// false if shut down meanwhile.
async fn recover_worker(data_dir: &Path, shutdown: &CancellationToken) -> anyhow::Result<bool> {
    use swarmd_certs::join::JoinError;
    let mut cfg = WorkerConfig::load(data_dir)?;
    let dir = NodeIdentity::dir(data_dir);
    let current = NodeIdentity::load(&dir)?;
    let mut backoff =
        swarmd_certs::renew::Backoff::new(std::time::Duration::from_secs(1), std::time::Duration::from_secs(30));
    loop {
        match swarmd_certs::recover::refresh(&current, &cfg.remotes).await {
            Ok(None) => return Ok(true),
            Ok(Some(r)) => {
                r.identity.save(&dir)?;
                if !r.managers.is_empty() {
                    cfg.remotes = r.managers;
                    cfg.managers = r.manager_ids;
                    cfg.save(data_dir)?;
                }
                tracing::info!(serial = %r.identity.info.serial, "certificate recovered");
                println!("This node's certificate was recovered ({}).", r.identity.info.node_id);
                return Ok(true);
            }
            Err(JoinError::Refused { reason, .. }) => anyhow::bail!(
                "this node cannot come back with its certificate: {reason}; to rejoin, run `swarmd worker join` \
                 from an empty data dir with a new token"
            ),
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = wait.as_secs_f64(), "certificate expired; no manager recovered it yet");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Ok(false),
                }
            }
        }
    }
}

pub(super) async fn run_existing(data_dir: &Path) -> anyhow::Result<()> {
    let is_node = [swarmd_manager::CONFIG_FILE, swarmd_worker::CONFIG_FILE].iter().any(|f| data_dir.join(f).exists());
    // Held for the node's life, through a promotion; released by a demotion's
    // re-execution, which takes it again.
    let mut _lock = None;
    if is_node {
        // State an older version left readable by others is narrowed first.
        swarmd_certs::restrict_tree(data_dir).context("cannot make the data dir private")?;
        _lock = Some(DataDirLock::acquire(data_dir)?);
    }
    if data_dir.join(swarmd_manager::CONFIG_FILE).exists() {
        let m = Manager::open(data_dir).await.context("cannot start the manager")?;
        let shutdown = shutdown_on_signal();
        after_manager(data_dir, m.run(shutdown.clone()).await?, shutdown).await?;
    } else if data_dir.join(swarmd_worker::CONFIG_FILE).exists() {
        let shutdown = shutdown_on_signal();
        if !recover_worker(data_dir, &shutdown).await? {
            return Ok(());
        }
        after_worker(data_dir, Worker::open(data_dir)?.run(shutdown.clone()).await?, shutdown).await?;
    } else {
        anyhow::bail!(
            "{} holds no swarmd node; create one with `swarmd manager init` or `swarmd worker join`",
            data_dir.display()
        );
    }
    Ok(())
}
