//! The policy decision point (PDP) and policy administration point (PAP).
//!
//! Each tenant has a set of named Cedar policies, validated against Tern's schema
//! (`schema.rs`) whenever it changes. Every change makes a new version of the whole set, so
//! any earlier version can be listed and rolled back to. A tenant without changes has the
//! default policies (version 0). Decisions are cached briefly per tenant; a policy change
//! drops the tenant's cached decisions at once. Decisions can be audited, sampled or in full.

mod audit;
mod request;
mod schema;
#[cfg(test)]
mod tests;
pub mod xacml;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use cedar_policy::{Policy, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms};
use tern_store::Store;

pub use audit::{AuditConfig, AuditMode, AuditRecord};
pub use request::{AccessRequest, Decision, Environment, Outcome, Principal, Resource};
pub use schema::{ACTIONS, SCHEMA, on_device};

use crate::notices::{Notice, Notices};
use crate::{IdentityError, records};

const VERSION: &str = "policy_version";
const HEAD: &str = "policy_head";
/// How long a decision is reused (a policy change drops it sooner).
const CACHE_TTL: Duration = Duration::from_secs(30);
const CACHE_CAPACITY: usize = 50_000;
/// At most this many policies per tenant.
const MAX_POLICIES: usize = 500;
const MAX_POLICY_BYTES: usize = 64 * 1024;

/// One named policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPolicy {
    pub id: String,
    /// Cedar source.
    pub text: String,
}

/// One version of a tenant's policy set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: u64,
    pub created_at_ms: i64,
    /// Who made it (the API caller's subject).
    pub author: String,
    /// What changed: `create x`, `update x`, `delete x`, `rollback to 3`, `time zone X`.
    pub change: String,
    pub policies: Vec<NamedPolicy>,
    /// The IANA time zone (`Europe/Berlin`) of the context's `hour` and `weekday`; none: UTC.
    /// Part of the version, because it changes what the policies decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

struct Compiled {
    version: u64,
    set: PolicySet,
    time_zone: TimeZone,
}

impl Compiled {
    /// `request` with the tenant's offset from UTC at its time.
    fn localized(&self, request: &AccessRequest) -> AccessRequest {
        let mut request = request.clone();
        request.environment.utc_offset_s = utc_offset(&self.time_zone, request.environment.now_s);
        request
    }
}

fn utc_offset(zone: &TimeZone, now_s: i64) -> i32 {
    jiff::Timestamp::from_second(now_s)
        .map(|t| zone.to_offset(t).seconds())
        .unwrap_or(0)
}

/// The time zone a name stands for; an unknown name is an error on `time_zone`.
fn time_zone(name: Option<&str>) -> Result<TimeZone, ValidationError> {
    match name {
        None => Ok(TimeZone::UTC),
        Some(name) => TimeZone::get(name).map_err(|_| {
            ValidationError::new(
                "time_zone",
                format!("{name:?} is not an IANA time zone (such as Europe/Berlin or UTC)"),
            )
        }),
    }
}

struct CachedDecision {
    decision: Decision,
    at: Instant,
}

pub struct Pdp {
    store: Arc<dyn Store>,
    schema: Schema,
    compiled: RwLock<HashMap<TenantId, Arc<Compiled>>>,
    /// (tenant, policy version, request) → decision.
    cache: Mutex<HashMap<(TenantId, u64, AccessRequest), CachedDecision>>,
    /// Serialises changes of a tenant's policies (version numbers).
    changes: tokio::sync::Mutex<()>,
    /// Bumped by every policy change of any tenant: enforcement points that keep their own
    /// decisions (the bridge, per connection) drop them when it moves.
    generation: AtomicU64,
    audit: audit::Auditor,
    /// Where other instances hear of policy changes (the distributed mode).
    notices: OnceLock<Arc<Notices>>,
}

impl Pdp {
    pub async fn new(store: Arc<dyn Store>) -> Result<Self, IdentityError> {
        let (schema, _warnings) = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| IdentityError::Keys(format!("the built-in policy schema: {e}")))?;
        let pdp = Self {
            audit: audit::Auditor::new(store.clone()),
            store,
            schema,
            compiled: RwLock::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            notices: OnceLock::new(),
        };
        // The defaults must always be valid; a broken build fails here, not at a request.
        pdp.compile(&defaults())
            .map_err(|e| IdentityError::Keys(format!("the default policies: {e}")))?;
        Ok(pdp)
    }

    /// The tenant's current policies.
    pub async fn current(&self, tenant: TenantId) -> Result<PolicyVersion, IdentityError> {
        let head: Option<u64> = records::get(&*self.store, HEAD, &tenant.to_string()).await?;
        match head {
            None => Ok(defaults_version()),
            Some(v) => self.version(tenant, v).await,
        }
    }

    pub async fn version(
        &self,
        tenant: TenantId,
        version: u64,
    ) -> Result<PolicyVersion, IdentityError> {
        if version == 0 {
            return Ok(defaults_version());
        }
        records::get(&*self.store, VERSION, &version_key(tenant, version))
            .await?
            .ok_or_else(|| IdentityError::NotFound(format!("policy version {version}")))
    }

    /// Every version, newest first, without the policy texts.
    pub async fn versions(&self, tenant: TenantId) -> Result<Vec<PolicyVersion>, IdentityError> {
        let mut all: Vec<PolicyVersion> =
            records::list::<PolicyVersion>(&*self.store, VERSION, &format!("{tenant}/"))
                .await?
                .into_iter()
                .map(|(_, v)| v)
                .collect();
        all.push(defaults_version());
        for v in &mut all {
            v.policies.clear();
        }
        all.sort_by_key(|v| std::cmp::Reverse(v.version));
        Ok(all)
    }

    /// Creates or replaces the policy `id`.
    pub async fn put_policy(
        &self,
        tenant: TenantId,
        id: &str,
        text: &str,
        author: &str,
    ) -> Result<PolicyVersion, IdentityError> {
        validate_id(id)?;
        let _change = self.changes.lock().await;
        let base = self.current(tenant).await?;
        let mut policies = base.policies;
        let change = match policies.iter_mut().find(|p| p.id == id) {
            Some(existing) => {
                existing.text = text.to_string();
                format!("update {id}")
            }
            None => {
                policies.push(NamedPolicy {
                    id: id.to_string(),
                    text: text.to_string(),
                });
                format!("create {id}")
            }
        };
        let zone = base.time_zone;
        self.save(tenant, base.version, policies, zone, author, change)
            .await
    }

    /// Sets the time zone of the context's `hour` and `weekday` (`None`: UTC), as a new version.
    pub async fn set_time_zone(
        &self,
        tenant: TenantId,
        zone: Option<&str>,
        author: &str,
    ) -> Result<PolicyVersion, IdentityError> {
        time_zone(zone)?;
        let _change = self.changes.lock().await;
        let base = self.current(tenant).await?;
        let change = format!("time zone {}", zone.unwrap_or("UTC"));
        let zone = zone.map(str::to_string);
        self.save(tenant, base.version, base.policies, zone, author, change)
            .await
    }

    pub async fn delete_policy(
        &self,
        tenant: TenantId,
        id: &str,
        author: &str,
    ) -> Result<PolicyVersion, IdentityError> {
        let _change = self.changes.lock().await;
        let base = self.current(tenant).await?;
        let mut policies = base.policies;
        let before = policies.len();
        policies.retain(|p| p.id != id);
        if policies.len() == before {
            return Err(IdentityError::NotFound(format!("policy {id:?}")));
        }
        self.save(
            tenant,
            base.version,
            policies,
            base.time_zone,
            author,
            format!("delete {id}"),
        )
        .await
    }

    /// Makes `version`'s policies current again (as a new version).
    pub async fn rollback(
        &self,
        tenant: TenantId,
        version: u64,
        author: &str,
    ) -> Result<PolicyVersion, IdentityError> {
        let _change = self.changes.lock().await;
        let base = self.current(tenant).await?.version;
        let target = self.version(tenant, version).await?;
        self.save(
            tenant,
            base,
            target.policies,
            target.time_zone,
            author,
            format!("rollback to {version}"),
        )
        .await
    }

    /// Stores `policies` as the version after `base`, the version they were made from. The
    /// number comes from that same read, so a change made from a stale read conflicts with
    /// the version that superseded it instead of silently dropping it.
    async fn save(
        &self,
        tenant: TenantId,
        base: u64,
        policies: Vec<NamedPolicy>,
        zone_name: Option<String>,
        author: &str,
        change: String,
    ) -> Result<PolicyVersion, IdentityError> {
        if policies.len() > MAX_POLICIES {
            return Err(ValidationError::new(
                "policies",
                format!("a tenant may have at most {MAX_POLICIES} policies"),
            )
            .into());
        }
        let set = self.compile(&policies)?;
        let zone = time_zone(zone_name.as_deref())?;
        let version = PolicyVersion {
            version: base + 1,
            created_at_ms: now_ms(),
            author: author.to_string(),
            change,
            policies,
            time_zone: zone_name,
        };
        // Created only if absent: of two instances changing the tenant's policies at once, one
        // gets the version and the other a conflict (the `changes` lock covers only this one).
        let created = self
            .store
            .compare_and_swap(
                VERSION,
                &version_key(tenant, version.version),
                None,
                Some(records::to_bytes(&version)),
            )
            .await?;
        if !created {
            return Err(IdentityError::Conflict(
                "the policies changed meanwhile; read them again and retry".into(),
            ));
        }
        records::put(&*self.store, HEAD, &tenant.to_string(), &version.version).await?;
        self.install(tenant, version.version, set, zone);
        tracing::info!(%tenant, version = version.version, change = %version.change, "policies changed");
        if let Some(notices) = self.notices.get() {
            notices.send(Notice::PoliciesChanged { tenant }).await?;
        }
        Ok(version)
    }

    /// Sends policy changes to the other instances (the distributed mode); set once.
    pub(crate) fn set_notices(&self, notices: Arc<Notices>) {
        let _ = self.notices.set(notices);
    }

    /// Another instance changed the tenant's policies: drop what this one compiled and
    /// decided, so the next decision reads them again.
    pub(crate) fn forget(&self, tenant: TenantId) {
        self.compiled
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&tenant);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(t, _, _), _| *t != tenant);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Moves with every policy change of any tenant.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn install(&self, tenant: TenantId, version: u64, set: PolicySet, time_zone: TimeZone) {
        self.compiled
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                tenant,
                Arc::new(Compiled {
                    version,
                    set,
                    time_zone,
                }),
            );
        // Cached decisions of older versions can no longer be hit (the key holds the version);
        // drop them now rather than waiting for the TTL.
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(t, _, _), _| *t != tenant);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Parses and validates a set of policies against the schema; the error names the policy
    /// and says what is wrong where.
    pub fn compile(&self, policies: &[NamedPolicy]) -> Result<PolicySet, ValidationError> {
        let mut set = PolicySet::new();
        for p in policies {
            if p.text.len() > MAX_POLICY_BYTES {
                return Err(ValidationError::new(
                    format!("policies.{}", p.id),
                    format!("must be at most {MAX_POLICY_BYTES} bytes"),
                ));
            }
            let policy = Policy::parse(
                Some(PolicyId::from_str(&p.id).unwrap_or_else(|e| match e {})),
                &p.text,
            )
            .map_err(|e| {
                ValidationError::new(format!("policies.{}", p.id), describe_parse(&p.text, &e))
            })?;
            set.add(policy)
                .map_err(|e| ValidationError::new(format!("policies.{}", p.id), e.to_string()))?;
        }
        let result = Validator::new(self.schema.clone()).validate(&set, ValidationMode::Strict);
        if let Some(error) = result.validation_errors().next() {
            let id = error.policy_id().to_string();
            return Err(ValidationError::new(
                format!("policies.{id}"),
                error.to_string(),
            ));
        }
        Ok(set)
    }

    /// The tenant's compiled policies. Changes made through this process replace them at once
    /// (`install`), so the store is read only for a tenant not seen yet; other processes'
    /// changes arrive with the distributed mode's notices (#8).
    async fn compiled(&self, tenant: TenantId) -> Result<Arc<Compiled>, IdentityError> {
        if let Some(c) = self
            .compiled
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tenant)
        {
            return Ok(c.clone());
        }
        let policies = self.current(tenant).await?;
        let set = self.compile(&policies.policies)?;
        let compiled = Arc::new(Compiled {
            version: policies.version,
            set,
            time_zone: time_zone(policies.time_zone.as_deref())?,
        });
        // A change installed meanwhile is newer than what was read: keep it.
        let mut map = self.compiled.write().unwrap_or_else(|e| e.into_inner());
        let current = map.entry(tenant).or_insert_with(|| compiled.clone());
        if current.version < compiled.version {
            *current = compiled;
        }
        Ok(current.clone())
    }

    /// Decides a request against the tenant's current policies (cached), auditing it as the
    /// tenant's audit configuration says.
    pub async fn authorize(
        &self,
        tenant: TenantId,
        request: &AccessRequest,
    ) -> Result<Decision, IdentityError> {
        let compiled = self.compiled(tenant).await?;
        // Requests differ in their clock; within a minute they share a decision (cached at
        // most CACHE_TTL anyway), so conditions on time are exact to the minute.
        let mut key_request = request.clone();
        key_request.environment.now_s -= key_request.environment.now_s.rem_euclid(60);
        let key = (tenant, compiled.version, key_request);
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .get(&key)
                .filter(|c| c.at.elapsed() < CACHE_TTL)
                .map(|c| c.decision.clone())
        };
        let decision = match cached {
            Some(d) => d,
            None => {
                let local = compiled.localized(request);
                let decision = request::evaluate(&self.schema, &compiled.set, &local);
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
                cache.insert(
                    key,
                    CachedDecision {
                        decision: decision.clone(),
                        at: Instant::now(),
                    },
                );
                decision
            }
        };
        self.audit
            .record(tenant, compiled.version, request, &decision)
            .await;
        Ok(decision)
    }

    /// What `request` would get under `proposed` policies (a dry run; nothing is saved), in
    /// the tenant's current time zone.
    pub async fn what_if(
        &self,
        tenant: TenantId,
        proposed: &[NamedPolicy],
        request: &AccessRequest,
    ) -> Result<Decision, IdentityError> {
        let set = self.compile(proposed)?;
        let current = self.compiled(tenant).await?;
        let local = current.localized(request);
        Ok(request::evaluate(&self.schema, &set, &local))
    }

    pub fn auditor(&self) -> &audit::Auditor {
        &self.audit
    }
}

/// Version 0: what a tenant has before its first change.
fn defaults_version() -> PolicyVersion {
    PolicyVersion {
        version: 0,
        created_at_ms: 0,
        author: "tern".into(),
        change: "defaults".into(),
        policies: defaults(),
        time_zone: None,
    }
}

fn defaults() -> Vec<NamedPolicy> {
    schema::DEFAULT_POLICIES
        .iter()
        .map(|(id, text)| NamedPolicy {
            id: id.to_string(),
            text: text.to_string(),
        })
        .collect()
}

fn version_key(tenant: TenantId, version: u64) -> String {
    format!("{tenant}/{version:020}")
}

fn validate_id(id: &str) -> Result<(), ValidationError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "id",
            "policy ids are 1 to 64 of a-z, 0-9, '-' and '_'",
        ))
    }
}

/// A parse error with the line and column of the offending token.
fn describe_parse(text: &str, errors: &cedar_policy::ParseErrors) -> String {
    use miette::Diagnostic;
    let first = errors.iter().next();
    let offset = first
        .and_then(|e| e.labels())
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    let message = first
        .map(|e| e.to_string())
        .unwrap_or_else(|| errors.to_string());
    match offset {
        Some(offset) => {
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}
