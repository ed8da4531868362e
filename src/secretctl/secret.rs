//! `secretctl create | ls | inspect | rm | update` and `keys verify`.

use std::io::Read;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use swarmd_proto::control::{
    CreateSecretRequest, GetSecretRequest, ListSecretsRequest, Secret, UpdateSecretRequest, VerifySecretsRequest,
};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::client::explain;
use super::output::{json, table, timestamp};
use super::Format;

/// `create NAME [FILE|-] [--label K=V]...`
#[derive(Args, Debug)]
pub(super) struct CreateArgs {
    /// The secret's name: 1-64 characters of [a-zA-Z0-9-_.], alphanumeric at both ends.
    name: String,
    /// A file holding the value, or - (the default) for standard input.
    file: Option<String>,
    /// A label, K=V (repeatable).
    #[arg(long = "label", value_parser = super::node::parse_label)]
    labels: Vec<(String, String)>,
}

/// `update NAME [FILE|-]`
#[derive(Args, Debug)]
pub(super) struct UpdateArgs {
    /// The secret's name or ID.
    name: String,
    /// A file holding the new value, or - (the default) for standard input.
    file: Option<String>,
}

/// `ls [--filter label=K[=V]]... [-q]`
#[derive(Args, Debug)]
pub(super) struct LsArgs {
    /// label=K, label=K=V or name=PREFIX (repeatable; all must match).
    #[arg(short, long = "filter")]
    filters: Vec<String>,
    /// Only IDs.
    #[arg(short, long)]
    quiet: bool,
}

/// `keys verify`
#[derive(Subcommand, Debug)]
pub(super) enum KeysCmd {
    /// Open every stored secret version on the manager and report any that fail
    /// their integrity check (values are never shown).
    Verify,
    /// Create a new data key, re-seal every secret and the CA key under it, and
    /// delete the old key from every manager. No downtime.
    Rotate,
}

/// Reads a secret value from `file` (`-` or none: standard input) into memory
/// that is wiped on drop.
///
/// The buffer is allocated once at its largest (one byte over the limit, so
/// that the manager can refuse an oversized value): growing it would leave
/// copies of the value behind in freed memory.
fn read_value(file: Option<&str>) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    const LIMIT: usize = 500 * 1024;
    let mut buf = Zeroizing::new(Vec::with_capacity(LIMIT + 1));
    match file {
        None | Some("-") => {
            std::io::stdin()
                .take(LIMIT as u64 + 1)
                .read_to_end(&mut buf)
                .context("reading the secret value from standard input")?;
        }
        Some(path) => {
            std::fs::File::open(path)
                .and_then(|f| f.take(LIMIT as u64 + 1).read_to_end(&mut buf))
                .with_context(|| format!("reading the secret value from {path}"))?;
        }
    }
    Ok(buf)
}

/// A value handed to prost: wiped when the request is dropped after encoding.
struct Wiped(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn wire(value: Zeroizing<Vec<u8>>) -> bytes::Bytes {
    bytes::Bytes::from_owner(Wiped(value))
}

/// A secret as secretctl prints it.
#[derive(Serialize)]
struct SecretView {
    id: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    created_at: String,
    updated_at: String,
    versions: Vec<VersionView>,
}

#[derive(Serialize)]
struct VersionView {
    version: u32,
    created_at: String,
    size: u64,
    data_key: u32,
}

impl From<Secret> for SecretView {
    fn from(s: Secret) -> Self {
        Self {
            id: s.id,
            name: s.name,
            labels: s.labels.into_iter().collect(),
            created_at: timestamp(s.created_at),
            updated_at: timestamp(s.updated_at),
            versions: s
                .versions
                .into_iter()
                .map(|v| VersionView {
                    version: v.version,
                    created_at: timestamp(v.created_at),
                    size: v.size,
                    data_key: v.key_id,
                })
                .collect(),
        }
    }
}

pub(super) async fn create(channel: Channel, a: CreateArgs) -> anyhow::Result<()> {
    let value = read_value(a.file.as_deref())?;
    let req = CreateSecretRequest { name: a.name, data: wire(value), labels: a.labels.into_iter().collect() };
    let s = super::client::control(channel).create_secret(req).await.map_err(explain)?.into_inner();
    println!("{}", s.id);
    Ok(())
}

pub(super) async fn update(channel: Channel, a: UpdateArgs) -> anyhow::Result<()> {
    let value = read_value(a.file.as_deref())?;
    let req = UpdateSecretRequest { name_or_id: a.name, data: wire(value) };
    let s = super::client::control(channel).update_secret(req).await.map_err(explain)?.into_inner();
    println!("{} version {}", s.id, s.versions.last().map_or(0, |v| v.version));
    Ok(())
}

pub(super) async fn ls(channel: Channel, a: LsArgs, format: Format) -> anyhow::Result<()> {
    let mut req = ListSecretsRequest::default();
    for f in a.filters {
        match f.split_once('=') {
            Some(("label", l)) if !l.is_empty() => req.label_filters.push(l.to_owned()),
            Some(("name", n)) => req.name_prefix = n.to_owned(),
            _ => return Err(anyhow!("invalid filter {f:?}: use label=KEY, label=KEY=VALUE or name=PREFIX")),
        }
    }
    let secrets: Vec<SecretView> = super::client::control(channel)
        .list_secrets(req)
        .await
        .map_err(explain)?
        .into_inner()
        .secrets
        .into_iter()
        .map(Into::into)
        .collect();
    if a.quiet {
        secrets.iter().for_each(|s| println!("{}", s.id));
    } else if format == Format::Json {
        json(&secrets)?;
    } else {
        let rows: Vec<Vec<String>> = secrets
            .iter()
            .map(|s| {
                let v = s.versions.last().map_or(0, |v| v.version);
                vec![s.id.clone(), s.name.clone(), v.to_string(), s.created_at.clone(), s.updated_at.clone()]
            })
            .collect();
        table(&["ID", "NAME", "VERSION", "CREATED", "UPDATED"], &rows);
    }
    Ok(())
}

pub(super) async fn inspect(channel: Channel, names: Vec<String>, format: Format) -> anyhow::Result<()> {
    let mut client = super::client::control(channel);
    let mut out = Vec::new();
    for name in names {
        let s: SecretView =
            client.get_secret(GetSecretRequest { name_or_id: name }).await.map_err(explain)?.into_inner().into();
        out.push(s);
    }
    if format == Format::Json {
        return json(&out);
    }
    for (i, s) in out.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let labels = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        table(
            &["FIELD", "VALUE"],
            &[
                vec!["ID".into(), s.id.clone()],
                vec!["Name".into(), s.name.clone()],
                vec!["Labels".into(), labels],
                vec!["Created".into(), s.created_at.clone()],
                vec!["Updated".into(), s.updated_at.clone()],
            ],
        );
        println!();
        let rows: Vec<Vec<String>> = s
            .versions
            .iter()
            .map(|v| vec![v.version.to_string(), v.created_at.clone(), v.size.to_string(), v.data_key.to_string()])
            .collect();
        table(&["VERSION", "CREATED", "SIZE", "DATA KEY"], &rows);
    }
    Ok(())
}

/// Removes each secret in turn, as Docker does: one failure does not stop the
/// others, and the exit status says whether any failed.
pub(super) async fn rm(channel: Channel, names: Vec<String>) -> anyhow::Result<()> {
    let mut client = super::client::control(channel);
    let mut failed = 0;
    for name in names {
        match client.remove_secret(GetSecretRequest { name_or_id: name.clone() }).await {
            Ok(r) => println!("{}", r.into_inner().id),
            Err(s) => {
                eprintln!("error: {name}: {}", explain(s));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(anyhow!("{failed} secret(s) not removed"));
    }
    Ok(())
}

pub(super) async fn keys(channel: Channel, cmd: KeysCmd, format: Format) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Rotate => {
            let mut req = tonic::Request::new(swarmd_proto::control::RotateDataKeyRequest {});
            req.set_timeout(std::time::Duration::from_secs(600));
            let r = super::client::control(channel).rotate_data_key(req).await.map_err(explain)?.into_inner();
            println!(
                "Data key {} is active; {} values re-sealed; keys below {} retired (every manager deletes them).",
                r.key_id, r.resealed, r.retired_below
            );
            Ok(())
        }
        KeysCmd::Verify => {
            let checks = super::client::control(channel)
                .verify_secrets(VerifySecretsRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .checks;
            let bad: Vec<_> = checks.iter().filter(|c| !c.error.is_empty()).collect();
            if format == Format::Json {
                #[derive(Serialize)]
                struct Check<'a> {
                    id: &'a str,
                    name: &'a str,
                    version: u32,
                    data_key: u32,
                    error: &'a str,
                }
                let all: Vec<Check> = checks
                    .iter()
                    .map(|c| Check {
                        id: &c.id,
                        name: &c.name,
                        version: c.version,
                        data_key: c.key_id,
                        error: &c.error,
                    })
                    .collect();
                json(&all)?;
            } else {
                let rows: Vec<Vec<String>> = checks
                    .iter()
                    .map(|c| {
                        let status = if c.error.is_empty() { "ok".to_string() } else { c.error.clone() };
                        vec![c.id.clone(), c.name.clone(), c.version.to_string(), c.key_id.to_string(), status]
                    })
                    .collect();
                table(&["ID", "NAME", "VERSION", "DATA KEY", "STATUS"], &rows);
            }
            if !bad.is_empty() {
                return Err(anyhow!("{} of {} secret versions failed their integrity check", bad.len(), checks.len()));
            }
            Ok(())
        }
    }
}
