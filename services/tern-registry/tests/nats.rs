//! Routing over a real nats-server: two bridge endpoints (as two bridge processes would have),
//! each holding its own devices, and the registry's router sending to them.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, json};
use tern_core::{Command, CommandId, CommandState, DeviceId, TenantId};
use tern_eventlog::testing::eventually;
use tern_registry::nats::{
    DevicePresence, LocalRoutes, NatsConfig, NatsEndpoint, NatsRouter, TakenOver,
};
use tern_registry::testing::NatsServer;
use tern_registry::{AccessRevoked, CommandRoute, DesiredState, TwinRoute};

/// A bridge's local routes that record what reached them and take every command.
#[derive(Default)]
struct Recorder {
    commands: Mutex<Vec<(TenantId, DeviceId, CommandId)>>,
    twins: Mutex<Vec<(DeviceId, u64)>>,
    revoked: Mutex<Vec<DeviceId>>,
    taken_over: Mutex<Vec<DeviceId>>,
}

impl TakenOver for Recorder {
    fn taken_over(&self, _: TenantId, device: DeviceId) {
        self.taken_over.lock().unwrap().push(device);
    }
}

#[async_trait]
impl CommandRoute for Recorder {
    async fn deliver(&self, command: &Command) -> bool {
        self.commands
            .lock()
            .unwrap()
            .push((command.tenant_id, command.device_id, command.id));
        true
    }
}

#[async_trait]
impl TwinRoute for Recorder {
    async fn desired_changed(&self, _: TenantId, device: DeviceId, state: &DesiredState) {
        self.twins.lock().unwrap().push((device, state.version));
    }
}

#[async_trait]
impl AccessRevoked for Recorder {
    async fn access_revoked(&self, _: TenantId, device: DeviceId) {
        self.revoked.lock().unwrap().push(device);
    }
}

struct Bridge {
    endpoint: NatsEndpoint,
    seen: Arc<Recorder>,
}

async fn bridge(config: &NatsConfig) -> Bridge {
    let seen = Arc::new(Recorder::default());
    let local = LocalRoutes {
        commands: seen.clone(),
        twins: seen.clone(),
        access: seen.clone(),
        takeover: seen.clone(),
    };
    let client = config.connect().await.unwrap();
    Bridge {
        endpoint: NatsEndpoint::start(client, config, local),
        seen,
    }
}

fn command(tenant: TenantId, device: DeviceId) -> Command {
    Command {
        id: CommandId::new(),
        tenant_id: tenant,
        device_id: device,
        name: "reboot".into(),
        payload: json!({}),
        state: CommandState::Pending,
        created_at_ms: 0,
        expires_at_ms: i64::MAX,
        idempotency_key: None,
        result: None,
        history: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_twins_and_revocations_reach_only_the_bridge_holding_the_device() {
    let server = NatsServer::start();
    let config = NatsConfig {
        url: server.url.clone(),
        request_timeout_ms: 500,
        ..NatsConfig::default()
    };
    let router = NatsRouter::new(config.connect().await.unwrap(), &config);
    let (a, b) = (bridge(&config).await, bridge(&config).await);
    let tenant = TenantId::random();
    let (on_a, on_b, offline) = (DeviceId::random(), DeviceId::random(), DeviceId::random());
    a.endpoint.attached(tenant, on_a);
    b.endpoint.attached(tenant, on_b);

    let to_a = command(tenant, on_a);
    assert!(eventually(async || router.deliver(&to_a).await).await);
    let to_b = command(tenant, on_b);
    assert!(router.deliver(&to_b).await);
    assert_eq!(*a.seen.commands.lock().unwrap(), [(tenant, on_a, to_a.id)]);
    assert_eq!(*b.seen.commands.lock().unwrap(), [(tenant, on_b, to_b.id)]);

    // Nobody holds it: "no responders", at once; the registry keeps the command pending.
    assert!(!router.deliver(&command(tenant, offline)).await);

    let state = DesiredState {
        version: 7,
        desired: Map::new(),
    };
    router.desired_changed(tenant, on_b, &state).await;
    router.access_revoked(tenant, on_a).await;
    assert!(eventually(async || b.seen.twins.lock().unwrap().as_slice() == [(on_b, 7)]).await);
    assert!(eventually(async || a.seen.revoked.lock().unwrap().as_slice() == [on_a]).await);
    assert!(a.seen.twins.lock().unwrap().is_empty());
    assert!(b.seen.revoked.lock().unwrap().is_empty());

    // A device that reconnects here before its old connection ended stays held until both end.
    a.endpoint.attached(tenant, on_a);
    a.endpoint.detached(tenant, on_a);
    assert!(router.deliver(&command(tenant, on_a)).await);
    a.endpoint.detached(tenant, on_a);
    assert!(eventually(async || !router.deliver(&command(tenant, on_a)).await).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connecting_to_another_bridge_is_let_go_by_the_first() {
    let server = NatsServer::start();
    let config = NatsConfig {
        url: server.url.clone(),
        ..NatsConfig::default()
    };
    let router = NatsRouter::new(config.connect().await.unwrap(), &config);
    let (first, second) = (bridge(&config).await, bridge(&config).await);
    let tenant = TenantId::random();
    let (roaming, staying) = (DeviceId::random(), DeviceId::random());
    first.endpoint.attached(tenant, roaming);
    first.endpoint.attached(tenant, staying);
    assert!(eventually(async || router.deliver(&command(tenant, staying)).await).await);

    second.endpoint.attached(tenant, roaming);
    assert!(
        eventually(async || first.seen.taken_over.lock().unwrap().as_slice() == [roaming]).await
    );
    assert!(
        second.seen.taken_over.lock().unwrap().is_empty(),
        "not by its own announcement"
    );
    // The first bridge's connection ends (as the takeover closes it): commands find the second.
    first.endpoint.detached(tenant, roaming);
    let reaches_second = async || {
        router.deliver(&command(tenant, roaming)).await;
        let seen = second.seen.commands.lock().unwrap();
        seen.iter().any(|(_, device, _)| *device == roaming)
    };
    assert!(eventually(reaches_second).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_naming_another_device_than_its_subject_is_refused() {
    let server = NatsServer::start();
    let config = NatsConfig {
        url: server.url.clone(),
        ..NatsConfig::default()
    };
    let bridge = bridge(&config).await;
    let tenant = TenantId::random();
    let (held, other) = (DeviceId::random(), DeviceId::random());
    bridge.endpoint.attached(tenant, held);
    let raw = config.connect().await.unwrap();
    let forged = serde_json::to_vec(&command(tenant, other)).unwrap();
    let subject = format!("tern.device.{tenant}.{held}.command");
    let answer = eventually(async || {
        raw.request(subject.clone(), Bytes::from(forged.clone()))
            .await
            .is_ok_and(|reply| reply.payload.as_ref() == b"not-taken")
    })
    .await;
    assert!(answer, "the holder answers, and refuses");
    let garbage = raw
        .request(subject, Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    assert_eq!(garbage.payload.as_ref(), b"not-taken");
    assert!(bridge.seen.commands.lock().unwrap().is_empty());
}

#[test]
fn bad_settings_name_the_key() {
    let bad_prefix = NatsConfig {
        subject_prefix: "tern.prod".into(),
        ..NatsConfig::default()
    };
    assert_eq!(
        bad_prefix.validate().unwrap_err().0,
        "routing.nats.subject_prefix"
    );
    let no_timeout = NatsConfig {
        request_timeout_ms: 0,
        ..NatsConfig::default()
    };
    assert_eq!(
        no_timeout.validate().unwrap_err().0,
        "routing.nats.request_timeout_ms"
    );
    assert!(NatsConfig::default().validate().is_ok());
    let key = |config: NatsConfig| config.validate().unwrap_err().0;
    let user_alone = NatsConfig {
        user: Some("tern".into()),
        ..NatsConfig::default()
    };
    assert_eq!(key(user_alone), "routing.nats.password_file");
    let token_and_user = NatsConfig {
        token_file: Some("/run/secrets/token".into()),
        user: Some("tern".into()),
        password_file: Some("/run/secrets/password".into()),
        ..NatsConfig::default()
    };
    assert_eq!(key(token_and_user), "routing.nats.token_file");
    let cert_alone = NatsConfig {
        cert_file: Some("/run/secrets/tls.crt".into()),
        ..NatsConfig::default()
    };
    assert_eq!(key(cert_alone), "routing.nats.key_file");
}

#[tokio::test]
async fn an_unreadable_secret_names_its_key_before_connecting() {
    let config = NatsConfig {
        token_file: Some("/nonexistent/nats.token".into()),
        ..NatsConfig::default()
    };
    let err = config.connect().await.unwrap_err().to_string();
    assert!(
        err.starts_with("`routing.nats.token_file`: cannot read /nonexistent/nats.token"),
        "{err}"
    );
}
