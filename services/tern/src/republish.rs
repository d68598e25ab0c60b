//! Rules' `republish:` actions reach MQTT subscribers through the bridge: the one in this
//! process (`tern up`), or every bridge process over NATS (`{prefix}.publish.{tenant}`), since
//! each holds its own subscribers.

use std::sync::Arc;

use async_nats::Client;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tern_analytics::rules::Republish;
use tern_bridge::Bridge;
use tern_core::TenantId;
use tern_runtime::Shutdown;

/// To the bridge in this process.
pub struct BridgePublisher(pub Arc<Bridge>);

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

/// One republished message on NATS.
#[derive(Serialize, Deserialize)]
struct Published {
    topic: String,
    /// Base64: MQTT payloads are bytes.
    payload: String,
    user_properties: Vec<(String, String)>,
}

fn subject(prefix: &str, tenant: &str) -> String {
    format!("{prefix}.publish.{tenant}")
}

/// To every bridge process, over NATS.
pub struct NatsPublisher {
    client: Client,
    prefix: String,
}

impl NatsPublisher {
    pub fn new(client: Client, prefix: &str) -> Self {
        Self {
            client,
            prefix: prefix.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl Republish for NatsPublisher {
    async fn publish(
        &self,
        tenant: TenantId,
        topic: &str,
        payload: Bytes,
        user_properties: Vec<(String, String)>,
    ) -> Result<(), String> {
        let message = serde_json::to_vec(&Published {
            topic: topic.to_string(),
            payload: BASE64.encode(&payload),
            user_properties,
        })
        .map_err(|e| format!("cannot encode the message: {e}"))?;
        self.client
            .publish(subject(&self.prefix, &tenant.to_string()), message.into())
            .await
            .map_err(|e| format!("cannot publish to NATS: {e}"))
    }
}

/// The bridge's side: hands every republished message to this process's bridge until `stop`.
pub async fn serve_over_nats(
    client: Client,
    prefix: String,
    bridge: Arc<Bridge>,
    stop: Shutdown,
) -> anyhow::Result<()> {
    let mut messages = client.subscribe(subject(&prefix, "*")).await?;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            message = messages.next() => match message {
                Some(message) => message,
                None => return Ok(()),
            },
        };
        let tenant = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<TenantId>().ok());
        let decoded = serde_json::from_slice::<Published>(&message.payload)
            .ok()
            .and_then(|p| Some((BASE64.decode(&p.payload).ok()?, p)));
        let (Some(tenant), Some((payload, published))) = (tenant, decoded) else {
            tracing::warn!(subject = %message.subject, "malformed republished message dropped");
            continue;
        };
        if let Err(e) = bridge
            .publish(
                tenant,
                &published.topic,
                payload.into(),
                published.user_properties,
            )
            .await
        {
            tracing::warn!(%tenant, topic = %published.topic, error = %e, "republish failed");
        }
    }
}
