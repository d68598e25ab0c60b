//! `tern store`: the embedded store served to other processes over gRPC (`tern.v1.Store`),
//! with the gRPC health service, over TLS (and mutual TLS) when given a certificate; stops on
//! SIGINT/SIGTERM after the calls in flight.

use std::sync::Arc;

use anyhow::Context;
use tern_proto::tonic::transport::server::TcpIncoming;
use tern_proto::tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tern_runtime::otel::TracingConfig;
use tern_runtime::shutdown_signal;
use tern_store::{EmbeddedStore, Store, StoreService};

use crate::cli::StoreArgs;
use crate::config::read_token;

/// The server's certificate and key, and the CA its clients' certificates must chain to.
fn server_tls(args: &StoreArgs) -> anyhow::Result<Option<ServerTlsConfig>> {
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path).with_context(|| format!("`{flag}`: cannot read {}", path.display()))
    };
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (read(cert, "--tls-cert")?, read(key, "--tls-key")?),
        (None, None) if args.client_ca.is_none() => return Ok(None),
        _ => {
            anyhow::bail!("`--tls-cert` and `--tls-key` go together (and `--client-ca` with them)")
        }
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &args.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--client-ca")?));
    }
    Ok(Some(tls))
}

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
    let mut server = Server::builder();
    let tls = server_tls(&args)?;
    let mode = match &tls {
        None => "plain",
        Some(_) if args.client_ca.is_some() => "mutual TLS",
        Some(_) => "TLS",
    };
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .context("invalid `--tls-cert` / `--tls-key`")?;
    }
    tracing::info!(listen = %listener.local_addr()?, data_dir = %args.data_dir.display(), mode, "serving the store");
    server
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown_signal())
        .await
        .context("the store service failed")?;
    tracing::info!("store stopped");
    Ok(())
}
