//! The `tern.v1.Registry` gRPC service over [`Registry`]. Every call inside a tenant is
//! decided by the tenant's policies ([`GrpcPolicy`]), with the REST API's actions.

use std::sync::Arc;

use tern_core::{Caller, Device, NewDevice, Tenant};
use tern_proto::tonic::{Request, Response, Status};
use tern_proto::v1::{self, registry_server};
use tern_proto::{caller, require_operator, status_from};

use crate::{Registry, RegistryError};

/// Asks the tenant's policies whether a gRPC call may do `action` (an action of the policy
/// schema, as in the REST API) on the tenant, or on `device`. The identity service implements
/// it: it knows the caller (from the request's extensions) and holds the PDP.
#[tonic::async_trait]
pub trait GrpcPolicy: Send + Sync {
    async fn check(
        &self,
        extensions: &tonic::Extensions,
        tenant: &Tenant,
        action: &'static str,
        device: Option<&Device>,
    ) -> Result<(), Status>;
}

#[derive(Clone)]
pub struct RegistryGrpc {
    registry: Arc<Registry>,
    policy: Arc<dyn GrpcPolicy>,
}

impl RegistryGrpc {
    pub fn new(registry: Arc<Registry>, policy: Arc<dyn GrpcPolicy>) -> Self {
        Self { registry, policy }
    }

    pub fn into_server(self) -> registry_server::RegistryServer<Self> {
        registry_server::RegistryServer::new(self)
    }
}

fn status(e: RegistryError) -> Status {
    status_from(e.code(), e.to_string())
}

impl RegistryGrpc {
    async fn tenant<T>(
        &self,
        req: &Request<T>,
        reference: &str,
        action: &'static str,
    ) -> Result<Tenant, Status> {
        authorized_tenant(&self.registry, &*self.policy, req, reference, action).await
    }

    async fn device<T>(
        &self,
        req: &Request<T>,
        reference: &str,
        device: &str,
        action: &'static str,
    ) -> Result<Device, Status> {
        authorized_device(
            &self.registry,
            &*self.policy,
            req,
            (reference, device),
            action,
        )
        .await
    }
}

/// The tenant a gRPC request names, resolved for its caller (tenant tokens reach only their
/// own), once `policy` allows `action` on it; shared by every gRPC service inside a tenant.
pub async fn authorized_tenant<T>(
    registry: &Registry,
    policy: &dyn GrpcPolicy,
    req: &Request<T>,
    reference: &str,
    action: &'static str,
) -> Result<Tenant, Status> {
    let tenant = registry
        .tenant_for(caller(req)?, reference)
        .await
        .map_err(status)?;
    policy
        .check(req.extensions(), &tenant, action, None)
        .await?;
    Ok(tenant)
}

/// A device (`(tenant, device)` references) of a gRPC request's tenant, once `policy`
/// allows `action` on it.
pub async fn authorized_device<T>(
    registry: &Registry,
    policy: &dyn GrpcPolicy,
    req: &Request<T>,
    (tenant, device): (&str, &str),
    action: &'static str,
) -> Result<Device, Status> {
    let tenant = registry
        .tenant_for(caller(req)?, tenant)
        .await
        .map_err(status)?;
    let device = registry
        .device_of(tenant.id, device)
        .await
        .map_err(status)?;
    policy
        .check(req.extensions(), &tenant, action, Some(&device))
        .await?;
    Ok(device)
}

fn tenant_out(t: Tenant) -> v1::Tenant {
    v1::Tenant {
        id: t.id.to_string(),
        name: t.name,
        created_at_ms: t.created_at_ms,
    }
}

fn device_out(d: Device) -> v1::Device {
    v1::Device {
        id: d.id.to_string(),
        tenant_id: d.tenant_id.to_string(),
        name: d.name,
        labels: d.labels.into_iter().collect(),
        hardware_id: d.hardware_id.unwrap_or_default(),
        created_at_ms: d.created_at_ms,
        disabled: d.disabled,
        management: d.management.as_str().to_string(),
        owner: d.owner.unwrap_or_default(),
        groups: d.groups.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl registry_server::Registry for RegistryGrpc {
    async fn create_tenant(
        &self,
        req: Request<v1::CreateTenantRequest>,
    ) -> Result<Response<v1::Tenant>, Status> {
        require_operator(&req)?;
        let t = self
            .registry
            .create_tenant(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(tenant_out(t)))
    }

    async fn get_tenant(
        &self,
        req: Request<v1::GetTenantRequest>,
    ) -> Result<Response<v1::Tenant>, Status> {
        let t = self
            .tenant(&req, &req.get_ref().tenant_id, "getTenant")
            .await?;
        Ok(Response::new(tenant_out(t)))
    }

    async fn list_tenants(
        &self,
        req: Request<v1::ListTenantsRequest>,
    ) -> Result<Response<v1::ListTenantsResponse>, Status> {
        let tenants = match caller(&req)? {
            Caller::Operator => self.registry.list_tenants().await.map_err(status)?,
            Caller::Tenant(own) => vec![
                self.registry
                    .tenant(&own.to_string())
                    .await
                    .map_err(status)?,
            ],
        };
        Ok(Response::new(v1::ListTenantsResponse {
            tenants: tenants.into_iter().map(tenant_out).collect(),
        }))
    }

    async fn delete_tenant(
        &self,
        req: Request<v1::DeleteTenantRequest>,
    ) -> Result<Response<v1::DeleteTenantResponse>, Status> {
        require_operator(&req)?;
        self.registry
            .delete_tenant(&req.into_inner().tenant_id)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::DeleteTenantResponse {}))
    }

    async fn create_device(
        &self,
        req: Request<v1::CreateDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        let tenant = self
            .tenant(&req, &req.get_ref().tenant_id, "createDevice")
            .await?
            .id
            .to_string();
        let req = req.into_inner();
        let new = NewDevice {
            name: req.name,
            labels: req.labels.into_iter().collect(),
            hardware_id: Some(req.hardware_id).filter(|h| !h.is_empty()),
            ..NewDevice::default()
        };
        let d = self
            .registry
            .create_device(&tenant, new)
            .await
            .map_err(status)?;
        Ok(Response::new(device_out(d)))
    }

    async fn get_device(
        &self,
        req: Request<v1::GetDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        let r = req.get_ref();
        let d = self
            .device(&req, &r.tenant_id, &r.device_id, "getDevice")
            .await?;
        Ok(Response::new(device_out(d)))
    }

    async fn list_devices(
        &self,
        req: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        let tenant = self
            .tenant(&req, &req.get_ref().tenant_id, "listDevices")
            .await?;
        let devices = self
            .registry
            .list_devices(&tenant.id.to_string())
            .await
            .map_err(status)?;
        Ok(Response::new(v1::ListDevicesResponse {
            devices: devices.into_iter().map(device_out).collect(),
        }))
    }

    async fn delete_device(
        &self,
        req: Request<v1::DeleteDeviceRequest>,
    ) -> Result<Response<v1::DeleteDeviceResponse>, Status> {
        let r = req.get_ref();
        let d = self
            .device(&req, &r.tenant_id, &r.device_id, "deleteDevice")
            .await?;
        self.registry
            .delete_device(&d.tenant_id.to_string(), &d.id.to_string())
            .await
            .map_err(status)?;
        Ok(Response::new(v1::DeleteDeviceResponse {}))
    }
}
