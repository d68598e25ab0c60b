//! `tern up` (every service in one process on embedded storage) and `tern bridge`,
//! `tern registry`, ... (one service per process on the shared store, Kafka and NATS): the
//! only place that composes the services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_analytics::alerts::Alerts;
use tern_analytics::jobs::Jobs;
use tern_analytics::retention::Retention;
use tern_analytics::rules::webhooks::Webhooks;
use tern_analytics::rules::{Republish, RuleEngine, RuleLog, RuleServices, Rules};
use tern_analytics::{Ingest, Rollups};
use tern_bridge::{
    Bridge, BridgeServices, Listeners, TenantCaVerifier, TlsReloader, websocket_routes,
};
use tern_eventlog::{EmbeddedLog, EmbeddedLogConfig, EventLog, KafkaLog};
use tern_gateway::ops::{self, Ready};
use tern_gateway::{Gateway, GatewayServices};
use tern_identity::{Identity, IdentityGrpc, grpc_auth};
use tern_registry::nats::{NatsEndpoint, NatsRouter};
use tern_registry::ota::{Artifacts, Campaigns};
use tern_registry::{Commands, Registry, RegistryGrpc, Twins};
use tern_runtime::otel::TracingConfig;
use tern_runtime::{MetricsRegistry, Shutdown, logging, shutdown_signal};
use tern_store::{EmbeddedStore, RemoteStore, Store};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::cli::UpArgs;
use crate::config::{EventLogBackend, RoutingBackend, UpConfig};
use crate::nats_fanout::{self, BridgePublisher, NatsPeers, NatsPublisher};
use crate::roles::{Role, Roles};

/// A job not updated for this long was left by a process that died (jobs record progress at
/// least every second while they run).
const STALE_JOB_MS: i64 = 5 * 60 * 1000;
/// How soon rule changes saved by another process apply on a shared store.
const RULES_FOLLOW_PERIOD: Duration = Duration::from_secs(1);

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

async fn open_store(config: &UpConfig) -> anyhow::Result<Arc<dyn Store>> {
    if config.store.url.is_empty() {
        let dir = config.data_dir.join("store");
        return Ok(Arc::new(EmbeddedStore::open(&dir).with_context(|| {
            format!("cannot open the store in {}", dir.display())
        })?));
    }
    let url = &config.store.url;
    let remote = RemoteStore::connect_with_tls(url, &config.store.token()?, config.store.tls()?)?;
    // One call now, so that a wrong address or token stops start-up with the keys named.
    remote
        .get_record("probe", "start-up")
        .await
        .with_context(|| {
            format!("cannot use the store at {url} (`store.url`, `store.token_file`)")
        })?;
    tracing::info!(%url, "using a served store");
    Ok(Arc::new(remote))
}

/// Connects the registry's routes (commands, twin changes, revocations) to the bridge's
/// connections: directly, or over NATS as between separate processes. Returns where rules'
/// republishes go.
async fn connect_routes(
    config: &UpConfig,
    bridge: Option<&Arc<Bridge>>,
    registry: &Registry,
    commands: &Commands,
    twins: &Twins,
    stop: &Shutdown,
) -> anyhow::Result<Arc<dyn Republish>> {
    match config.routing.backend {
        RoutingBackend::InProcess => {
            let bridge = bridge.context("in-process routing needs the bridge in this process")?;
            let local = bridge.local_routes();
            commands.set_route(local.commands);
            twins.set_route(local.twins);
            registry.set_access_listener(local.access);
            Ok(Arc::new(BridgePublisher(bridge.clone())))
        }
        RoutingBackend::Nats => {
            let nats = &config.routing.nats;
            let client = nats.connect().await.with_context(|| {
                format!("cannot connect to NATS at {} (`routing.nats`)", nats.url)
            })?;
            let router = Arc::new(NatsRouter::new(client.clone(), nats));
            commands.set_route(router.clone());
            twins.set_route(router.clone());
            registry.set_access_listener(router);
            if let Some(bridge) = bridge {
                bridge.set_presence(Arc::new(NatsEndpoint::start(
                    client.clone(),
                    nats,
                    bridge.local_routes(),
                )));
                // Publishes of this bridge's clients reach the other bridges' subscribers.
                let origin = uuid::Uuid::new_v4().to_string();
                bridge.set_peers(Arc::new(NatsPeers::start(
                    client.clone(),
                    &nats.subject_prefix,
                    &origin,
                )));
                let serve = nats_fanout::serve_over_nats(
                    client.clone(),
                    nats.subject_prefix.clone(),
                    origin,
                    bridge.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "republishing from NATS stopped");
                    }
                });
            }
            Ok(Arc::new(NatsPublisher::new(client, &nats.subject_prefix)))
        }
    }
}

/// The gRPC services' health: the whole server (`""`) and each service by name.
async fn set_grpc_health(health: &HealthReporter, services: &[&str], status: ServingStatus) {
    for service in std::iter::once(&"").chain(services) {
        health.set_service_status(service, status).await;
    }
}

/// The device-facing listeners, bound before anything starts: a taken port or a bad
/// certificate stops start-up with the key named.
async fn bind_bridge(config: &UpConfig, identity: &Arc<Identity>) -> anyhow::Result<Listeners> {
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
    let tcp = listen(config, config.mqtt_port, "mqtt_port").await?;
    let (tls, wss) = match tls {
        Some(tls) => (
            Some((listen(config, config.mqtts_port, "mqtts_port").await?, tls)),
            Some(listen(config, config.wss_port, "wss_port").await?),
        ),
        None => (None, None),
    };
    let coap_addr = SocketAddr::new(config.bind, config.coap_port);
    let coap = UdpSocket::bind(coap_addr)
        .await
        .with_context(|| format!("cannot listen on UDP {coap_addr} (`coap_port`)"))?;
    let addr = |l: &TcpListener| l.local_addr().map_or("?".into(), |a| a.to_string());
    tracing::info!(
        mqtt = %addr(&tcp),
        mqtts = %tls.as_ref().map_or("off".into(), |(l, _)| addr(l)),
        wss = %wss.as_ref().map_or("off".into(), addr),
        coap = %coap.local_addr()?,
        "device endpoints"
    );
    Ok(Listeners {
        tcp,
        tls,
        wss,
        coap: Some(coap),
    })
}

pub async fn run(args: UpArgs, roles: Roles) -> anyhow::Result<()> {
    let mut config = UpConfig::load(&args)?;
    roles.check(&config)?;
    // A service alone names itself in its spans, unless configured otherwise.
    if let Roles::One(role) = roles
        && config.tracing.service_name == TracingConfig::default().service_name
    {
        config.tracing.service_name = format!("tern-{}", role.name());
    }
    let _traces = logging::init(&config.log.level, config.log.format, &config.tracing)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    if !roles.needs_platform() {
        return run_dashboard(&config).await;
    }

    let data = &config.data_dir;
    std::fs::create_dir_all(data).with_context(|| {
        format!(
            "cannot create the data directory {} (`data_dir`)",
            data.display()
        )
    })?;
    let log = open_event_log(&config)?;
    let store = open_store(&config).await?;
    // Other processes may use the same store (and run the same chores).
    let shared_store = !config.store.url.is_empty();
    let metrics = MetricsRegistry::default();
    let registry = Arc::new(Registry::new(store.clone()));
    let mut identity_config = config.identity.clone();
    if identity_config.public_url.is_empty() {
        identity_config.public_url = format!("http://localhost:{}", config.http_port);
    }
    // Where devices reach this platform's HTTP API (OTA artifact downloads, OAuth issuer).
    let public_url = identity_config.public_url.clone();
    let identity = Arc::new(Identity::new(store.clone(), registry.clone(), identity_config).await?);
    if roles.has(Role::Identity) {
        let path = (config.identity.operator_token_file.clone())
            .unwrap_or_else(|| data.join("admin.token"));
        identity.ensure_operator_token(&path).await?;
    }

    let bridge_listeners = if roles.has(Role::Bridge) {
        Some(bind_bridge(&config, &identity).await?)
    } else {
        None
    };
    let http_listener = listen(&config, config.http_port, "http_port").await?;
    let grpc_listener = listen(&config, config.grpc_port, "grpc_port").await?;
    let (http_addr, grpc_addr) = (http_listener.local_addr()?, grpc_listener.local_addr()?);

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
    let bridge = if roles.has(Role::Bridge) {
        Some(Arc::new(
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
        ))
    } else {
        None
    };
    let republish = connect_routes(
        &config,
        bridge.as_ref(),
        &registry,
        &commands,
        &twins,
        &stop_bridge,
    )
    .await?;
    let bridge_task = match (&bridge, bridge_listeners) {
        (Some(bridge), Some(listeners)) => Some(tokio::spawn(
            bridge.clone().serve(listeners, stop_bridge.clone()),
        )),
        _ => None,
    };

    let rules = Arc::new(Rules::new(store.clone(), config.rules.max_rules_per_tenant));
    let alerts = Arc::new(Alerts::new(store.clone()));
    let retention = Arc::new(Retention::new(store.clone()));
    let webhooks = Arc::new(Webhooks::new(
        store.clone(),
        config.rules.webhook_allow_private_networks,
    ));
    // The gateway's re-run jobs act as the live engine does, so both need it.
    let rule_engine = (roles.has(Role::Analytics) || roles.has(Role::Gateway)).then(|| {
        RuleEngine::new(
            RuleServices {
                log: log.clone(),
                store: store.clone(),
                registry: registry.clone(),
                twins: twins.clone(),
                commands: commands.clone(),
                rules: rules.clone(),
                alerts: alerts.clone(),
                webhooks: webhooks.clone(),
                republish,
            },
            config.rules.clone(),
            &metrics,
        )
    });
    let jobs = Arc::new(Jobs::new(
        store.clone(),
        rule_engine.as_ref().map(RuleEngine::actions),
    ));
    let mut consumers: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    if roles.has(Role::Analytics) {
        let ingest = Ingest::new(log.clone(), store.clone(), &metrics);
        let stop = stop_ingest.clone();
        consumers.push(tokio::spawn(async move {
            ingest.run(stop).await.context("ingest stopped")
        }));
        let rule_log = rule_log(&config, shared_store)?;
        let checkpoint_prefix = match &rule_log {
            RuleLog::Own { checkpoint_prefix } => checkpoint_prefix.clone(),
            RuleLog::Shared => String::new(),
        };
        let rollups = Rollups::new(log.clone(), store.clone(), checkpoint_prefix, &metrics);
        let stop = stop_ingest.clone();
        consumers.push(tokio::spawn(async move {
            rollups.run(stop).await.context("rollups stopped")
        }));
        tokio::spawn(retention.clone().run(
            Duration::from_secs(config.retention.sweep_interval_secs),
            stop_ingest.clone(),
        ));
        tokio::spawn(webhooks.run(stop_ingest.clone()));
        if shared_store {
            // Rules saved through another process's REST API.
            tokio::spawn(
                rules
                    .clone()
                    .follow_store(RULES_FOLLOW_PERIOD, stop_ingest.clone()),
            );
        }
        if let Some(engine) = rule_engine {
            let stop = stop_ingest.clone();
            consumers.push(tokio::spawn(async move {
                engine
                    .run(stop, rule_log)
                    .await
                    .context("the rule engine stopped")
            }));
        }
    }
    if roles.has(Role::Gateway) {
        fail_interrupted_jobs(&jobs, shared_store, &stop_apis).await?;
    }

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
    if roles.has(Role::Registry) {
        tokio::spawn(campaigns.clone().run(
            Duration::from_millis(config.ota.campaign_interval_ms),
            stop_ingest.clone().cancelled_owned(),
        ));
        // Commands whose TTL passes unanswered are expired (and logged) within about a second.
        tokio::spawn(
            commands
                .clone()
                .run_expiry(Duration::from_secs(1), stop_apis.clone().cancelled_owned()),
        );
    }
    if roles.has(Role::Identity) {
        let (identity, stop) = (identity.clone(), stop_apis.clone());
        tokio::spawn(async move { identity.run_key_rotation(stop).await });
    }
    // On a shared log, other processes share the store: keep their revocations and policy
    // changes and ours in step. The embedded log has one process by construction.
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

    // HTTP: the REST API (with health, readiness and metrics) or those three alone, plus the
    // pages, OAuth endpoints and MQTT over WebSocket of the services here.
    let ready = Ready::default();
    let gateway = roles.has(Role::Gateway).then(|| {
        Gateway::new(
            GatewayServices {
                registry: registry.clone(),
                identity: identity.clone(),
                commands: commands.clone(),
                twins: twins.clone(),
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
        )
    });
    let pages = if roles.has(Role::Dashboard) {
        tern_dashboard::router()
    } else {
        axum::Router::new()
    };
    let mut http_router = match &gateway {
        Some(gateway) => tern_gateway::router(gateway.clone(), pages),
        None => ops::router(ready.clone(), metrics.clone()).merge(pages),
    };
    if roles.has(Role::Identity) {
        http_router = http_router.merge(tern_identity::http::router(identity.clone()));
    }
    if let Some(bridge) = &bridge {
        // MQTT over WebSocket shares the HTTP port; its connections stop with the bridge's.
        http_router = http_router.merge(websocket_routes(bridge.clone(), stop_bridge.clone()));
    }
    let http = axum::serve(
        http_listener,
        http_router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop_apis.clone().cancelled_owned());
    let http_task = tokio::spawn(async move { http.await });

    // gRPC: health (without credentials: Kubernetes probes have none), reflection and the
    // services here (both with a token that has `tern:read`).
    let mut grpc_services = Vec::new();
    let mut grpc_routes = tonic::service::Routes::default();
    if roles.has(Role::Registry) {
        grpc_services.push("tern.v1.Registry");
        grpc_routes = grpc_routes
            .add_service(RegistryGrpc::new(registry.clone(), identity.clone()).into_server());
    }
    if roles.has(Role::Identity) {
        grpc_services.push("tern.v1.Identity");
        grpc_routes = grpc_routes.add_service(IdentityGrpc::new(identity.clone()).into_server());
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    set_grpc_health(&health, &grpc_services, ServingStatus::Serving).await;
    let grpc_router = grpc_routes
        .add_service(reflection()?)
        .add_service(health_service)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(
            identity.clone(),
            grpc_auth,
        ));
    let grpc = axum::serve(grpc_listener, grpc_router)
        .with_graceful_shutdown(stop_apis.clone().cancelled_owned());
    let grpc_task = tokio::spawn(async move { grpc.await });

    let set_ready = |on: bool| match &gateway {
        Some(gateway) => gateway.set_ready(on),
        None => ready.set(on),
    };
    set_ready(true);
    tracing::info!(
        http = %http_addr, grpc = %grpc_addr, data_dir = %data.display(),
        "{} is up", if roles == Roles::All { "Tern".into() } else { roles.command() }
    );

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; draining");
    set_ready(false);
    set_grpc_health(&health, &grpc_services, ServingStatus::NotServing).await;
    let deadline = Duration::from_secs(config.shutdown_timeout_secs);
    let drained = tokio::time::timeout(deadline, async {
        stop_bridge.cancel();
        if let Some(task) = bridge_task {
            let _ = task.await;
        }
        stop_ingest.cancel();
        for consumer in consumers {
            if let Ok(Err(e)) = consumer.await {
                tracing::error!(error = %format!("{e:#}"), "a consumer stopped with an error");
            }
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
    drop((gateway, bridge, identity, registry, store));
    tokio::task::spawn_blocking(move || drop(log)).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Jobs are run by the process whose REST API started them. Alone on its store, a process
/// marks every job still running as interrupted; sharing the store, it marks only those no
/// process has updated for [`STALE_JOB_MS`], now and every minute.
async fn fail_interrupted_jobs(
    jobs: &Arc<Jobs>,
    shared_store: bool,
    stop: &Shutdown,
) -> anyhow::Result<()> {
    if !shared_store {
        jobs.fail_interrupted(None).await?;
        return Ok(());
    }
    let (jobs, stop) = (jobs.clone(), stop.clone());
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {
                    if let Err(e) = jobs.fail_interrupted(Some(STALE_JOB_MS)).await {
                        tracing::warn!(error = %e, "cannot look for interrupted jobs");
                    }
                }
            }
        }
    });
    Ok(())
}

fn reflection() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tern_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build gRPC reflection")
}

/// `tern dashboard`: the pages, health, readiness and metrics over HTTP, and gRPC health and
/// reflection. It holds no data and no credentials (the browser calls the REST API), so it
/// needs neither the store nor a token.
async fn run_dashboard(config: &UpConfig) -> anyhow::Result<()> {
    let http_listener = listen(config, config.http_port, "http_port").await?;
    let grpc_listener = listen(config, config.grpc_port, "grpc_port").await?;
    let ready = Ready::default();
    let stop = Shutdown::new();
    let router =
        ops::router(ready.clone(), MetricsRegistry::default()).merge(tern_dashboard::router());
    let http =
        axum::serve(http_listener, router).with_graceful_shutdown(stop.clone().cancelled_owned());
    let (health, health_service) = tonic_health::server::health_reporter();
    set_grpc_health(&health, &[], ServingStatus::Serving).await;
    let grpc_router = tonic::service::Routes::new(health_service)
        .add_service(reflection()?)
        .into_axum_router();
    let grpc = axum::serve(grpc_listener, grpc_router)
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let (http_task, grpc_task) = (
        tokio::spawn(http.into_future()),
        tokio::spawn(grpc.into_future()),
    );
    ready.set(true);
    tracing::info!(http = %config.http_port, grpc = %config.grpc_port, "tern dashboard is up");
    shutdown_signal().await;
    ready.set(false);
    set_grpc_health(&health, &[], ServingStatus::NotServing).await;
    stop.cancel();
    let _ = http_task.await;
    let _ = grpc_task.await;
    tracing::info!("stopped");
    Ok(())
}

async fn listen(config: &UpConfig, port: u16, key: &str) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(config.bind, port);
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (`{key}`)"))
}

/// Whose log the rules and rollups read. A Kafka log with a shared store is shared by the analytics
/// processes, which split its partitions. An embedded log is this process's own; when other
/// processes share the store, an id kept beside the log (`data_dir/log-id`) keeps its rule and
/// rollup checkpoints apart from theirs.
fn rule_log(config: &UpConfig, shared_store: bool) -> anyhow::Result<RuleLog> {
    if !shared_store {
        return Ok(RuleLog::Own {
            checkpoint_prefix: String::new(),
        });
    }
    if config.eventlog.backend == EventLogBackend::Kafka {
        return Ok(RuleLog::Shared);
    }
    let path = config.data_dir.join("log-id");
    let id = match std::fs::read_to_string(&path) {
        Ok(id) => id.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::write(&path, &id)
                .with_context(|| format!("cannot write {}", path.display()))?;
            id
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(RuleLog::Own {
        checkpoint_prefix: format!("{id}/"),
    })
}
