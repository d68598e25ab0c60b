//! Which services a process runs: all of them (`tern up`), or one (`tern bridge`,
//! `tern registry`, ...), the distributed shape where each scales on its own.

use crate::config::{EventLogBackend, RoutingBackend, UpConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// MQTT, MQTT over TLS and WebSocket, CoAP: the device endpoints.
    Bridge,
    /// The `tern.v1.Registry` gRPC service, OTA campaign ticks and command expiry.
    Registry,
    /// The `tern.v1.Identity` gRPC service, OAuth 2.0 / OIDC endpoints, signing-key rotation.
    Identity,
    /// Ingest into the store, the rule engine, webhooks and retention.
    Analytics,
    /// The REST API (`/api/v1`) and the jobs it starts.
    Gateway,
    /// The web dashboard's pages.
    Dashboard,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Bridge => "bridge",
            Role::Registry => "registry",
            Role::Identity => "identity",
            Role::Analytics => "analytics",
            Role::Gateway => "gateway",
            Role::Dashboard => "dashboard",
        }
    }
}

/// The services of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// `tern up`: every service, wired in process.
    All,
    /// One service; the others are separate processes sharing the store, the log and NATS.
    One(Role),
}

impl Roles {
    pub fn has(self, role: Role) -> bool {
        match self {
            Roles::All => true,
            Roles::One(one) => one == role,
        }
    }

    /// `tern up` or `tern {role}`, for messages.
    pub fn command(self) -> String {
        match self {
            Roles::All => "tern up".into(),
            Roles::One(role) => format!("tern {}", role.name()),
        }
    }

    /// Whether this process needs the store, the log and identity (the dashboard needs none:
    /// its pages call the REST API from the browser).
    pub fn needs_platform(self) -> bool {
        self != Roles::One(Role::Dashboard)
    }

    /// A service alone shares everything with the other processes, so it cannot run on the
    /// embedded store, the embedded log or in-process routing; the error names the key.
    pub fn check(self, config: &UpConfig) -> anyhow::Result<()> {
        let Roles::One(role) = self else {
            return Ok(());
        };
        if role == Role::Dashboard {
            return Ok(());
        }
        let command = self.command();
        if config.store.url.is_empty() {
            anyhow::bail!(
                "invalid configuration: `{command}` shares its data with the other services: \
                 set `store.url` to a `tern store` (docs/distributed.md)"
            );
        }
        if config.eventlog.backend != EventLogBackend::Kafka {
            anyhow::bail!(
                "invalid configuration: `{command}` shares the event log with the other \
                 services: set `eventlog.backend = \"kafka\"` (docs/distributed.md)"
            );
        }
        if config.routing.backend != RoutingBackend::Nats {
            anyhow::bail!(
                "invalid configuration: `{command}` reaches devices through the bridges over \
                 NATS: set `routing.backend = \"nats\"` (docs/distributed.md)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_alone_needs_the_shared_backends_and_names_the_missing_key() {
        let mut config = UpConfig::default();
        Roles::All
            .check(&config)
            .expect("tern up runs on embedded defaults");
        Roles::One(Role::Dashboard)
            .check(&config)
            .expect("the dashboard holds no data");
        let err = Roles::One(Role::Bridge)
            .check(&config)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tern bridge") && err.contains("store.url"),
            "{err}"
        );
        config.store.url = "http://tern-store:50052".into();
        let err = Roles::One(Role::Analytics)
            .check(&config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("eventlog.backend"), "{err}");
        config.eventlog.backend = EventLogBackend::Kafka;
        let err = Roles::One(Role::Gateway)
            .check(&config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("routing.backend"), "{err}");
        config.routing.backend = RoutingBackend::Nats;
        let all = [
            Role::Bridge,
            Role::Registry,
            Role::Identity,
            Role::Analytics,
            Role::Gateway,
            Role::Dashboard,
        ];
        for role in all {
            Roles::One(role).check(&config).expect("shared backends");
        }
    }
}
