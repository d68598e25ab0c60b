//! The bridge's policy enforcement point: every publish and subscribe of a device is decided by
//! its tenant's policies (action `publish` or `subscribe`, the topic or filter as resource, the
//! device with its labels as principal).
//!
//! Decisions are kept per connection and per topic, so the publish path stays synchronous for
//! topics already decided (telemetry, after the first message); a policy change anywhere, or
//! 30 seconds, drops them. A connection that never publishes allocates nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tern_core::{DeviceId, TenantId, now_ms};
use tern_identity::policy::{AccessRequest, Environment, Principal, Resource};

use crate::Bridge;

/// As long as the PDP's own cache: time-of-day conditions take effect within this.
const TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Action {
    Publish,
    Subscribe,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
        }
    }
}

pub(crate) struct Decisions {
    generation: u64,
    since: Instant,
    principal: Principal,
    /// By topic (publish) or filter (subscribe).
    publish: HashMap<String, bool>,
    subscribe: HashMap<String, bool>,
}

impl Decisions {
    fn of(&mut self, action: Action) -> &mut HashMap<String, bool> {
        match action {
            Action::Publish => &mut self.publish,
            Action::Subscribe => &mut self.subscribe,
        }
    }
}

/// The topic as the policies see it: a device's answers to commands
/// (`command/res/{id}/{status}`) are all `command/res`, so that each new command id is not a
/// new decision.
pub(crate) fn topic_resource(topic: &str) -> &str {
    if topic.starts_with("command/res/") {
        "command/res"
    } else {
        topic
    }
}

/// Drops the connection's decisions once they are [`TTL`] old; called once per burst of
/// packets, so that [`cached`] need not read the clock for every publish.
pub(crate) fn expire(decisions: &mut Option<Box<Decisions>>) {
    if decisions.as_ref().is_some_and(|d| d.since.elapsed() >= TTL) {
        *decisions = None;
    }
}

/// What the connection already knows about `topic` (decided under the PDP's current
/// `generation`).
pub(crate) fn cached(
    decisions: &Option<Box<Decisions>>,
    generation: u64,
    action: Action,
    topic: &str,
) -> Option<bool> {
    let d = decisions.as_ref()?;
    if d.generation != generation {
        return None;
    }
    let map = match action {
        Action::Publish => &d.publish,
        Action::Subscribe => &d.subscribe,
    };
    map.get(topic).copied()
}

/// Asks the PDP (unless the answer is cached) whether the device may do `action` on `topic`.
/// A PDP failure refuses (fail closed) and is logged.
pub(crate) async fn decide(
    bridge: &Bridge,
    decisions: &mut Option<Box<Decisions>>,
    (tenant, device): (TenantId, DeviceId),
    peer: Option<IpAddr>,
    action: Action,
    topic: &str,
) -> bool {
    let pdp = bridge.identity.pdp();
    let generation = pdp.generation();
    if let Some(allowed) = cached(decisions, generation, action, topic) {
        return allowed;
    }
    let fresh = decisions
        .as_ref()
        .is_some_and(|d| d.generation == generation && d.since.elapsed() < TTL);
    if !fresh {
        // The device's labels may have changed too: read it again.
        let principal = match bridge.registry.device_of(tenant, &device.to_string()).await {
            Ok(d) => Principal::Device {
                id: d.id.to_string(),
                name: d.name,
                labels: d.labels,
            },
            // Anonymous clients are not registered devices.
            Err(_) => Principal::Device {
                id: device.to_string(),
                name: device.to_string(),
                labels: Default::default(),
            },
        };
        *decisions = Some(Box::new(Decisions {
            generation,
            since: Instant::now(),
            principal,
            publish: HashMap::new(),
            subscribe: HashMap::new(),
        }));
    }
    let Some(d) = decisions.as_mut() else {
        return false;
    };
    let request = AccessRequest {
        principal: d.principal.clone(),
        action: action.name().into(),
        resource: Resource::Topic {
            name: topic.to_string(),
        },
        environment: Environment {
            now_s: now_ms() / 1000,
            utc_offset_s: 0,
            source_ip: peer,
            scopes: Vec::new(),
            protocol: Some("mqtt".into()),
        },
    };
    let allowed = match pdp.authorize(tenant, &request).await {
        Ok(decision) => {
            if !decision.allowed() {
                tracing::info!(action = action.name(), topic, outcome = ?decision.outcome,
                    policies = ?decision.policies, "refused by policy");
            }
            decision.allowed()
        }
        Err(e) => {
            tracing::error!(error = %e, "policy decision failed; refusing");
            false
        }
    };
    d.of(action).insert(topic.to_string(), allowed);
    allowed
}
