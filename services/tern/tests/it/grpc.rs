//! The gRPC API on its own port: authenticated by the same tokens, with tenant isolation.

use tern_proto::tonic::metadata::MetadataValue;
use tern_proto::tonic::{Code, Request};
use tern_proto::v1::registry_client::RegistryClient;
use tern_proto::v1::{CreateDeviceRequest, CreateTenantRequest, ListDevicesRequest};

use crate::harness::Tern;

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut req = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("metadata");
    req.metadata_mut().insert("authorization", value);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_over_grpc_with_tokens() {
    let tern = Tern::start();
    let mut client = RegistryClient::connect(format!("http://127.0.0.1:{}", tern.grpc_port))
        .await
        .expect("connect");

    let err = client
        .create_tenant(CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let op = tern.operator_token();
    let tenant = client
        .create_tenant(authed(
            CreateTenantRequest {
                name: "acme".into(),
            },
            &op,
        ))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(tenant.name, "acme");
    let device = client
        .create_device(authed(
            CreateDeviceRequest {
                tenant_id: "acme".into(),
                name: "d1".into(),
                ..Default::default()
            },
            &op,
        ))
        .await
        .expect("device")
        .into_inner();
    assert_eq!(device.tenant_id, tenant.id);

    let err = client
        .create_device(authed(
            CreateDeviceRequest {
                tenant_id: "acme".into(),
                name: "d1".into(),
                ..Default::default()
            },
            &op,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    tern.cli_json(&["tenant", "create", "globex"]);
    let api = tern.cli_json(&["token", "api", "--tenant", "globex"]);
    let globex_token = api["token"].as_str().expect("token");
    let err = client
        .list_devices(authed(
            ListDevicesRequest {
                tenant_id: "acme".into(),
            },
            globex_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .create_tenant(authed(
            CreateTenantRequest {
                name: "evil".into(),
            },
            globex_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "tenant tokens cannot create tenants"
    );
    let devices = client
        .list_devices(authed(
            ListDevicesRequest {
                tenant_id: "acme".into(),
            },
            &op,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(devices.devices.len(), 1);
}
