//! Control RPCs on services: create, update, list, get, remove, tasks, logs.

use tonic::{Request, Response, Status};

use crate::state::Command;
use swarmd_proto::control::control_client::ControlClient;

use crate::service_api;
use swarmd_proto::control::{
    CreateServiceRequest, GetServiceRequest, ListServicesRequest, ListServicesResponse, LogLine, RemoveServiceResponse,
    Service, ServiceLogsRequest, ServiceLogsResponse, ServiceTasksResponse, UpdateServiceRequest,
};

use super::{internal, ControlService};

/// Administrator only.
pub(super) async fn create_service(
    ctl: &ControlService,
    req: Request<CreateServiceRequest>,
) -> Result<Response<Service>, Status> {
    Ok(Response::new(service_api::create(&ctl.store, req.into_inner()).await?))
}

/// Administrator only.
pub(super) async fn update_service(
    ctl: &ControlService,
    req: Request<UpdateServiceRequest>,
) -> Result<Response<Service>, Status> {
    Ok(Response::new(service_api::update(&ctl.store, req.into_inner()).await?))
}

/// Administrator only.
pub(super) async fn list_services(
    ctl: &ControlService,
    _req: Request<ListServicesRequest>,
) -> Result<Response<ListServicesResponse>, Status> {
    let view = ctl.store.view();
    let running = service_api::running_counts(view);
    let mut services: Vec<Service> = view
        .services()
        .map_err(internal)?
        .into_iter()
        .map(|s| {
            let n = running.get(&s.id).copied().unwrap_or(0);
            service_api::to_wire(s, n)
        })
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Response::new(ListServicesResponse { services }))
}

/// Administrator only.
pub(super) async fn get_service(
    ctl: &ControlService,
    req: Request<GetServiceRequest>,
) -> Result<Response<Service>, Status> {
    let s = service_api::find(ctl.store.view(), &req.get_ref().name_or_id)?;
    let n = service_api::running_counts(ctl.store.view()).get(&s.id).copied().unwrap_or(0);
    Ok(Response::new(service_api::to_wire(s, n)))
}

/// Administrator only. Its tasks are stopped.
pub(super) async fn remove_service(
    ctl: &ControlService,
    req: Request<GetServiceRequest>,
) -> Result<Response<RemoveServiceResponse>, Status> {
    let s = service_api::find(ctl.store.view(), &req.get_ref().name_or_id)?;
    ctl.store.propose(Command::RemoveService { id: s.id.clone() }).await?;
    tracing::info!(service.id = %s.id, service.name = %s.name, "service removed");
    Ok(Response::new(RemoveServiceResponse { id: s.id.to_string() }))
}

/// Administrator only.
pub(super) async fn service_tasks(
    ctl: &ControlService,
    req: Request<GetServiceRequest>,
) -> Result<Response<ServiceTasksResponse>, Status> {
    Ok(Response::new(ServiceTasksResponse { tasks: service_api::tasks(ctl.store.view(), &req.get_ref().name_or_id)? }))
}

/// Administrator only. Gathers the output each manager holds for the
/// sessions of the nodes running the service's tasks.
pub(super) async fn service_logs(
    ctl: &ControlService,
    req: Request<ServiceLogsRequest>,
) -> Result<Response<ServiceLogsResponse>, Status> {
    let view = ctl.store.view();
    let svc = service_api::find(view, &req.get_ref().name_or_id)?;
    let mut tasks: Vec<_> = view.tasks().map_err(internal)?.into_iter().filter(|t| t.service == svc.id).collect();
    tasks.sort_by_key(|t| (t.slot, t.created_at));
    let mut lines = Vec::new();
    for t in &tasks {
        for line in ctl.dispatcher.task_logs(&t.id) {
            lines.push(LogLine { task_id: t.id.to_string(), slot: t.slot, line });
        }
    }
    if !req.get_ref().local_only {
        let me = ctl.store.view().managers().map_err(internal)?;
        let my_addr = me.iter().find(|m| m.id == *ctl.dispatcher.me()).map(|m| m.addr.clone());
        for addr in view.manager_addrs().map_err(internal)?.into_iter().filter(|a| Some(a) != my_addr.as_ref()) {
            let mut c = ControlClient::new(ctl.peers.channel(&addr));
            let ask = ServiceLogsRequest { name_or_id: svc.id.to_string(), local_only: true };
            if let Ok(Ok(r)) = tokio::time::timeout(std::time::Duration::from_secs(2), c.service_logs(ask)).await {
                lines.extend(r.into_inner().lines);
            }
        }
    }
    Ok(Response::new(ServiceLogsResponse { lines }))
}
