//! Command and twin delivery on the device's own topics (design.md, "Device-facing contract").
//!
//! A device subscribes to `command/req/#` (any filter whose first level is `command`) and
//! receives `command/req/{id}/{name}` with the command's JSON payload; it answers by publishing
//! to `command/res/{id}/{status}` (HTTP-style status, 2xx for success). Command subscriptions
//! belong to the device alone: they are kept here per device, never in the tenant's pub/sub
//! router, so no other device (and no `#` subscription) can see another device's commands.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use tern_core::{Command, CommandId, DeviceId, TenantId};
use tern_registry::{CommandRoute, DesiredState, TwinRoute};
use tokio::sync::mpsc;

use crate::router::Delivery;
use crate::topics::matches;

/// The first topic level reserved for commands.
pub(crate) const COMMAND_LEVEL: &str = "command";
const RESPONSE_PREFIX: &str = "command/res/";
/// The first topic level reserved for the device's twin.
const TWIN_LEVEL: &str = "twin";
/// Where a device receives its desired state (the whole document and its version).
pub(crate) const TWIN_DESIRED_TOPIC: &str = "twin/desired";
/// Where a device publishes changes of its reported state (a JSON merge patch).
pub(crate) const TWIN_REPORTED_TOPIC: &str = "twin/reported";

fn is_under(level: &str, topic: &str) -> bool {
    topic
        .strip_prefix(level)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Whether a topic name or filter is in the command namespace.
pub(crate) fn is_command_topic(topic: &str) -> bool {
    is_under(COMMAND_LEVEL, topic)
}

/// Whether a topic name or filter is in the twin namespace.
pub(crate) fn is_twin_topic(topic: &str) -> bool {
    is_under(TWIN_LEVEL, topic)
}

/// Topics that belong to one device (its commands and its twin), never to the tenant's
/// router.
pub(crate) fn is_device_topic(topic: &str) -> bool {
    is_command_topic(topic) || is_twin_topic(topic)
}

/// The delivery of a desired state on `twin/desired`.
pub(crate) fn desired_delivery(state: &DesiredState, qos: QoS) -> Delivery {
    Delivery::new(
        TWIN_DESIRED_TOPIC.into(),
        Bytes::from(serde_json::to_vec(state).unwrap_or_default()),
        qos,
        false,
    )
}

/// Parses `command/res/{id}/{status}`.
pub(crate) fn parse_response_topic(topic: &str) -> Result<(CommandId, u16), &'static str> {
    let rest = topic
        .strip_prefix(RESPONSE_PREFIX)
        .ok_or("devices may publish only to command/res/{id}/{status} under command/")?;
    let (id, status) = rest
        .split_once('/')
        .ok_or("expected command/res/{id}/{status}")?;
    let id = CommandId::parse(id).map_err(|_| "the command id in command/res/ is not a UUID")?;
    let status = status
        .parse::<u16>()
        .ok()
        .filter(|s| (100..=599).contains(s))
        .ok_or("the status in command/res/{id}/{status} must be a number 100..=599")?;
    Ok((id, status))
}

/// The delivery of a command to a connection at `qos`.
pub(crate) fn delivery(command: &Command, qos: QoS) -> Delivery {
    Delivery {
        command: Some(command.id),
        ..Delivery::new(
            command.request_topic().into(),
            Bytes::from(serde_json::to_vec(&command.payload).unwrap_or_default()),
            qos,
            false,
        )
    }
}

struct Target {
    connection: u64,
    filters: Vec<(String, QoS)>,
    queue: mpsc::Sender<Delivery>,
}

impl Target {
    /// The QoS of the best matching filter, if any matches.
    fn granted(&self, topic: &str) -> Option<QoS> {
        self.filters
            .iter()
            .filter(|(f, _)| matches(f, topic))
            .map(|(_, qos)| *qos)
            .max_by_key(|qos| *qos as u8)
    }
}

/// Which connection receives each device's commands.
#[derive(Default)]
pub(crate) struct CommandTargets {
    devices: Mutex<HashMap<(TenantId, DeviceId), Target>>,
}

impl CommandTargets {
    pub fn subscribe(
        &self,
        tenant: TenantId,
        device: DeviceId,
        connection: u64,
        filter: &str,
        qos: QoS,
        queue: mpsc::Sender<Delivery>,
    ) {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let target = devices.entry((tenant, device)).or_insert_with(|| Target {
            connection,
            filters: Vec::new(),
            queue: queue.clone(),
        });
        if target.connection != connection {
            // A newer connection of the device: the old one's filters are gone with it.
            *target = Target {
                connection,
                filters: Vec::new(),
                queue,
            };
        }
        target.filters.retain(|(f, _)| f != filter);
        target.filters.push((filter.to_string(), qos));
    }

    /// Returns whether the subscription existed.
    pub fn unsubscribe(
        &self,
        tenant: TenantId,
        device: DeviceId,
        connection: u64,
        filter: &str,
    ) -> bool {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        match devices.get_mut(&(tenant, device)) {
            Some(target) if target.connection == connection => {
                let before = target.filters.len();
                target.filters.retain(|(f, _)| f != filter);
                target.filters.len() < before
            }
            _ => false,
        }
    }

    pub fn drop_connection(&self, tenant: TenantId, device: DeviceId, connection: u64) {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if devices
            .get(&(tenant, device))
            .is_some_and(|t| t.connection == connection)
        {
            devices.remove(&(tenant, device));
        }
    }
}

/// The delivery of `command` to a subscription with `granted` QoS, if the filter matches.
pub(crate) fn owed(command: &Command, filter: &str, granted: QoS) -> Option<Delivery> {
    matches(filter, &command.request_topic()).then(|| delivery(command, granted))
}

#[async_trait::async_trait]
impl TwinRoute for CommandTargets {
    async fn desired_changed(&self, tenant: TenantId, device: DeviceId, state: &DesiredState) {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(target) = devices.get(&(tenant, device))
            && let Some(qos) = target.granted(TWIN_DESIRED_TOPIC)
        {
            // A full queue skips this version; the next change or subscription brings the
            // whole document again.
            let _ = target.queue.try_send(desired_delivery(state, qos));
        }
    }
}

#[async_trait::async_trait]
impl CommandRoute for CommandTargets {
    async fn deliver(&self, command: &Command) -> bool {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let Some(target) = devices.get(&(command.tenant_id, command.device_id)) else {
            return false;
        };
        let Some(qos) = target.granted(&command.request_topic()) else {
            return false;
        };
        // A full queue leaves the command pending: it goes out when the device subscribes
        // again (on reconnect).
        target.queue.try_send(delivery(command, qos)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::CommandState;

    fn command(tenant: TenantId, device: DeviceId) -> Command {
        Command {
            id: CommandId::new(),
            tenant_id: tenant,
            device_id: device,
            name: "reboot".into(),
            payload: serde_json::json!({"after_s": 5}),
            state: CommandState::Pending,
            created_at_ms: 0,
            expires_at_ms: i64::MAX,
            idempotency_key: None,
            result: None,
            history: vec![],
        }
    }

    #[tokio::test]
    async fn commands_reach_only_the_subscribed_connection_of_their_device() {
        let targets = CommandTargets::default();
        let (t, d, other) = (TenantId::random(), DeviceId::random(), DeviceId::random());
        let (tx, mut rx) = mpsc::channel(8);
        let c = command(t, d);
        assert!(!targets.deliver(&c).await, "not subscribed");
        targets.subscribe(t, d, 1, "command/req/#", QoS::AtLeastOnce, tx.clone());
        assert!(targets.deliver(&c).await);
        let got = rx.try_recv().expect("delivered");
        assert_eq!(&*got.topic, c.request_topic());
        assert_eq!(got.command, Some(c.id));
        assert_eq!(&got.payload[..], br#"{"after_s":5}"#);
        assert!(!targets.deliver(&command(t, other)).await, "another device");
        assert!(
            !targets.deliver(&command(TenantId::random(), d)).await,
            "another tenant"
        );

        targets.drop_connection(t, d, 2);
        assert!(
            targets.deliver(&c).await,
            "a stale connection id removes nothing"
        );
        targets.unsubscribe(t, d, 1, "command/req/#");
        assert!(!targets.deliver(&c).await);
    }

    #[test]
    fn response_topics_are_parsed_strictly() {
        let id = CommandId::new();
        assert_eq!(
            parse_response_topic(&format!("command/res/{id}/200")),
            Ok((id, 200))
        );
        for bad in [
            "command/req/x/y".to_string(),
            format!("command/res/{id}"),
            format!("command/res/{id}/ok"),
            format!("command/res/{id}/99"),
            "command/res/not-a-uuid/200".to_string(),
        ] {
            assert!(parse_response_topic(&bad).is_err(), "{bad}");
        }
        assert!(is_command_topic("command/req/#"));
        assert!(!is_command_topic("commands/x") && !is_command_topic("#"));
    }
}
