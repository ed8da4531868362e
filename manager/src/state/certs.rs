//! Certificates as the replicated state tracks them: every manager certificate
//! still valid (so that demotion can refuse each one the node holds; worker
//! certificates need no record, removal refuses a node ID as a whole, and so a
//! worker's renewals never grow the state), admin certificates (listed and
//! revoked by operators), and the deny-list by serial.
//!
//! | key                       | value |
//! |---------------------------|-------|
//! | `cert/<node>/<serial>`    | [`CertEntry`]: a manager certificate not yet expired |
//! | `admincert/<serial>`      | [`AdminCertRecord`] |
//! | `denyserial/<serial>`     | refused until (unix seconds, the certificate's NotAfter) |
//!
//! Entries carry their NotAfter and are pruned against the time a command
//! carries (never the applying manager's clock, so every manager prunes alike).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use swarmd_certs::tls::Denied;
use swarmd_certs::{NodeId, Role};

use super::nodes::DENY_PREFIX;
use super::{encode, Command, Missing, Rejection, StateError, StateView, WriteBatch};

/// A node certificate the CA issued that has not expired yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertEntry {
    /// The role it was issued for (its OU).
    pub role: Role,
    /// Its NotAfter, unix seconds.
    pub not_after: i64,
}

/// An operator's admin certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminCertRecord {
    /// Serial, lowercase hex.
    pub serial: String,
    /// Its CN.
    pub id: NodeId,
    /// When it was issued, unix seconds.
    pub issued_at: i64,
    /// Its NotAfter, unix seconds.
    pub not_after: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

const CERT_PREFIX: &str = "cert/";
const ADMIN_CERT_PREFIX: &str = "admincert/";
const DENY_SERIAL_PREFIX: &str = "denyserial/";

fn cert_key(node: &NodeId, serial: &str) -> Vec<u8> {
    format!("{CERT_PREFIX}{node}/{serial}").into_bytes()
}
fn admin_cert_key(serial: &str) -> Vec<u8> {
    format!("{ADMIN_CERT_PREFIX}{serial}").into_bytes()
}
fn deny_serial_key(serial: &str) -> Vec<u8> {
    format!("{DENY_SERIAL_PREFIX}{serial}").into_bytes()
}

/// A serial as the CA writes them: 1–64 lowercase hex digits.
pub fn check_serial(serial: &str) -> Result<(), String> {
    if !serial.is_empty() && serial.len() <= 64 && serial.chars().all(|c| c.is_ascii_hexdigit() && !c.is_uppercase()) {
        Ok(())
    } else {
        Err(format!(
            "invalid certificate serial {:?}: give the lowercase hex serial `secretctl admin-cert ls` shows",
            serial.chars().take(70).collect::<String>()
        ))
    }
}

impl StateView {
    /// The unexpired certificates recorded for `node`, by serial.
    pub fn node_certs(&self, node: &NodeId) -> Result<Vec<(String, CertEntry)>, StateError> {
        let prefix = format!("{CERT_PREFIX}{node}/");
        let mut out = Vec::new();
        for serial in self.scan_key_suffixes(&prefix)? {
            if let Some(e) = self.get::<CertEntry>(&cert_key(node, &serial))? {
                out.push((serial, e));
            }
        }
        Ok(out)
    }

    /// Every admin certificate recorded (expired ones are pruned as new ones are issued).
    pub fn admin_certs(&self) -> Result<Vec<AdminCertRecord>, StateError> {
        self.scan(ADMIN_CERT_PREFIX)
    }

    /// One admin certificate.
    pub fn admin_cert(&self, serial: &str) -> Result<Option<AdminCertRecord>, StateError> {
        self.get(&admin_cert_key(serial))
    }

    /// Everything refused at the handshake and by every RPC: removed nodes and
    /// revoked certificates.
    pub fn denied(&self) -> Result<Denied, StateError> {
        let mut nodes = HashSet::new();
        for id in self.scan_key_suffixes(DENY_PREFIX)? {
            if let Ok(id) = id.parse() {
                nodes.insert(id);
            }
        }
        let serials = self.scan_key_suffixes(DENY_SERIAL_PREFIX)?.into_iter().collect();
        Ok(Denied { nodes, serials })
    }
}

/// Records a certificate issued to `node` for `role`, and forgets the node's
/// certificates that expired before `at`. A manager certificate issued to a
/// node that is no longer a manager (a renewal that raced its demotion) is
/// refused from the start.
pub(super) fn record_cert(
    view: &StateView,
    batch: &mut WriteBatch,
    node: &NodeId,
    current_role: Role,
    (serial, role, not_after): (&str, Role, i64),
    at: i64,
) -> Result<(), StateError> {
    for (old, e) in view.node_certs(node)? {
        if e.not_after < at {
            batch.remove(cert_key(node, &old));
        }
    }
    match (role, current_role) {
        (Role::Manager, Role::Manager) => batch.insert(cert_key(node, serial), encode(&CertEntry { role, not_after })),
        (Role::Manager, _) => batch.insert(deny_serial_key(serial), encode(&not_after)),
        _ => {}
    }
    Ok(())
}

/// Refuses every manager certificate `node` still holds (it was demoted).
pub(super) fn deny_manager_certs(view: &StateView, batch: &mut WriteBatch, node: &NodeId) -> Result<(), StateError> {
    for (serial, e) in view.node_certs(node)? {
        if e.role == Role::Manager {
            batch.insert(deny_serial_key(&serial), encode(&e.not_after));
            batch.remove(cert_key(node, &serial));
        }
    }
    Ok(())
}

/// Forgets the certificates of a removed node (its node ID is denied as a whole).
pub(super) fn forget_node_certs(view: &StateView, batch: &mut WriteBatch, node: &NodeId) -> Result<(), StateError> {
    for (serial, _) in view.node_certs(node)? {
        batch.remove(cert_key(node, &serial));
    }
    Ok(())
}

/// The admin certificate commands of [`super::plan`]: `RecordAdminCert`,
/// `RevokeAdminCert`. (Node certificates are recorded by the node commands.)
pub(super) fn plan_certs(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    let mut batch = WriteBatch::default();
    let planned = match cmd {
        Command::RecordAdminCert(rec) => record_admin_cert(view, &mut batch, rec)?,
        Command::RevokeAdminCert { serial, at } => revoke_admin_cert(view, &mut batch, serial, *at)?,
        _ => unreachable!("not a certificate command"),
    };
    Ok(planned.map(|()| batch))
}

/// Records an admin certificate; prunes admin records and serial denials that
/// expired before it was issued.
fn record_admin_cert(
    view: &StateView,
    batch: &mut WriteBatch,
    rec: &AdminCertRecord,
) -> Result<Result<(), Rejection>, StateError> {
    if check_serial(&rec.serial).is_err() {
        return Ok(Err(Rejection::InvalidSerial { serial: rec.serial.chars().take(70).collect() }));
    }
    if view.admin_cert(&rec.serial)?.is_some() {
        return Ok(Err(Rejection::AdminCertExists { serial: rec.serial.clone() }));
    }
    for old in view.admin_certs()? {
        if old.not_after < rec.issued_at {
            batch.remove(admin_cert_key(&old.serial));
        }
    }
    prune_denied_serials(view, batch, rec.issued_at)?;
    batch.insert(admin_cert_key(&rec.serial), encode(rec));
    Ok(Ok(()))
}

/// Revokes admin certificate `serial` at `at`.
fn revoke_admin_cert(
    view: &StateView,
    batch: &mut WriteBatch,
    serial: &str,
    at: i64,
) -> Result<Result<(), Rejection>, StateError> {
    let Some(mut rec) = view.admin_cert(serial)? else {
        return Ok(Err(Missing::AdminCert { serial: serial.to_owned() }.into()));
    };
    if rec.revoked_at.is_none() {
        rec.revoked_at = Some(at);
        batch.insert(admin_cert_key(serial), encode(&rec));
    }
    batch.insert(deny_serial_key(serial), encode(&rec.not_after));
    Ok(Ok(()))
}

fn prune_denied_serials(view: &StateView, batch: &mut WriteBatch, at: i64) -> Result<(), StateError> {
    for serial in view.scan_key_suffixes(DENY_SERIAL_PREFIX)? {
        if view.get::<i64>(&deny_serial_key(&serial))?.is_some_and(|until| until < at) {
            batch.remove(deny_serial_key(&serial));
        }
    }
    Ok(())
}
