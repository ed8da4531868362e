//! `secretctl service create | ls | ps | inspect | logs | rm | update`.

use clap::Subcommand;
use serde::Serialize;
use swarmd_proto::control::{
    CreateServiceRequest, GetServiceRequest, ListServicesRequest, SecretReference, Service, ServiceLogsRequest,
    UpdateServiceRequest,
};
use tonic::transport::Channel;

use super::client::explain;
use super::output::{json, table, timestamp};
use super::Format;

#[derive(Subcommand, Debug)]
pub(super) enum ServiceCmd {
    /// Create a service: replicas of a command in a container on the workers.
    Create {
        /// The service's name.
        name: String,
        /// An image loaded into the cluster: NAME[:TAG], NAME@sha256:… or
        /// sha256:… (pinned to its digest now). A root filesystem directory
        /// on the workers only where the cluster allows it (development).
        #[arg(long)]
        image: String,
        /// A secret: SRC[@VERSION][,target=T][,uid=U][,gid=G][,mode=M] (repeatable).
        #[arg(long = "secret", value_parser = super::secret_ref::parse)]
        secrets: Vec<SecretReference>,
        /// Replicas to run.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// node.id|node.hostname|node.role|node.labels.K, == or !=, a value (repeatable).
        #[arg(long = "constraint")]
        constraints: Vec<String>,
        /// UID[:GID] of the workload [default: 65534:65534].
        #[arg(long)]
        user: Option<String>,
        /// K=V environment entries (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Memory limit in bytes.
        #[arg(long)]
        memory: Option<i64>,
        /// Process limit.
        #[arg(long)]
        pids: Option<i64>,
        /// none (a private network namespace) or host.
        #[arg(long, default_value = "none", value_parser = ["none", "host"])]
        network: String,
        /// host: share the host's user namespace (task uid N is host uid N,
        /// shared with every host process of that uid) instead of a user
        /// namespace of the task's own [default: private].
        #[arg(long, value_parser = ["private", "host"])]
        userns: Option<String>,
        /// A privileged container (refused by this cluster's policy).
        #[arg(long)]
        privileged: bool,
        /// Add a capability (refused by this cluster's policy).
        #[arg(long = "cap-add")]
        cap_add: Vec<String>,
        /// The command and its arguments, after -- (default: the image's
        /// entrypoint and cmd; required with a directory).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List services.
    Ls {
        /// Only IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List a service's tasks with their nodes and states.
    Ps { service: String },
    /// Show a service.
    Inspect { service: String },
    /// Print the output of a service's tasks (kept in memory on the managers).
    Logs { service: String },
    /// Remove services; their tasks stop.
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Change a service's image, secrets or replica count.
    Update {
        service: String,
        /// A new image (pinned to its digest now); its tasks are replaced.
        #[arg(long)]
        image: Option<String>,
        /// Add a secret reference (same syntax as create; repeatable).
        #[arg(long = "secret-add", value_parser = super::secret_ref::parse)]
        secret_add: Vec<SecretReference>,
        /// Remove a secret reference by secret name, ID or target (repeatable).
        #[arg(long = "secret-rm")]
        secret_rm: Vec<String>,
        /// New replica count.
        #[arg(long)]
        replicas: Option<u32>,
    },
}

#[derive(Serialize)]
struct ServiceView {
    id: String,
    name: String,
    image: String,
    image_digest: String,
    command: Vec<String>,
    env: Vec<String>,
    user: String,
    secrets: Vec<String>,
    replicas: u32,
    running: u32,
    constraints: Vec<String>,
    memory: i64,
    pids: i64,
    network: String,
    userns: String,
    version: u64,
    created_at: String,
    updated_at: String,
}

impl From<Service> for ServiceView {
    fn from(s: Service) -> Self {
        Self {
            created_at: timestamp(s.created_at),
            updated_at: timestamp(s.updated_at),
            id: s.id,
            name: s.name,
            image: s.image,
            image_digest: s.image_digest,
            command: s.args,
            env: s.env,
            user: if s.user.is_empty() { "65534:65534".into() } else { s.user },
            secrets: s.secrets.iter().map(super::secret_ref::text).collect(),
            replicas: s.replicas,
            running: s.running,
            constraints: s.constraints,
            memory: s.memory,
            pids: s.pids,
            network: s.network,
            userns: s.userns,
            version: s.version,
        }
    }
}

pub(super) async fn run(channel: Channel, cmd: ServiceCmd, format: Format) -> anyhow::Result<()> {
    let mut client = super::client::control(channel);
    match cmd {
        ServiceCmd::Create {
            name,
            image,
            secrets,
            replicas,
            constraints,
            user,
            env,
            memory,
            pids,
            network,
            userns,
            privileged,
            cap_add,
            command,
        } => {
            let req = CreateServiceRequest {
                name,
                image,
                args: command,
                env,
                user: user.unwrap_or_default(),
                secrets,
                replicas,
                constraints,
                memory: memory.unwrap_or(0),
                pids: pids.unwrap_or(0),
                network,
                privileged,
                cap_add,
                userns: userns.unwrap_or_default(),
                ..Default::default()
            };
            let s = client.create_service(req).await.map_err(explain)?.into_inner();
            println!("{}", s.id);
        }
        ServiceCmd::Ls { quiet } => {
            let list = client.list_services(ListServicesRequest {}).await.map_err(explain)?.into_inner().services;
            let list: Vec<ServiceView> = list.into_iter().map(Into::into).collect();
            if quiet {
                list.iter().for_each(|s| println!("{}", s.id));
            } else if format == Format::Json {
                json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.clone(),
                            s.name.clone(),
                            format!("{}/{}", s.running, s.replicas),
                            s.image.clone(),
                            s.secrets.join(" "),
                        ]
                    })
                    .collect();
                table(&["ID", "NAME", "REPLICAS", "IMAGE", "SECRETS"], &rows);
            }
        }
        ServiceCmd::Ps { service } => {
            let tasks = client
                .service_tasks(GetServiceRequest { name_or_id: service })
                .await
                .map_err(explain)?
                .into_inner()
                .tasks;
            if format == Format::Json {
                #[derive(Serialize)]
                struct T<'a> {
                    id: &'a str,
                    name: String,
                    node_id: &'a str,
                    node: &'a str,
                    desired: &'a str,
                    state: &'a str,
                    message: &'a str,
                    updated_at: String,
                }
                let v: Vec<T> = tasks
                    .iter()
                    .map(|t| T {
                        id: &t.id,
                        name: format!("{}.{}", t.service, t.slot),
                        node_id: &t.node_id,
                        node: &t.node_hostname,
                        desired: &t.desired,
                        state: &t.state,
                        message: &t.message,
                        updated_at: timestamp(t.updated_at),
                    })
                    .collect();
                json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = tasks
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            format!("{}.{}", t.service, t.slot),
                            t.node_hostname.clone(),
                            t.desired.clone(),
                            t.state.clone(),
                            t.message.clone(),
                        ]
                    })
                    .collect();
                table(&["ID", "NAME", "NODE", "DESIRED", "STATE", "MESSAGE"], &rows);
            }
        }
        ServiceCmd::Inspect { service } => {
            let s: ServiceView = client
                .get_service(GetServiceRequest { name_or_id: service })
                .await
                .map_err(explain)?
                .into_inner()
                .into();
            if format == Format::Json {
                json(&s)?;
            } else {
                table(
                    &["FIELD", "VALUE"],
                    &[
                        vec!["ID".into(), s.id.clone()],
                        vec!["Name".into(), s.name.clone()],
                        vec!["Image".into(), s.image.clone()],
                        vec!["Image digest".into(), s.image_digest.clone()],
                        vec!["Command".into(), s.command.join(" ")],
                        vec!["User".into(), s.user.clone()],
                        vec!["Secrets".into(), s.secrets.join(" ")],
                        vec!["Replicas".into(), format!("{} running of {}", s.running, s.replicas)],
                        vec!["Constraints".into(), s.constraints.join(" ")],
                        vec!["Network".into(), s.network.clone()],
                        vec!["User namespace".into(), s.userns.clone()],
                        vec!["Version".into(), s.version.to_string()],
                        vec!["Updated".into(), s.updated_at.clone()],
                    ],
                );
            }
        }
        ServiceCmd::Logs { service } => {
            let lines = client
                .service_logs(ServiceLogsRequest { name_or_id: service.clone(), local_only: false })
                .await
                .map_err(explain)?
                .into_inner()
                .lines;
            for l in lines {
                println!("{}.{}.{}    | {}", service, l.slot, &l.task_id[..l.task_id.len().min(12)], l.line);
            }
        }
        ServiceCmd::Rm { services } => {
            let mut failed = 0;
            for s in services {
                match client.remove_service(GetServiceRequest { name_or_id: s.clone() }).await {
                    Ok(r) => println!("{}", r.into_inner().id),
                    Err(e) => {
                        eprintln!("error: {s}: {}", explain(e));
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} service(s) not removed");
            }
        }
        ServiceCmd::Update { service, image, secret_add, secret_rm, replicas } => {
            let req = UpdateServiceRequest {
                name_or_id: service,
                secret_add,
                secret_rm,
                replicas,
                image,
                ..Default::default()
            };
            let s = client.update_service(req).await.map_err(explain)?.into_inner();
            println!("{}", s.id);
        }
    }
    Ok(())
}
