//! Notices to the other identity instances that share the store (the distributed mode): what
//! each keeps in memory for speed and must hear about when another instance changes it.
//!
//! The store holds the truth (revocations and policies are written there first); a notice only
//! tells the others to update their copies: a revoked token id or refresh family joins their
//! deny lists, a tenant's compiled policies and cached decisions are dropped and read again.
//! Notices go through the event log's `notices` stream; every instance reads all of them as a
//! consumer group of its own and skips its own.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_core::TenantId;
use tern_eventlog::{EventLog, Record};

use crate::IdentityError;

/// The event-log stream of notices.
pub const NOTICES_TOPIC: &str = "notices";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Notice {
    /// A token id (`jti`) or refresh family is revoked until `expires_at_ms`.
    Revoked { id: String, expires_at_ms: i64 },
    /// A tenant's policies changed.
    PoliciesChanged { tenant: TenantId },
}

#[derive(Serialize, Deserialize)]
struct Sent {
    /// The instance that sent it, which does not need it back.
    from: String,
    notice: Notice,
}

/// Where an instance sends its notices, once connected to the log.
pub(crate) struct Notices {
    instance: String,
    log: OnceLock<Arc<dyn EventLog>>,
}

impl Notices {
    pub fn new() -> Self {
        Self {
            instance: uuid::Uuid::new_v4().to_string(),
            log: OnceLock::new(),
        }
    }

    pub fn connect(&self, log: Arc<dyn EventLog>) {
        let _ = self.log.set(log);
    }

    /// The consumer group of this instance: every instance reads every notice.
    pub fn group(&self) -> String {
        format!("identity-{}", self.instance)
    }

    /// Tells the other instances; an error means they may not know yet (the change itself is
    /// stored), so the caller reports it and a retry sends the notice again.
    pub async fn send(&self, notice: Notice) -> Result<(), IdentityError> {
        let Some(log) = self.log.get() else {
            return Ok(());
        };
        let sent = Sent {
            from: self.instance.clone(),
            notice,
        };
        let value = Bytes::from(serde_json::to_vec(&sent).unwrap_or_default());
        log.append(vec![Record::new(NOTICES_TOPIC, "identity", value)])
            .await
            .map_err(|e| {
                IdentityError::Unavailable(format!(
                    "stored, but the other identity instances could not be told: {e}"
                ))
            })?;
        Ok(())
    }

    /// A notice from another instance; `None` for this instance's own and for malformed ones.
    pub fn read(&self, value: &[u8]) -> Option<Notice> {
        match serde_json::from_slice::<Sent>(value) {
            Ok(sent) if sent.from != self.instance => Some(sent.notice),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "malformed identity notice skipped");
                None
            }
        }
    }
}

/// How long a notice poll waits when nothing arrives.
pub(crate) const POLL_WAIT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use tern_core::now_ms;
    use tern_eventlog::testing::eventually;
    use tern_eventlog::{EmbeddedLog, EmbeddedLogConfig};
    use tern_registry::Registry;
    use tern_store::{EmbeddedStore, Store};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::policy::{AccessRequest, Environment, Principal, Resource};
    use crate::{Identity, IdentityConfig};

    /// Two identity instances on one store and one log, as two identity processes would be.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revocations_and_policy_changes_reach_the_other_instance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store")).expect("store"));
        let log: Arc<dyn EventLog> = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("log"))).expect("log"),
        );
        let registry = Arc::new(Registry::new(store.clone()));
        let config = IdentityConfig {
            public_url: "https://tern.example".into(),
            ..IdentityConfig::default()
        };
        let stop = CancellationToken::new();
        let mut instances = Vec::new();
        for _ in 0..2 {
            let identity = Arc::new(
                Identity::new(store.clone(), registry.clone(), config.clone())
                    .await
                    .expect("identity"),
            );
            tokio::spawn(identity.clone().follow_notices(log.clone(), stop.clone()));
            instances.push(identity);
        }
        let (a, b) = (&instances[0], &instances[1]);
        let tenant = registry.create_tenant("acme").await.expect("tenant");

        // b decides once and keeps the compiled defaults; a's change must reach it.
        let request = AccessRequest {
            principal: Principal::ApiToken { id: "t1".into() },
            action: "listDevices".into(),
            resource: Resource::Tenant {
                id: tenant.id.to_string(),
                name: tenant.name.clone(),
            },
            environment: Environment {
                now_s: now_ms() / 1000,
                utc_offset_s: 0,
                scopes: vec!["tern:read".into()],
                ..Environment::default()
            },
        };
        let allowed = async || {
            b.pdp()
                .authorize(tenant.id, &request)
                .await
                .expect("decide")
                .allowed()
        };
        assert!(allowed().await);
        a.pdp()
            .put_policy(
                tenant.id,
                "no_listing",
                r#"forbid (principal, action == Action::"listDevices", resource);"#,
                "test",
            )
            .await
            .expect("policy");
        assert!(
            eventually(async || !allowed().await).await,
            "b follows a's policies"
        );

        // Changes made at once through both never lose one another: either one gets a
        // conflict, or they ran one after the other and the later version holds both.
        let allow = r#"permit (principal, action, resource);"#;
        let (x, y) = tokio::join!(
            a.pdp().put_policy(tenant.id, "from_a", allow, "a"),
            b.pdp().put_policy(tenant.id, "from_b", allow, "b")
        );
        match (x, y) {
            (Ok(_), Err(IdentityError::Conflict(_))) | (Err(IdentityError::Conflict(_)), Ok(_)) => {
            }
            (Ok(x), Ok(y)) => {
                assert_ne!(x.version, y.version, "each change has its own version");
                let later = if x.version > y.version { x } else { y };
                for id in ["from_a", "from_b"] {
                    assert!(
                        later.policies.iter().any(|p| p.id == id),
                        "{id} survives in version {}",
                        later.version
                    );
                }
            }
            (x, y) => panic!("one version and one conflict, or two in turn: {x:?} / {y:?}"),
        }

        let expires = now_ms() + 60_000;
        a.oauth().revoke_id("jti-1", expires).await.expect("revoke");
        assert!(
            eventually(async || b.oauth().is_revoked("jti-1")).await,
            "b refuses what a revoked"
        );
        stop.cancel();
    }
}
