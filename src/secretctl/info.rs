//! `secretctl info`: the manager's view of raft, and a digest of its state.

use serde::Serialize;
use swarmd_proto::control::InfoRequest;
use tonic::transport::Channel;

use super::client::explain;
use super::output::{json, table};
use super::Format;

#[derive(Serialize)]
struct InfoView {
    node_id: String,
    cluster_id: String,
    raft_id: String,
    raft_state: String,
    leader_raft_id: String,
    term: u64,
    last_log_index: u64,
    last_applied: u64,
    snapshot_index: u64,
    voters: Vec<String>,
    state_digest: String,
}

pub(super) async fn run(channel: Channel, format: Format) -> anyhow::Result<()> {
    let i = super::client::control(channel).info(InfoRequest {}).await.map_err(explain)?.into_inner();
    let v = InfoView {
        node_id: i.node_id,
        cluster_id: i.cluster_id,
        raft_id: i.raft_id,
        raft_state: i.state,
        leader_raft_id: i.leader_raft_id,
        term: i.term,
        last_log_index: i.last_log_index,
        last_applied: i.last_applied,
        snapshot_index: i.snapshot_index,
        voters: i.voters,
        state_digest: i.state_digest,
    };
    if format == Format::Json {
        return json(&v);
    }
    let rows = vec![
        vec!["Node".into(), v.node_id],
        vec!["Cluster".into(), v.cluster_id],
        vec!["Raft ID".into(), v.raft_id],
        vec!["Raft state".into(), v.raft_state],
        vec!["Leader".into(), if v.leader_raft_id.is_empty() { "none".into() } else { v.leader_raft_id }],
        vec!["Term".into(), v.term.to_string()],
        vec!["Last log index".into(), v.last_log_index.to_string()],
        vec!["Last applied".into(), v.last_applied.to_string()],
        vec!["Snapshot index".into(), v.snapshot_index.to_string()],
        vec!["Voters".into(), v.voters.join(",")],
        vec!["State digest".into(), v.state_digest],
    ];
    table(&["FIELD", "VALUE"], &rows);
    Ok(())
}
