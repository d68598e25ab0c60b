//! The `webhook:URL` action: rows are queued durably (the outbox, in the store) by the rule
//! engine and posted by a worker of their own, so a slow or failing receiver delays only its
//! own deliveries, never the rules.
//!
//! Each delivery is a signed JSON POST: `x-tern-signature: t=MS,v1=HEX`, where HEX is
//! HMAC-SHA256 with the rule's webhook secret over `MS.BODY` (the receiver checks it and the
//! timestamp), and `x-tern-idempotency-key` is the same for every attempt and replay of one
//! row. Network errors, 408, 429 and 5xx are retried with exponential backoff; other answers
//! and the last failed attempt go to the rule's dead letters.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, now_ms};
use tern_registry::{Lease, RegistryError};
use tern_runtime::Shutdown;
use tern_store::Store;
use tokio::sync::Notify;
use uuid::Uuid;

use super::actions::{DeadLetter, store_dead_letter};

const OUTBOX: &str = "webhook_outbox";
const SECRET: &str = "rule_webhook_secret";
/// Attempts before a delivery is dead-lettered; the waits between them double from one
/// second up to five minutes (about 20 minutes in all).
const MAX_ATTEMPTS: u32 = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(300);
const TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries in flight at once.
const CONCURRENCY: usize = 16;
/// How long the delivery lease lasts, and how often its holder renews it.
const LEASE_TTL: Duration = Duration::from_secs(60);
const LEASE_RENEW: Duration = Duration::from_secs(15);

/// One queued POST.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub tenant_id: TenantId,
    pub rule_id: Uuid,
    pub rule_name: String,
    pub url: String,
    /// The JSON body, as sent.
    pub body: String,
    pub idempotency_key: String,
    pub trigger: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub next_at_ms: i64,
}

pub struct Webhooks {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    allow_private_networks: bool,
    queued: Notify,
}

/// A new rule's webhook secret: 32 random bytes, shown once when the rule is created.
pub fn new_secret() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    // The system RNG does not fail on Linux; a zero secret would only weaken signing.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// `t=MS,v1=HEX` for a body.
pub fn signature(secret: &str, at_ms: i64, body: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hmac::sign(&key, format!("{at_ms}.{body}").as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={at_ms},v1={hex}")
}

/// Whether an address is one a tenant's webhook may not reach by default: loopback, private,
/// link-local, shared (CGNAT), unique-local, unspecified or multicast.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

enum Failure {
    /// Worth another attempt.
    Retry(String),
    /// Will not succeed.
    Final(String),
}

impl Webhooks {
    pub fn new(store: Arc<dyn Store>, allow_private_networks: bool) -> Self {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            store,
            client,
            allow_private_networks,
            queued: Notify::new(),
        }
    }

    /// Queues deliveries durably (one write); a replayed row replaces its own queued delivery.
    pub async fn enqueue(&self, deliveries: Vec<Delivery>) -> Result<(), RegistryError> {
        let records = deliveries
            .iter()
            .map(|d| {
                (
                    d.idempotency_key.clone(),
                    Bytes::from(serde_json::to_vec(d).unwrap_or_default()),
                )
            })
            .collect();
        self.store.put_records(OUTBOX, records).await?;
        self.queued.notify_one();
        Ok(())
    }

    /// Delivers queued posts until `shutdown`; what is in flight then is retried after restart.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        // One process posts when several share the outbox; it renews the lease at least every
        // LEASE_RENEW, and another takes over within LEASE_TTL of its end.
        let lease = Lease::new(self.store.clone(), "webhook-delivery", LEASE_TTL);
        loop {
            let next_due = match lease.hold().await {
                Ok(true) => match self.deliver_due().await {
                    Ok(next) => next,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the webhook outbox; retrying");
                        Some(now_ms() + 1000)
                    }
                },
                Ok(false) => Some(now_ms() + LEASE_RENEW.as_millis() as i64),
                Err(e) => {
                    tracing::error!(error = %e, "webhooks: cannot read their lease; retrying");
                    Some(now_ms() + 1000)
                }
            };
            let wait = next_due.map_or(LEASE_RENEW, |at| {
                Duration::from_millis((at - now_ms()).max(0) as u64).min(LEASE_RENEW)
            });
            tokio::select! {
                _ = shutdown.cancelled() => {
                    lease.release().await;
                    return;
                }
                _ = self.queued.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sends every due delivery (`CONCURRENCY` at a time); returns when the next is due.
    async fn deliver_due(&self) -> Result<Option<i64>, RegistryError> {
        let mut after: Option<String> = None;
        let mut next_due: Option<i64> = None;
        loop {
            let page = self
                .store
                .list_records(OUTBOX, "", after.as_deref(), 256)
                .await?;
            let full = page.len() == 256;
            after = page.last().map(|(k, _)| k.clone());
            let now = now_ms();
            let mut due = Vec::new();
            for (key, bytes) in page {
                let Ok(delivery) = serde_json::from_slice::<Delivery>(&bytes) else {
                    tracing::error!(key, "unreadable webhook delivery dropped");
                    self.store.delete_record(OUTBOX, &key).await?;
                    continue;
                };
                if delivery.next_at_ms <= now {
                    due.push(delivery);
                } else {
                    next_due =
                        Some(next_due.map_or(delivery.next_at_ms, |n| n.min(delivery.next_at_ms)));
                }
            }
            for chunk in due.chunks(CONCURRENCY) {
                let sends = chunk.iter().map(|d| self.attempt(d.clone()));
                for result in futures_util::future::join_all(sends).await {
                    if let Some(at) = result? {
                        next_due = Some(next_due.map_or(at, |n| n.min(at)));
                    }
                }
            }
            if !full {
                return Ok(next_due);
            }
        }
    }

    /// One attempt; returns when the delivery is due again if it stays queued.
    async fn attempt(&self, mut delivery: Delivery) -> Result<Option<i64>, RegistryError> {
        let outcome = self.post(&delivery).await;
        delivery.attempts += 1;
        let error = match outcome {
            Ok(()) => {
                self.store
                    .delete_record(OUTBOX, &delivery.idempotency_key)
                    .await?;
                return Ok(None);
            }
            Err(Failure::Retry(e)) if delivery.attempts < MAX_ATTEMPTS => {
                let backoff =
                    (Duration::from_secs(1) * 2u32.pow(delivery.attempts - 1)).min(MAX_BACKOFF);
                delivery.next_at_ms = now_ms() + backoff.as_millis() as i64;
                tracing::warn!(rule = %delivery.rule_id, attempt = delivery.attempts, error = %e, "webhook failed; will retry");
                self.enqueue_quietly(&delivery).await?;
                return Ok(Some(delivery.next_at_ms));
            }
            Err(Failure::Retry(e) | Failure::Final(e)) => e,
        };
        tracing::error!(tenant = %delivery.tenant_id, rule = %delivery.rule_id, attempts = delivery.attempts, error = %error, "webhook dead-lettered");
        let body: serde_json::Value = serde_json::from_str(&delivery.body).unwrap_or_default();
        let letter = DeadLetter {
            tenant_id: delivery.tenant_id,
            rule_id: delivery.rule_id,
            rule_name: &delivery.rule_name,
            action: format!("webhook:{}", delivery.url),
            trigger: &delivery.trigger,
            row: body["row"].clone(),
            error: format!("{error} (after {} attempts)", delivery.attempts),
            at_ms: now_ms(),
        };
        store_dead_letter(self.store.as_ref(), &letter).await;
        self.store
            .delete_record(OUTBOX, &delivery.idempotency_key)
            .await?;
        Ok(None)
    }

    async fn enqueue_quietly(&self, delivery: &Delivery) -> Result<(), RegistryError> {
        let bytes = Bytes::from(serde_json::to_vec(delivery).unwrap_or_default());
        Ok(self
            .store
            .put_record(OUTBOX, &delivery.idempotency_key, bytes)
            .await?)
    }

    async fn post(&self, delivery: &Delivery) -> Result<(), Failure> {
        let url = reqwest::Url::parse(&delivery.url)
            .map_err(|e| Failure::Final(format!("invalid URL: {e}")))?;
        let client = self.client_for(&url).await?;
        let secret = self
            .store
            .get_record(
                SECRET,
                &format!("{}/{}", delivery.tenant_id, delivery.rule_id),
            )
            .await
            .map_err(|e| Failure::Retry(e.to_string()))?
            .ok_or_else(|| {
                Failure::Final("the rule's webhook secret is gone (rule deleted?)".into())
            })?;
        let secret = String::from_utf8_lossy(&secret).into_owned();
        let response = client
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", "tern-webhook")
            .header(
                "x-tern-signature",
                signature(&secret, now_ms(), &delivery.body),
            )
            .header("x-tern-idempotency-key", &delivery.idempotency_key)
            .body(delivery.body.clone())
            .send()
            .await
            .map_err(|e| Failure::Retry(format!("request failed: {e}")))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Err(Failure::Retry(format!("the receiver answered {status}")))
        } else {
            Err(Failure::Final(format!("the receiver answered {status}")))
        }
    }

    /// The shared client, or, unless private networks are allowed, one pinned to the address
    /// that was checked, so that DNS cannot change its answer between the check and the call.
    async fn client_for(&self, url: &reqwest::Url) -> Result<reqwest::Client, Failure> {
        if self.allow_private_networks {
            return Ok(self.client.clone());
        }
        let host = url
            .host_str()
            .ok_or_else(|| Failure::Final("the URL has no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Failure::Retry(format!("cannot resolve {host}: {e}")))?
            .collect();
        let Some(addr) = addrs.first().copied() else {
            return Err(Failure::Retry(format!("{host} resolves to nothing")));
        };
        if addrs.iter().any(|a| is_private(a.ip())) {
            return Err(Failure::Final(format!(
                "{host} resolves to a private address; set `rules.webhook_allow_private_networks` to allow it"
            )));
        }
        reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .resolve(host, addr)
            .build()
            .map_err(|e| Failure::Retry(e.to_string()))
    }
}

/// Gives a rule a webhook secret if it has none; returns the new secret (shown once).
pub(crate) async fn ensure_secret(
    store: &dyn Store,
    tenant: TenantId,
    rule: Uuid,
) -> Result<Option<String>, RegistryError> {
    let key = format!("{tenant}/{rule}");
    if store.get_record(SECRET, &key).await?.is_some() {
        return Ok(None);
    }
    let secret = new_secret();
    store
        .put_record(SECRET, &key, Bytes::from(secret.clone()))
        .await?;
    Ok(Some(secret))
}

pub(crate) async fn delete_secret(
    store: &dyn Store,
    tenant: TenantId,
    rule: Uuid,
) -> Result<(), RegistryError> {
    store
        .delete_record(SECRET, &format!("{tenant}/{rule}"))
        .await?;
    Ok(())
}

/// The idempotency key of a row's delivery to a URL.
pub fn delivery_key(rule: Uuid, url: &str, trigger: &str) -> String {
    format!(
        "{}",
        crate::alerts::stable_id(&[&rule.to_string(), url, trigger])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_recognised() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.0.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private(private.parse().expect("ip")), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "100.128.0.1", "2001:4860:4860::8888"] {
            assert!(!is_private(public.parse().expect("ip")), "{public}");
        }
    }

    #[test]
    fn signatures_cover_time_and_body() {
        let a = signature("whsec_x", 1000, "{}");
        assert!(a.starts_with("t=1000,v1="));
        assert_eq!(a.len(), "t=1000,v1=".len() + 64);
        assert_ne!(a, signature("whsec_x", 1001, "{}"));
        assert_ne!(a, signature("whsec_x", 1000, "{ }"));
        assert_ne!(a, signature("whsec_y", 1000, "{}"));
        assert!(new_secret().starts_with("whsec_") && new_secret() != new_secret());
    }
}
