//! What every bridge process hands to its own subscribers, since each holds only its own:
//! rules' `republish:` actions (to the bridge in this process for `tern up`), and over NATS on
//! `{prefix}.mqtt.{tenant}`, in one wire form (`tern_bridge::platform_message`, the peers'),
//! both republishes and the bridges' clients' publishes and wills. A client's publish carries
//! the header `Tern-Origin`, so the bridge it came from skips it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use tern_analytics::rules::Republish;
use tern_bridge::{Bridge, PeerBridges, platform_message};
use tern_core::TenantId;
use tern_runtime::Shutdown;
use tokio::sync::mpsc;

/// Publishes waiting for NATS, per bridge; beyond it they are dropped (and counted).
const PEER_QUEUE: usize = 10_000;
const ORIGIN: &str = "Tern-Origin";

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

fn peer_subject(prefix: &str, tenant: &str) -> String {
    format!("{prefix}.mqtt.{tenant}")
}

/// This bridge's clients' publishes, to the other bridge processes over NATS.
pub struct NatsPeers {
    queue: mpsc::Sender<(TenantId, Bytes)>,
    dropped: AtomicU64,
}

impl NatsPeers {
    /// Publishes what [`PeerBridges::forward`] queues, marked with `origin`, until the client
    /// closes.
    pub fn start(client: Client, prefix: &str, origin: &str) -> Self {
        let (queue, mut queued) = mpsc::channel::<(TenantId, Bytes)>(PEER_QUEUE);
        let (prefix, origin) = (prefix.to_string(), origin.to_string());
        tokio::spawn(async move {
            while let Some((tenant, wire)) = queued.recv().await {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(ORIGIN, origin.as_str());
                let subject = peer_subject(&prefix, &tenant.to_string());
                if let Err(e) = client.publish_with_headers(subject, headers, wire).await {
                    tracing::warn!(error = %e, "cannot hand a publish to the other bridges");
                }
            }
        });
        Self {
            queue,
            dropped: AtomicU64::new(0),
        }
    }
}

impl PeerBridges for NatsPeers {
    fn forward(&self, tenant: TenantId, wire: Bytes) {
        if self.queue.try_send((tenant, wire)).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped % 1000 == 1 {
                tracing::warn!(
                    dropped,
                    "NATS is behind: publishes for other bridges dropped"
                );
            }
        }
    }
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
        let wire = platform_message(topic, payload, user_properties)?;
        // No origin: every bridge delivers it.
        self.client
            .publish(peer_subject(&self.prefix, &tenant.to_string()), wire)
            .await
            .map_err(|e| format!("cannot publish to NATS: {e}"))
    }
}

/// The bridge's side: hands every republished message, and every publish of another bridge
/// (not marked with this bridge's `origin`), to this process's bridge until `stop`.
pub async fn serve_over_nats(
    client: Client,
    prefix: String,
    origin: String,
    bridge: Arc<Bridge>,
    stop: Shutdown,
) -> anyhow::Result<()> {
    let mut messages = client.subscribe(peer_subject(&prefix, "*")).await?;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            message = messages.next() => match message {
                Some(message) => message,
                None => return Ok(()),
            },
        };
        let own = (message.headers.as_ref())
            .and_then(|h| h.get(ORIGIN))
            .is_some_and(|o| o.as_str() == origin);
        if !own {
            deliver_from_peer(&bridge, message).await;
        }
    }
}

/// The tenant named by a subject's last token.
fn tenant_of(subject: &str) -> Option<TenantId> {
    subject.rsplit('.').next().and_then(|t| t.parse().ok())
}

async fn deliver_from_peer(bridge: &Bridge, message: async_nats::Message) {
    let Some(tenant) = tenant_of(&message.subject) else {
        tracing::warn!(subject = %message.subject, "a peer's publish without a tenant dropped");
        return;
    };
    if let Err(e) = bridge.deliver_from_peer(tenant, message.payload).await {
        tracing::warn!(%tenant, error = %e, "a peer's publish not delivered");
    }
}
