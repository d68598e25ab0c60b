//! The `tern.v1.Registry` gRPC service over [`Registry`].

use std::sync::Arc;

use tern_core::{Caller, Device, NewDevice, Tenant};
use tern_proto::tonic::{Request, Response, Status};
use tern_proto::v1::{self, registry_server};
use tern_proto::{caller, require_operator, status_from};

use crate::{Registry, RegistryError};

#[derive(Clone)]
pub struct RegistryGrpc {
    registry: Arc<Registry>,
}

impl RegistryGrpc {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }

    pub fn into_server(self) -> registry_server::RegistryServer<Self> {
        registry_server::RegistryServer::new(self)
    }
}

fn status(e: RegistryError) -> Status {
    status_from(e.code(), e.to_string())
}

impl RegistryGrpc {
    async fn tenant_id<T>(&self, req: &Request<T>, reference: &str) -> Result<String, Status> {
        request_tenant_id(&self.registry, req, reference).await
    }
}

/// The tenant id a gRPC request names, resolved for its caller (tenant tokens reach only their
/// own); shared by every gRPC service that works inside a tenant.
pub async fn request_tenant_id<T>(
    registry: &Registry,
    req: &Request<T>,
    reference: &str,
) -> Result<String, Status> {
    let tenant = registry
        .tenant_for(caller(req)?, reference)
        .await
        .map_err(status)?;
    Ok(tenant.id.to_string())
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
            .registry
            .tenant_for(caller(&req)?, &req.get_ref().tenant_id)
            .await
            .map_err(status)?;
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
        let tenant = self.tenant_id(&req, &req.get_ref().tenant_id).await?;
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
        let tenant = self.tenant_id(&req, &req.get_ref().tenant_id).await?;
        let d = self
            .registry
            .device(&tenant, &req.get_ref().device_id)
            .await
            .map_err(status)?;
        Ok(Response::new(device_out(d)))
    }

    async fn list_devices(
        &self,
        req: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        let tenant = self.tenant_id(&req, &req.get_ref().tenant_id).await?;
        let devices = self.registry.list_devices(&tenant).await.map_err(status)?;
        Ok(Response::new(v1::ListDevicesResponse {
            devices: devices.into_iter().map(device_out).collect(),
        }))
    }

    async fn delete_device(
        &self,
        req: Request<v1::DeleteDeviceRequest>,
    ) -> Result<Response<v1::DeleteDeviceResponse>, Status> {
        let tenant = self.tenant_id(&req, &req.get_ref().tenant_id).await?;
        self.registry
            .delete_device(&tenant, &req.get_ref().device_id)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::DeleteDeviceResponse {}))
    }
}
