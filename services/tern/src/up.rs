//! `tern up`: every service in one process on embedded storage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tern_analytics::Ingest;
use tern_analytics::alerts::Alerts;
use tern_analytics::jobs::Jobs;
use tern_analytics::retention::Retention;
use tern_analytics::rules::webhooks::Webhooks;
use tern_analytics::rules::{Republish, RuleEngine, RuleServices, Rules};
use tern_bridge::{
    Bridge, BridgeServices, Listeners, TenantCaVerifier, TlsReloader, websocket_routes,
};
use tern_core::TenantId;
use tern_eventlog::{EmbeddedLog, EmbeddedLogConfig, EventLog, KafkaLog};
use tern_gateway::{Gateway, GatewayServices};
use tern_identity::{Identity, IdentityGrpc, grpc_auth};
use tern_registry::nats::{NatsEndpoint, NatsRouter};
use tern_registry::ota::{Artifacts, Campaigns};
use tern_registry::{Commands, Registry, RegistryGrpc, Twins};
use tern_runtime::{MetricsRegistry, Shutdown, logging, shutdown_signal};
use tern_store::{EmbeddedStore, RemoteStore, Store};
use tokio::net::{TcpListener, UdpSocket};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::cli::UpArgs;
use crate::config::{EventLogBackend, RoutingBackend, UpConfig};

fn open_event_log(config: &UpConfig) -> anyhow::Result<Arc<dyn EventLog>> {
    Ok(match config.eventlog.backend {
        EventLogBackend::Embedded => {
            let dir = config.data_dir.join("log");
            Arc::new(
                EmbeddedLog::open(EmbeddedLogConfig {
                    partitions: config.eventlog.partitions,
                    ..EmbeddedLogConfig::new(&dir)
                })
                .with_context(|| format!("cannot open the event log in {}", dir.display()))?,
            )
        }
        EventLogBackend::Kafka => Arc::new(
            KafkaLog::new(config.eventlog.kafka.clone())
                .context("cannot set up the Kafka event log (`eventlog.kafka`)")?,
        ),
    })
}

/// Connects the registry's routes (commands, twin changes, revocations) to the bridge's
/// connections: directly, or over NATS as between separate processes.
async fn connect_routes(
    config: &UpConfig,
    bridge: &Bridge,
    registry: &Registry,
    commands: &Commands,
    twins: &Twins,
) -> anyhow::Result<()> {
    let local = bridge.local_routes();
    match config.routing.backend {
        RoutingBackend::InProcess => {
            commands.set_route(local.commands);
            twins.set_route(local.twins);
            registry.set_access_listener(local.access);
        }
        RoutingBackend::Nats => {
            let nats = &config.routing.nats;
            let client = nats.connect().await.with_context(|| {
                format!(
                    "cannot connect to NATS at {} (`routing.nats.url`)",
                    nats.url
                )
            })?;
            let router = Arc::new(NatsRouter::new(client.clone(), nats));
            commands.set_route(router.clone());
            twins.set_route(router.clone());
            registry.set_access_listener(router);
            bridge.set_presence(Arc::new(NatsEndpoint::start(client, nats, local)));
        }
    }
    Ok(())
}

/// The gRPC services' health: the whole server (`""`) and each service by name.
async fn set_grpc_health(health: &HealthReporter, status: ServingStatus) {
    for service in ["", "tern.v1.Registry", "tern.v1.Identity"] {
        health.set_service_status(service, status).await;
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let config = UpConfig::load(&args)?;
    let _traces = logging::init(&config.log.level, config.log.format, &config.tracing)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;

    let data = &config.data_dir;
    std::fs::create_dir_all(data).with_context(|| {
        format!(
            "cannot create the data directory {} (`data_dir`)",
            data.display()
        )
    })?;
    let log = open_event_log(&config)?;
    let store: Arc<dyn Store> = if config.store.url.is_empty() {
        Arc::new(EmbeddedStore::open(&data.join("store")).with_context(|| {
            format!("cannot open the store in {}", data.join("store").display())
        })?)
    } else {
        let url = &config.store.url;
        let remote = RemoteStore::connect(url, &config.store.token()?)?;
        // One call now, so that a wrong address or token stops start-up with the keys named.
        remote
            .get_record("probe", "start-up")
            .await
            .with_context(|| {
                format!("cannot use the store at {url} (`store.url`, `store.token_file`)")
            })?;
        tracing::info!(%url, "using a served store");
        Arc::new(remote)
    };
    let metrics = MetricsRegistry::default();
    let registry = Arc::new(Registry::new(store.clone()));
    let mut identity_config = config.identity.clone();
    if identity_config.public_url.is_empty() {
        identity_config.public_url = format!("http://localhost:{}", config.http_port);
    }
    // Where devices reach this platform's HTTP API (OTA artifact downloads, OAuth issuer).
    let public_url = identity_config.public_url.clone();
    let identity = Arc::new(Identity::new(store.clone(), registry.clone(), identity_config).await?);
    identity
        .ensure_operator_token(&data.join("admin.token"))
        .await?;

    // Loaded before any listener binds: a bad certificate stops start-up, naming the file.
    let tls = match (&config.mqtt.tls.cert_file, &config.mqtt.tls.key_file) {
        (Some(cert), Some(key)) => Some(
            TlsReloader::load(
                cert,
                key,
                Some(TenantCaVerifier::new(
                    identity.clone(),
                    config.mqtt.tls.require_client_certificate,
                )),
            )
            .context("invalid configuration: `mqtt.tls.cert_file` / `mqtt.tls.key_file`")?,
        ),
        _ => None,
    };
    let mqtt_listener = listen(&config, config.mqtt_port, "mqtt_port").await?;
    let tls_listener = match tls {
        Some(tls) => Some((listen(&config, config.mqtts_port, "mqtts_port").await?, tls)),
        None => None,
    };
    let wss_listener = match &tls_listener {
        Some(_) => Some(listen(&config, config.wss_port, "wss_port").await?),
        None => None,
    };
    let mqtts_addr = match &tls_listener {
        Some((listener, _)) => Some(listener.local_addr()?),
        None => None,
    };
    let wss_addr = match &wss_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let coap_addr = SocketAddr::new(config.bind, config.coap_port);
    let coap_socket = UdpSocket::bind(coap_addr)
        .await
        .with_context(|| format!("cannot listen on UDP {coap_addr} (`coap_port`)"))?;
    let coap_addr = coap_socket.local_addr()?;
    let http_listener = listen(&config, config.http_port, "http_port").await?;
    let grpc_listener = listen(&config, config.grpc_port, "grpc_port").await?;
    let (mqtt_addr, http_addr, grpc_addr) = (
        mqtt_listener.local_addr()?,
        http_listener.local_addr()?,
        grpc_listener.local_addr()?,
    );

    // Stopped in this order on shutdown: devices first, then consumers, then the APIs.
    let stop_bridge = Shutdown::new();
    let stop_ingest = Shutdown::new();
    let stop_apis = Shutdown::new();

    let commands = Arc::new(Commands::new(
        store.clone(),
        log.clone(),
        config.commands.clone(),
    ));
    let twins = Arc::new(Twins::new(store.clone(), config.twins.clone()));
    let bridge = Arc::new(
        Bridge::new(
            config.mqtt.clone(),
            BridgeServices {
                identity: identity.clone(),
                registry: registry.clone(),
                commands: commands.clone(),
                twins: twins.clone(),
                log: log.clone(),
                store: store.clone(),
            },
            &metrics,
        )
        .await?,
    );
    let listeners = Listeners {
        tcp: mqtt_listener,
        tls: tls_listener,
        wss: wss_listener,
        coap: Some(coap_socket),
    };
    connect_routes(&config, &bridge, &registry, &commands, &twins).await?;
    let bridge_task = tokio::spawn(bridge.clone().serve(listeners, stop_bridge.clone()));

    let ingest = Ingest::new(log.clone(), store.clone(), &metrics);
    let ingest_task = tokio::spawn(ingest.run(stop_ingest.clone()));
    let rules = Arc::new(Rules::new(store.clone(), config.rules.max_rules_per_tenant));
    let alerts = Arc::new(Alerts::new(store.clone()));
    let retention = Arc::new(Retention::new(store.clone()));
    tokio::spawn(retention.clone().run(
        Duration::from_secs(config.retention.sweep_interval_secs),
        stop_ingest.clone(),
    ));
    let webhooks = Arc::new(Webhooks::new(
        store.clone(),
        config.rules.webhook_allow_private_networks,
    ));
    tokio::spawn(webhooks.clone().run(stop_ingest.clone()));
    let rule_engine = RuleEngine::new(
        RuleServices {
            log: log.clone(),
            store: store.clone(),
            registry: registry.clone(),
            twins: twins.clone(),
            commands: commands.clone(),
            rules: rules.clone(),
            alerts: alerts.clone(),
            webhooks,
            republish: Arc::new(BridgePublisher(bridge.clone())),
        },
        config.rules.clone(),
        &metrics,
    );
    let jobs = Arc::new(Jobs::new(store.clone(), Some(rule_engine.actions())));
    jobs.fail_interrupted().await?;
    let rules_task = tokio::spawn(rule_engine.run(stop_ingest.clone()));

    let artifacts = Arc::new(Artifacts::new(
        store.clone(),
        data.join("artifacts"),
        config.ota.max_artifact_bytes,
    ));
    let campaigns = Arc::new(Campaigns::new(
        store.clone(),
        registry.clone(),
        commands.clone(),
        twins.clone(),
        artifacts.clone(),
        public_url.clone(),
    ));
    tokio::spawn(campaigns.clone().run(
        Duration::from_millis(config.ota.campaign_interval_ms),
        stop_ingest.clone().cancelled_owned(),
    ));

    let gateway = Gateway::new(
        GatewayServices {
            registry: registry.clone(),
            identity: identity.clone(),
            commands: commands.clone(),
            twins,
            rules,
            alerts,
            retention,
            jobs,
            artifacts,
            campaigns,
            heartbeat_window_ms: i64::try_from(config.devices.heartbeat_window_secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            store: store.clone(),
            log: log.clone(),
        },
        &metrics,
    );
    // MQTT over WebSocket shares the HTTP port; its connections stop with the bridge's.
    let http_router = tern_gateway::router(gateway.clone(), tern_dashboard::router())
        .merge(tern_identity::http::router(identity.clone()))
        .merge(websocket_routes(bridge.clone(), stop_bridge.clone()));
    let http = axum::serve(
        http_listener,
        http_router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop_apis.clone().cancelled_owned());
    let http_task = tokio::spawn(async move { http.await });
    tokio::spawn({
        let (identity, stop) = (identity.clone(), stop_apis.clone());
        async move { identity.run_key_rotation(stop).await }
    });
    // On a shared log, other instances may share the store: keep their revocations and policy
    // changes and ours in step. The embedded log has one instance by construction.
    if config.eventlog.backend == EventLogBackend::Kafka {
        let notices = identity
            .clone()
            .follow_notices(log.clone(), stop_apis.clone());
        tokio::spawn(async move {
            if let Err(e) = notices.await {
                tracing::error!(error = %e, "identity notices stopped");
            }
        });
    }
    // Commands whose TTL passes unanswered are expired (and logged) within about a second.
    tokio::spawn(commands.run_expiry(Duration::from_secs(1), stop_apis.clone().cancelled_owned()));

    // Health answers without credentials (Kubernetes probes have none); reflection, like the
    // services, needs a token with `tern:read`.
    let (health, health_service) = tonic_health::server::health_reporter();
    set_grpc_health(&health, ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tern_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build gRPC reflection")?;
    let grpc_router = tonic::service::Routes::new(
        RegistryGrpc::new(registry.clone(), identity.clone()).into_server(),
    )
    .add_service(IdentityGrpc::new(identity.clone()).into_server())
    .add_service(reflection)
    .add_service(health_service)
    .into_axum_router()
    .layer(axum::middleware::from_fn_with_state(
        identity.clone(),
        grpc_auth,
    ));
    let grpc = axum::serve(grpc_listener, grpc_router)
        .with_graceful_shutdown(stop_apis.clone().cancelled_owned());
    let grpc_task = tokio::spawn(async move { grpc.await });

    gateway.set_ready(true);
    let mqtts = mqtts_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    let wss = wss_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(
        mqtt = %mqtt_addr, mqtts, wss, coap = %coap_addr, http = %http_addr, grpc = %grpc_addr, data_dir = %data.display(),
        "Tern is up"
    );

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; draining");
    gateway.set_ready(false);
    set_grpc_health(&health, ServingStatus::NotServing).await;
    let deadline = Duration::from_secs(config.shutdown_timeout_secs);
    let drained = tokio::time::timeout(deadline, async {
        stop_bridge.cancel();
        let _ = bridge_task.await;
        stop_ingest.cancel();
        if let Ok(Err(e)) = ingest_task.await {
            tracing::error!(error = %e, "ingest stopped with an error");
        }
        if let Ok(Err(e)) = rules_task.await {
            tracing::error!(error = %e, "the rule engine stopped with an error");
        }
        stop_apis.cancel();
        let _ = http_task.await;
        let _ = grpc_task.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout_secs = config.shutdown_timeout_secs,
            "drain timed out; exiting anyway"
        );
    }
    // Dropping the last handles syncs and closes the log and the store.
    drop((gateway, identity, registry, store));
    tokio::task::spawn_blocking(move || drop(log)).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Rules' `republish:` actions go to this process's bridge.
struct BridgePublisher(Arc<Bridge>);

#[async_trait::async_trait]
impl Republish for BridgePublisher {
    async fn publish(
        &self,
        tenant: TenantId,
        topic: &str,
        payload: Bytes,
        user_properties: Vec<(String, String)>,
    ) -> Result<(), String> {
        self.0
            .publish(tenant, topic, payload, user_properties)
            .await
    }
}

async fn listen(config: &UpConfig, port: u16, key: &str) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(config.bind, port);
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (`{key}`)"))
}
