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
    assert_eq!(device.management, "fully_managed", "the default level");

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

/// `Identity.Authorize` decides a batch against the tenant's policies, in order; a tenant's
/// token asks only about its own tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_decides_batches_against_the_tenants_policies() {
    use std::collections::HashMap;

    use tern_proto::v1::identity_client::IdentityClient;
    use tern_proto::v1::{
        AccessRequest, AuthorizeRequest, Outcome, PolicyEnvironment, PolicyPrincipal,
        PolicyResource,
    };

    let tern = Tern::start();
    let acme = tern.provision("acme", "a");
    let globex = tern.provision("globex", "g");
    let mut client = IdentityClient::connect(format!("http://127.0.0.1:{}", tern.grpc_port))
        .await
        .expect("connect");
    let request = |action: &str, scopes: &[&str], topic: Option<&str>| {
        let (principal, resource) = match topic {
            Some(topic) => (
                PolicyPrincipal {
                    r#type: "device".into(),
                    id: "d1".into(),
                    name: "d1".into(),
                    labels: HashMap::from([("site".to_string(), "berlin".to_string())]),
                    ..Default::default()
                },
                PolicyResource {
                    r#type: "topic".into(),
                    name: topic.into(),
                    ..Default::default()
                },
            ),
            None => (
                PolicyPrincipal {
                    r#type: "client".into(),
                    id: "tern_cl_x".into(),
                    name: "x".into(),
                    ..Default::default()
                },
                PolicyResource {
                    r#type: "tenant".into(),
                    id: "t".into(),
                    name: "acme".into(),
                    ..Default::default()
                },
            ),
        };
        AccessRequest {
            principal: Some(principal),
            action: action.into(),
            resource: Some(resource),
            environment: Some(PolicyEnvironment {
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                source_ip: "10.1.2.3".into(),
                ..Default::default()
            }),
        }
    };
    let batch = AuthorizeRequest {
        tenant_id: "acme".into(),
        requests: vec![
            request("listDevices", &["tern:read"], None),
            request("createDevice", &["tern:read"], None),
            request("publish", &[], Some("telemetry")),
            request("teleport", &[], None),
        ],
    };
    let decisions = client
        .authorize(authed(batch.clone(), &tern.operator_token()))
        .await
        .expect("authorize")
        .into_inner()
        .decisions;
    let outcomes: Vec<i32> = decisions.iter().map(|d| d.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Permit as i32,
            Outcome::NotApplicable as i32,
            Outcome::Permit as i32,
            Outcome::NotApplicable as i32
        ]
    );
    assert_eq!(decisions[0].policies, vec!["api-access-by-scope"]);

    // acme's own API token may ask about acme; globex's may not.
    client
        .authorize(authed(batch.clone(), &acme.api_token))
        .await
        .expect("own tenant");
    let err = client
        .authorize(authed(batch, &globex.api_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let bad = AuthorizeRequest {
        tenant_id: "acme".into(),
        requests: vec![AccessRequest {
            action: "listDevices".into(),
            ..Default::default()
        }],
    };
    let err = client
        .authorize(authed(bad, &acme.api_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("requests[0].principal"),
        "{}",
        err.message()
    );
}

/// The standard health checking protocol answers without credentials (Kubernetes probes have
/// none); reflection needs a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let tern = Tern::start();
    let url = format!("http://127.0.0.1:{}", tern.grpc_port);
    let channel = tern_proto::tonic::transport::Channel::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "tern.v1.Registry", "tern.v1.Identity"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "tern.v1.Nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let refused = reflection
        .server_reflection_info(tokio_stream_once(list()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut answers = reflection
        .server_reflection_info(authed(tokio_stream_once(list()), &tern.operator_token()))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(services)) = answer.message_response else {
        panic!("expected the service list, got {answer:?}");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"tern.v1.Registry".to_string()), "{names:?}");
    assert!(names.contains(&"tern.v1.Identity".to_string()), "{names:?}");
}

fn tokio_stream_once<T: Send + 'static>(item: T) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::once(async move { item })
}

/// gRPC calls inside a tenant are decided by the tenant's policies, with the REST API's
/// actions: a policy that keeps API tokens away from the vault's devices holds over gRPC too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_decided_by_the_tenants_policies() {
    use tern_proto::v1::identity_client::IdentityClient;
    use tern_proto::v1::{GetDeviceRequest, IssueDeviceTokensRequest};

    let tern = Tern::start();
    let p = tern.provision("acme", "lobby");
    tern.cli_json(&[
        "device",
        "create",
        "vault",
        "--tenant",
        "acme",
        "--label",
        "site=vault",
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("vault.cedar");
    std::fs::write(
        &file,
        "forbid (principal is ApiToken, action, resource is Device)\n\
         when { resource.hasTag(\"site\") && resource.getTag(\"site\") == \"vault\" };\n",
    )
    .expect("policy");
    let file = file.display().to_string();
    tern.cli_json(&["policy", "put", "vault", &file, "--tenant", "acme"]);

    let url = format!("http://127.0.0.1:{}", tern.grpc_port);
    let mut registry = RegistryClient::connect(url.clone()).await.expect("connect");
    let mut identity = IdentityClient::connect(url).await.expect("connect");
    let get = |device: &str| {
        authed(
            GetDeviceRequest {
                tenant_id: "acme".into(),
                device_id: device.into(),
            },
            &p.api_token,
        )
    };
    let lobby = registry.get_device(get("lobby")).await.expect("lobby");
    assert_eq!(lobby.into_inner().name, "lobby");
    let err = registry.get_device(get("vault")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("getDevice is forbidden by policy vault"),
        "{err:?}"
    );
    let issue = IssueDeviceTokensRequest {
        tenant_id: "acme".into(),
        device_id: "vault".into(),
    };
    let err = identity
        .issue_device_tokens(authed(issue.clone(), &p.api_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The operator is not governed by tenant policies.
    identity
        .issue_device_tokens(authed(issue, &tern.operator_token()))
        .await
        .expect("the operator may");
}
