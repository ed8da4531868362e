//! `secretctl node ls | inspect`.

use clap::Subcommand;
use serde::Serialize;
use swarmd_proto::control::{GetNodeRequest, ListNodesRequest, Node, RemoveNodeRequest, UpdateNodeRequest};
use tonic::transport::Channel;

use super::client::explain;
use super::output::{json, table, timestamp};
use super::Format;

#[derive(Subcommand, Debug)]
pub(super) enum NodeCmd {
    /// List nodes.
    Ls {
        /// Only IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show one node (ID, unique ID prefix or hostname).
    Inspect { node: String },
    /// Make a worker a manager (it joins raft by itself).
    Promote { node: String },
    /// Make a manager a worker; refused if the managers left would lose quorum.
    Demote { node: String },
    /// Remove a node and refuse its certificate from now on.
    Rm {
        node: String,
        /// Remove it even if it is ready.
        #[arg(short, long)]
        force: bool,
    },
    /// Change a node's availability or labels.
    Update {
        node: String,
        /// active or drain.
        #[arg(long, value_parser = ["active", "drain"])]
        availability: Option<String>,
        /// Add or replace a label, K=V (repeatable).
        #[arg(long = "label-add", value_parser = parse_label)]
        label_add: Vec<(String, String)>,
        /// Remove a label by key (repeatable).
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
    },
}

pub(super) fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("invalid label {s:?}: expected KEY=VALUE")),
    }
}

/// A node as secretctl prints it.
#[derive(Serialize)]
struct NodeView {
    id: String,
    hostname: String,
    role: String,
    status: String,
    addr: String,
    cert_serial: String,
    cert_expiry: String,
    cert_not_after: i64,
    created_at: String,
    availability: String,
    labels: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raft_id: Option<String>,
    leader: bool,
    session: Option<SessionView>,
}

#[derive(Serialize)]
struct SessionView {
    id: String,
    since: String,
    last_heartbeat: String,
}

impl From<Node> for NodeView {
    fn from(n: Node) -> Self {
        let session = (!n.session_id.is_empty()).then(|| SessionView {
            id: n.session_id,
            since: timestamp(n.session_since),
            last_heartbeat: timestamp(n.last_heartbeat),
        });
        Self {
            cert_expiry: timestamp(n.cert_not_after),
            created_at: timestamp(n.created_at),
            id: n.id,
            hostname: n.hostname,
            role: n.role,
            status: n.status,
            addr: n.addr,
            cert_serial: n.cert_serial,
            cert_not_after: n.cert_not_after,
            availability: n.availability,
            labels: n.labels.into_iter().collect(),
            raft_id: (n.raft_id != 0).then(|| format!("{:016x}", n.raft_id)),
            leader: n.leader,
            session,
        }
    }
}

pub(super) async fn run(channel: Channel, cmd: NodeCmd, format: Format) -> anyhow::Result<()> {
    let mut client = super::client::control(channel);
    match cmd {
        NodeCmd::Ls { quiet } => {
            let nodes: Vec<NodeView> = client
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .nodes
                .into_iter()
                .map(Into::into)
                .collect();
            if quiet {
                nodes.iter().for_each(|n| println!("{}", n.id));
            } else if format == Format::Json {
                json(&nodes)?;
            } else {
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|n| {
                        let role = if n.leader { format!("{} (leader)", n.role) } else { n.role.clone() };
                        vec![
                            n.id.clone(),
                            n.hostname.clone(),
                            role,
                            n.status.clone(),
                            n.availability.clone(),
                            n.addr.clone(),
                            n.cert_expiry.clone(),
                        ]
                    })
                    .collect();
                table(&["ID", "HOSTNAME", "ROLE", "STATUS", "AVAILABILITY", "ADDRESS", "CERT EXPIRES"], &rows);
            }
        }
        NodeCmd::Inspect { node } => {
            let n: NodeView =
                client.get_node(GetNodeRequest { id_or_prefix: node }).await.map_err(explain)?.into_inner().into();
            if format == Format::Json {
                json(&n)?;
            } else {
                let s = n.session.as_ref();
                let rows = vec![
                    vec!["ID".into(), n.id.clone()],
                    vec!["Hostname".into(), n.hostname.clone()],
                    vec!["Role".into(), n.role.clone()],
                    vec!["Status".into(), n.status.clone()],
                    vec!["Address".into(), n.addr.clone()],
                    vec!["Certificate serial".into(), n.cert_serial.clone()],
                    vec!["Certificate expires".into(), n.cert_expiry.clone()],
                    vec!["Joined".into(), n.created_at.clone()],
                    vec!["Availability".into(), n.availability.clone()],
                    vec![
                        "Labels".into(),
                        n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                    ],
                    vec!["Session".into(), s.map(|s| s.id.clone()).unwrap_or_else(|| "-".into())],
                    vec!["Last heartbeat".into(), s.map(|s| s.last_heartbeat.clone()).unwrap_or_else(|| "-".into())],
                ];
                table(&["FIELD", "VALUE"], &rows);
            }
        }
        NodeCmd::Promote { node } => {
            let n = client.promote_node(GetNodeRequest { id_or_prefix: node }).await.map_err(explain)?.into_inner();
            println!("Node {} promoted to a manager in the cluster.", n.id);
        }
        NodeCmd::Demote { node } => {
            let n = client.demote_node(GetNodeRequest { id_or_prefix: node }).await.map_err(explain)?.into_inner();
            println!("Manager {} demoted in the cluster.", n.id);
        }
        NodeCmd::Rm { node, force } => {
            let r = client
                .remove_node(RemoveNodeRequest { id_or_prefix: node, force })
                .await
                .map_err(explain)?
                .into_inner();
            println!("{}", r.id);
        }
        NodeCmd::Update { node, availability, label_add, label_rm } => {
            let req = UpdateNodeRequest {
                id_or_prefix: node,
                availability: availability.unwrap_or_default(),
                labels_add: label_add.into_iter().collect(),
                labels_rm: label_rm,
            };
            let n = client.update_node(req).await.map_err(explain)?.into_inner();
            println!("{}", n.id);
        }
    }
    Ok(())
}
