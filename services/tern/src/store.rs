//! `tern store`: the embedded store served to other processes over gRPC (`tern.v1.Store`),
//! with the gRPC health service; stops on SIGINT/SIGTERM after the calls in flight.

use std::sync::Arc;

use anyhow::Context;
use tern_runtime::otel::TracingConfig;
use tern_runtime::shutdown_signal;
use tern_store::{EmbeddedStore, Store, StoreService};

use crate::cli::StoreArgs;
use crate::config::read_token;

pub async fn run(args: StoreArgs) -> anyhow::Result<()> {
    let tracing = TracingConfig {
        otlp_endpoint: args.otlp_endpoint.clone().unwrap_or_default(),
        service_name: "tern-store".into(),
        ..TracingConfig::default()
    };
    if let Err((key, reason)) = tracing.validate() {
        anyhow::bail!("`--otlp-endpoint` ({key}) {reason}");
    }
    let _logging =
        tern_runtime::logging::init("info", tern_runtime::logging::LogFormat::Text, &tracing)
            .map_err(|e| anyhow::anyhow!("cannot start logging: {e}"))?;
    let token = read_token(&args.token_file, "--token-file")?;
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(&args.data_dir)
            .with_context(|| format!("cannot open the store in {}", args.data_dir.display()))?,
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (`--listen`)", args.listen))?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let routes = StoreService::new(store, &token)
        .into_routes()
        .add_service(health_service);
    tracing::info!(listen = %listener.local_addr()?, data_dir = %args.data_dir.display(), "serving the store");
    axum::serve(listener, routes.into_axum_router())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the store service failed")?;
    tracing::info!("store stopped");
    Ok(())
}
