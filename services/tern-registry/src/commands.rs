//! Commands to devices: created here, kept durably with their state and history, handed to
//! whichever bridge holds the device through a [`CommandRoute`], and completed by the device's
//! response. Commands for offline devices stay pending and are fetched by the bridge when the
//! device subscribes to its command topic again.
//!
//! Every terminal state (succeeded, failed, expired, cancelled) is appended to the event log's
//! `commands` stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use serde::{Deserialize, Serialize};
use tern_core::{
    Command, CommandId, CommandResult, CommandState, Device, DeviceId, TenantId, ValidationError,
    now_ms, validate_command_name,
};
use tern_eventlog::{EventLog, Record};
use tern_proto::v1::{Event, EventKind};
use tern_store::{RecordWrite, Store};
use tokio::sync::{Notify, watch};

use crate::RegistryError;

const COMMAND: &str = "command";
const COMMAND_IDEMPOTENCY: &str = "command_idem";
/// Commands that have not ended, by expiry time: `{expires_at_ms:016x}/{tenant}/{device}/{id}`,
/// so the sweeper reads only what is due.
const COMMAND_EXPIRY: &str = "command_expiry";
/// Event-log topic of finished commands.
pub const COMMANDS_TOPIC: &str = "commands";
const MAX_IDEMPOTENCY_KEY: usize = 128;
const PAGE: usize = 1000;
const WRITE_LOCK_STRIPES: usize = 64;
/// Waiters are woken at once by changes made in this process; another process that shares the
/// store (the distributed mode) may change a command too, so they read it again at least this
/// often.
const SHARED_STORE_POLL: Duration = Duration::from_millis(500);

/// Hands a command to the connection of its device, wherever that is.
#[async_trait::async_trait]
pub trait CommandRoute: Send + Sync {
    /// Returns whether a connection of the device took it (it stays pending until the device
    /// acknowledges receipt either way).
    async fn deliver(&self, command: &Command) -> bool;
}

/// Limits and defaults (`[commands]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// TTL of a command that does not set one, in seconds.
    pub default_ttl_secs: u64,
    /// Longest TTL a command may ask for, in seconds.
    pub max_ttl_secs: u64,
    /// Largest command payload (its JSON encoding), in bytes.
    pub max_payload_bytes: usize,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            default_ttl_secs: 60,
            max_ttl_secs: 7 * 24 * 3600,
            max_payload_bytes: 64 * 1024,
        }
    }
}

/// What an application asks for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    pub name: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    pub ttl_secs: Option<u64>,
    /// Sending again with the same key returns the first command instead of a new one.
    pub idempotency_key: Option<String>,
}

pub struct Commands {
    store: Arc<dyn Store>,
    log: Arc<dyn EventLog>,
    config: CommandsConfig,
    route: OnceLock<Arc<dyn CommandRoute>>,
    /// Serialise read-modify-write of one command record (striped by command id) and the
    /// idempotency check of one device (striped by device id), without making every command
    /// of the platform wait for every other's fsync.
    write_locks: Vec<tokio::sync::Mutex<()>>,
    /// State changes, for callers waiting on a command.
    watchers: Mutex<HashMap<CommandId, watch::Sender<CommandState>>>,
    /// New commands, for devices long-polling for them (HTTP).
    arrivals: Mutex<HashMap<(TenantId, DeviceId), Arc<Notify>>>,
}

fn key(tenant: TenantId, device: DeviceId, id: CommandId) -> String {
    format!("{tenant}/{device}/{id}")
}

impl Commands {
    pub fn new(store: Arc<dyn Store>, log: Arc<dyn EventLog>, config: CommandsConfig) -> Self {
        Self {
            store,
            log,
            config,
            route: OnceLock::new(),
            write_locks: (0..WRITE_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            watchers: Mutex::new(HashMap::new()),
            arrivals: Mutex::new(HashMap::new()),
        }
    }

    async fn lock(&self, id: uuid::Uuid) -> tokio::sync::MutexGuard<'_, ()> {
        // UUID v4 and v7 both end in random bits.
        let stripe = (id.as_u128() as usize) % self.write_locks.len();
        self.write_locks[stripe].lock().await
    }

    /// Connects the bridge(s); set once at start-up.
    pub fn set_route(&self, route: Arc<dyn CommandRoute>) {
        let _ = self.route.set(route);
    }

    /// Creates a command and hands it to the device if it is connected. Returns the command and
    /// whether it is new (`false`: an earlier command with the same idempotency key).
    pub async fn send(
        &self,
        device: &Device,
        new: NewCommand,
    ) -> Result<(Command, bool), RegistryError> {
        validate_command_name(&new.name)?;
        let ttl_secs = new.ttl_secs.unwrap_or(self.config.default_ttl_secs);
        if ttl_secs == 0 || ttl_secs > self.config.max_ttl_secs {
            return Err(ValidationError::new(
                "ttl_secs",
                format!("must be 1..={} seconds", self.config.max_ttl_secs),
            )
            .into());
        }
        let payload_len = serde_json::to_vec(&new.payload)
            .map(|v| v.len())
            .unwrap_or(0);
        if payload_len > self.config.max_payload_bytes {
            return Err(ValidationError::new(
                "payload",
                format!(
                    "is {payload_len} bytes; the limit is {}",
                    self.config.max_payload_bytes
                ),
            )
            .into());
        }
        let idempotency = match &new.idempotency_key {
            Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || k.contains('\0') => {
                return Err(ValidationError::new(
                    "idempotency_key",
                    format!("must be 1..={MAX_IDEMPOTENCY_KEY} bytes without NUL"),
                )
                .into());
            }
            Some(k) => Some(format!("{}/{}/{k}", device.tenant_id, device.id)),
            None => None,
        };
        let _guard = self.lock(device.id.0).await;
        if let Some(idem) = &idempotency
            && let Some(id) = self.store.get_record(COMMAND_IDEMPOTENCY, idem).await?
        {
            let id = CommandId::parse(&String::from_utf8_lossy(&id))?;
            if let Some(existing) = self.load(device.tenant_id, device.id, id).await? {
                return Ok((existing, false));
            }
        }
        let now = now_ms();
        let mut command = Command {
            id: CommandId::new(),
            tenant_id: device.tenant_id,
            device_id: device.id,
            name: new.name,
            payload: new.payload,
            state: CommandState::Pending,
            created_at_ms: now,
            expires_at_ms: now.saturating_add((ttl_secs * 1000) as i64),
            idempotency_key: new.idempotency_key,
            result: None,
            history: Vec::new(),
        };
        command.history.push(tern_core::CommandTransition {
            state: CommandState::Pending,
            at_ms: now,
        });
        // The command, its expiry entry and its idempotency key, durable in one sync.
        let mut writes = vec![
            self.record(&command)?,
            RecordWrite::put(COMMAND_EXPIRY, expiry_key(&command), Bytes::new()),
        ];
        if let Some(idem) = idempotency {
            writes.push(RecordWrite::put(
                COMMAND_IDEMPOTENCY,
                idem,
                command.id.to_string(),
            ));
        }
        self.store.write_records(writes).await?;
        drop(_guard);
        if let Some(route) = self.route.get() {
            route.deliver(&command).await;
        }
        if let Some(arrival) = self
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(device.tenant_id, device.id))
        {
            arrival.notify_waiters();
        }
        Ok((command, true))
    }

    /// One command of a device; a due expiry is applied first.
    pub async fn get(
        &self,
        tenant: TenantId,
        device: DeviceId,
        id: CommandId,
    ) -> Result<Command, RegistryError> {
        self.update(tenant, device, id, |c, now| c.expire_if_due(now))
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("command {id}")))
    }

    /// A device's commands, newest first, up to `limit`; due expiries are applied.
    pub async fn list(
        &self,
        tenant: TenantId,
        device: DeviceId,
        limit: usize,
    ) -> Result<Vec<Command>, RegistryError> {
        let mut all = self.all_of(tenant, device).await?;
        all.reverse();
        all.truncate(limit);
        self.expire_due(all).await
    }

    /// A device's pending commands, oldest first: what a (re)connecting device is owed.
    pub async fn pending(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<Vec<Command>, RegistryError> {
        let all = self.all_of(tenant, device).await?;
        let pending = all
            .into_iter()
            .filter(|c| c.state == CommandState::Pending)
            .collect();
        Ok(self
            .expire_due(pending)
            .await?
            .into_iter()
            .filter(|c| c.state == CommandState::Pending)
            .collect())
    }

    /// A device's pending commands, waiting up to `wait` for one if there are none (HTTP
    /// long-poll). The commands returned count as delivered.
    pub async fn take_pending(
        &self,
        tenant: TenantId,
        device: DeviceId,
        wait: Duration,
    ) -> Result<Vec<Command>, RegistryError> {
        let arrival = self
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((tenant, device))
            .or_default()
            .clone();
        let deadline = tokio::time::Instant::now() + wait;
        let pending = loop {
            // Registered before reading, so a command sent in between still wakes us.
            let notified = arrival.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pending = self.pending(tenant, device).await?;
            if !pending.is_empty() {
                break pending;
            }
            let wake = deadline.min(tokio::time::Instant::now() + SHARED_STORE_POLL);
            if tokio::time::timeout_at(wake, notified).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                break Vec::new();
            }
        };
        {
            let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
            // Only this call and the map hold it: nobody else is waiting for the device.
            if Arc::strong_count(&arrival) == 2 {
                arrivals.remove(&(tenant, device));
            }
        }
        let mut delivered = Vec::with_capacity(pending.len());
        for command in pending {
            let id = command.id;
            delivered.push(self.delivered(tenant, device, id).await?.unwrap_or(command));
        }
        Ok(delivered)
    }

    /// The device acknowledged receipt; returns the command as it now is.
    pub async fn delivered(
        &self,
        tenant: TenantId,
        device: DeviceId,
        id: CommandId,
    ) -> Result<Option<Command>, RegistryError> {
        self.update(tenant, device, id, |c, now| {
            c.expire_if_due(now) || c.transition(CommandState::Delivered, now)
        })
        .await
    }

    /// The device's response: 2xx succeeds, anything else fails. `None` if the device has no
    /// such command; a response to a command that already ended changes nothing.
    pub async fn respond(
        &self,
        tenant: TenantId,
        device: DeviceId,
        id: CommandId,
        status: u16,
        payload: &[u8],
    ) -> Result<Option<Command>, RegistryError> {
        let payload = serde_json::from_slice(payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
        });
        self.update(tenant, device, id, |c, now| {
            if c.expire_if_due(now) {
                return true;
            }
            let state = if (200..300).contains(&status) {
                CommandState::Succeeded
            } else {
                CommandState::Failed
            };
            let moved = c.transition(state, now);
            if moved {
                c.result = Some(CommandResult { status, payload });
            }
            moved
        })
        .await
    }

    pub async fn cancel(
        &self,
        tenant: TenantId,
        device: DeviceId,
        id: CommandId,
    ) -> Result<Command, RegistryError> {
        let mut cancelled = false;
        let command = self
            .update(tenant, device, id, |c, now| {
                if c.expire_if_due(now) {
                    return true;
                }
                cancelled = c.transition(CommandState::Cancelled, now);
                cancelled
            })
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("command {id}")))?;
        if !cancelled {
            return Err(RegistryError::FailedPrecondition(format!(
                "command {id} is already {}",
                command.state.as_str()
            )));
        }
        Ok(command)
    }

    /// Waits until the command ends or `wait` passes (or it expires), and returns it as it is.
    pub async fn wait(
        &self,
        tenant: TenantId,
        device: DeviceId,
        id: CommandId,
        wait: Duration,
    ) -> Result<Command, RegistryError> {
        let mut changes = {
            let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
            watchers
                .entry(id)
                .or_insert_with(|| watch::channel(CommandState::Pending).0)
                .subscribe()
        };
        let deadline = tokio::time::Instant::now() + wait;
        let result = loop {
            let command = self.get(tenant, device, id).await?;
            if command.state.is_terminal() {
                break Ok(command);
            }
            let until_expiry =
                Duration::from_millis((command.expires_at_ms - now_ms()).max(0) as u64);
            let wake = deadline
                .min(tokio::time::Instant::now() + until_expiry)
                .min(tokio::time::Instant::now() + SHARED_STORE_POLL);
            match tokio::time::timeout_at(wake, changes.changed()).await {
                Ok(Ok(())) => continue,
                // The deadline (or the expiry, which the next `get` applies).
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    break self.get(tenant, device, id).await;
                }
                _ => continue,
            }
        };
        drop(changes);
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if watchers.get(&id).is_some_and(|w| w.receiver_count() == 0) {
            watchers.remove(&id);
        }
        result
    }

    /// Expires every command whose TTL has passed without an end, so that it is logged and
    /// waiters learn of it even if nobody reads it. Returns how many expired.
    pub async fn sweep_expired(&self) -> Result<usize, RegistryError> {
        let now = now_ms();
        let mut expired = 0;
        loop {
            let due = self
                .store
                .list_records(COMMAND_EXPIRY, "", None, PAGE)
                .await?;
            let mut progressed = false;
            for (key, _) in &due {
                let Some((at, tenant, device, id)) = parse_expiry_key(key) else {
                    tracing::warn!(key, "dropping an unreadable command expiry record");
                    self.store.delete_record(COMMAND_EXPIRY, key).await?;
                    continue;
                };
                if at > now {
                    return Ok(expired);
                }
                match self
                    .update(tenant, device, id, |c, now| c.expire_if_due(now))
                    .await?
                {
                    Some(c) if c.state == CommandState::Expired => expired += 1,
                    Some(c) if !c.state.is_terminal() => continue,
                    _ => {}
                }
                // Ended one way or another: its index entry goes (update removed it if it
                // expired the command just now; this covers records left behind).
                self.store.delete_record(COMMAND_EXPIRY, key).await?;
                progressed = true;
            }
            if due.len() < PAGE || !progressed {
                return Ok(expired);
            }
        }
    }

    /// Runs [`Commands::sweep_expired`] every `every` until `stop` resolves.
    pub async fn run_expiry(self: Arc<Self>, every: Duration, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.sweep_expired().await {
                tracing::error!(error = %e, "command expiry sweep failed");
            }
        }
    }

    async fn all_of(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<Vec<Command>, RegistryError> {
        let prefix = format!("{tenant}/{device}/");
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list_records(COMMAND, &prefix, after.as_deref(), PAGE)
                .await?;
            for (key, value) in &page {
                out.push(decode(key, value)?);
            }
            match page.last() {
                Some((key, _)) if page.len() == PAGE => after = Some(key.clone()),
                _ => return Ok(out),
            }
        }
    }

    async fn expire_due(&self, commands: Vec<Command>) -> Result<Vec<Command>, RegistryError> {
        let now = now_ms();
        let mut out = Vec::with_capacity(commands.len());
        for command in commands {
            if now >= command.expires_at_ms && !command.state.is_terminal() {
                let (t, d, id) = (command.tenant_id, command.device_id, command.id);
                if let Some(updated) = self.update(t, d, id, |c, now| c.expire_if_due(now)).await? {
                    out.push(updated);
                }
            } else {
                out.push(command);
            }
        }
        Ok(out)
    }

    async fn load(
        &self,
        tenant: TenantId,
        device: DeviceId,
        id: CommandId,
    ) -> Result<Option<Command>, RegistryError> {
        let key = key(tenant, device, id);
        match self.store.get_record(COMMAND, &key).await? {
            Some(value) => decode(&key, &value).map(Some),
            None => Ok(None),
        }
    }

    fn record(&self, command: &Command) -> Result<RecordWrite, RegistryError> {
        let value = serde_json::to_vec(command).map_err(|e| RegistryError::Corrupt {
            key: command.id.to_string(),
            reason: e.to_string(),
        })?;
        Ok(RecordWrite::put(
            COMMAND,
            key(command.tenant_id, command.device_id, command.id),
            value,
        ))
    }

    /// Loads, applies `change` (which says whether it changed anything), saves, tells waiters
    /// and logs a terminal state. `None` if there is no such command.
    async fn update(
        &self,
        tenant: TenantId,
        device: DeviceId,
        id: CommandId,
        change: impl FnOnce(&mut Command, i64) -> bool,
    ) -> Result<Option<Command>, RegistryError> {
        let guard = self.lock(id.0).await;
        let Some(mut command) = self.load(tenant, device, id).await? else {
            return Ok(None);
        };
        if !change(&mut command, now_ms()) {
            return Ok(Some(command));
        }
        let mut writes = vec![self.record(&command)?];
        if command.state.is_terminal() {
            writes.push(RecordWrite::delete(COMMAND_EXPIRY, expiry_key(&command)));
        }
        self.store.write_records(writes).await?;
        drop(guard);
        // Waiters learn of the change as soon as it is durable, before it is logged.
        if let Some(watcher) = self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            watcher.send_replace(command.state);
        }
        if command.state.is_terminal()
            && let Err(e) = self.log.append(vec![finished_record(&command)]).await
        {
            tracing::error!(error = %e, command = %id, "cannot append a finished command to the log");
        }
        Ok(Some(command))
    }
}

fn expiry_key(command: &Command) -> String {
    format!(
        "{:016x}/{}/{}/{}",
        command.expires_at_ms.max(0),
        command.tenant_id,
        command.device_id,
        command.id
    )
}

fn parse_expiry_key(key: &str) -> Option<(i64, TenantId, DeviceId, CommandId)> {
    let mut parts = key.split('/');
    let at = i64::from_str_radix(parts.next()?, 16).ok()?;
    let tenant = TenantId::parse(parts.next()?).ok()?;
    let device = DeviceId::parse(parts.next()?).ok()?;
    let id = CommandId::parse(parts.next()?).ok()?;
    Some((at, tenant, device, id))
}

fn decode(key: &str, value: &[u8]) -> Result<Command, RegistryError> {
    serde_json::from_slice(value).map_err(|e| RegistryError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// The finished command as a `tern.v1.Event` on the `commands` stream, keyed like the device's
/// other events.
fn finished_record(command: &Command) -> Record {
    let event = Event {
        tenant_id: command.tenant_id.to_string(),
        device_id: command.device_id.to_string(),
        kind: EventKind::Command as i32,
        message_id: uuid::Uuid::new_v4().to_string(),
        device_time_ms: 0,
        ingest_time_ms: now_ms(),
        content_type: "application/json".into(),
        payload: serde_json::to_vec(command).unwrap_or_default(),
        metrics: Vec::new(),
        trace_context: Default::default(),
        topic: command.request_topic(),
    };
    Record::new(
        COMMANDS_TOPIC,
        format!("{}/{}", command.tenant_id, command.device_id),
        event.encode_to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use tern_eventlog::{EmbeddedLog, EmbeddedLogConfig};
    use tern_store::EmbeddedStore;

    struct Fixture {
        _dir: tempfile::TempDir,
        commands: Arc<Commands>,
        log: Arc<dyn EventLog>,
        device: Device,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store")).expect("store"));
        let log: Arc<dyn EventLog> = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("log"))).expect("log"),
        );
        let device = Device {
            id: DeviceId::random(),
            tenant_id: TenantId::random(),
            name: "d".into(),
            labels: Default::default(),
            hardware_id: None,
            created_at_ms: 0,
            disabled: false,
            tokens_valid_from_s: 0,
            gateway_id: None,
            management: Default::default(),
            owner: None,
            groups: Default::default(),
        };
        Fixture {
            commands: Arc::new(Commands::new(store, log.clone(), CommandsConfig::default())),
            log,
            _dir: dir,
            device,
        }
    }

    fn new(name: &str) -> NewCommand {
        NewCommand {
            name: name.into(),
            payload: serde_json::json!({"delay_s": 1}),
            ..NewCommand::default()
        }
    }

    #[derive(Default)]
    struct CountingRoute(AtomicUsize);
    #[async_trait::async_trait]
    impl CommandRoute for CountingRoute {
        async fn deliver(&self, _: &Command) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst);
            true
        }
    }

    #[tokio::test]
    async fn a_command_is_routed_delivered_answered_and_logged() {
        let f = fixture();
        let route = Arc::new(CountingRoute::default());
        f.commands.set_route(route.clone());
        let (t, d) = (f.device.tenant_id, f.device.id);
        let (sent, created) = f
            .commands
            .send(&f.device, new("reboot"))
            .await
            .expect("send");
        assert!(created);
        assert_eq!(route.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            sent.request_topic(),
            format!("command/req/{}/reboot", sent.id)
        );
        f.commands
            .delivered(t, d, sent.id)
            .await
            .expect("delivered");
        let done = f
            .commands
            .respond(t, d, sent.id, 200, br#"{"ok":true}"#)
            .await
            .expect("respond")
            .expect("known");
        assert_eq!(done.state, CommandState::Succeeded);
        assert_eq!(done.result.as_ref().map(|r| r.status), Some(200));
        let states: Vec<_> = done.history.iter().map(|h| h.state).collect();
        assert_eq!(
            states,
            [
                CommandState::Pending,
                CommandState::Delivered,
                CommandState::Succeeded
            ]
        );
        // A second response changes nothing; a response from another device finds nothing.
        let again = f
            .commands
            .respond(t, d, sent.id, 500, b"late")
            .await
            .expect("respond");
        assert_eq!(again.map(|c| c.state), Some(CommandState::Succeeded));
        let foreign = f
            .commands
            .respond(t, DeviceId::random(), sent.id, 200, b"")
            .await
            .expect("respond");
        assert!(foreign.is_none());

        let mut consumer = f
            .log
            .consumer("test", COMMANDS_TOPIC)
            .await
            .expect("consumer");
        let records = consumer
            .poll(10, Duration::from_secs(5))
            .await
            .expect("poll");
        assert_eq!(records.len(), 1, "one finished command, logged once");
        let event = Event::decode(records[0].value.clone()).expect("event");
        assert_eq!(event.kind, EventKind::Command as i32);
    }

    #[tokio::test]
    async fn idempotency_keys_return_the_first_command() {
        let f = fixture();
        let keyed = || NewCommand {
            idempotency_key: Some("k-1".into()),
            ..new("reboot")
        };
        let (first, created) = f.commands.send(&f.device, keyed()).await.expect("send");
        let (second, created_again) = f.commands.send(&f.device, keyed()).await.expect("send");
        assert!(created && !created_again);
        assert_eq!(first.id, second.id);
        let all = f
            .commands
            .list(f.device.tenant_id, f.device.id, 10)
            .await
            .expect("list");
        assert_eq!(all.len(), 1);
    }

    #[tokio::test]
    async fn bad_requests_name_the_field() {
        let f = fixture();
        let field = |r: Result<(Command, bool), RegistryError>| match r {
            Err(RegistryError::Invalid(e)) => e.field,
            other => panic!("expected a validation error, got {other:?}"),
        };
        assert_eq!(field(f.commands.send(&f.device, new("a/b")).await), "name");
        let forever = NewCommand {
            ttl_secs: Some(0),
            ..new("x")
        };
        assert_eq!(field(f.commands.send(&f.device, forever).await), "ttl_secs");
        let huge = NewCommand {
            payload: serde_json::Value::String("x".repeat(70_000)),
            ..new("x")
        };
        assert_eq!(field(f.commands.send(&f.device, huge).await), "payload");
    }

    #[tokio::test]
    async fn pending_commands_come_oldest_first_and_expired_or_cancelled_ones_do_not() {
        let f = fixture();
        let (t, d) = (f.device.tenant_id, f.device.id);
        let (a, _) = f.commands.send(&f.device, new("a")).await.expect("send");
        let (b, _) = f.commands.send(&f.device, new("b")).await.expect("send");
        let (c, _) = f.commands.send(&f.device, new("c")).await.expect("send");
        let short = NewCommand {
            ttl_secs: Some(1),
            ..new("short")
        };
        let (s, _) = f.commands.send(&f.device, short).await.expect("send");
        f.commands.cancel(t, d, b.id).await.expect("cancel");
        let err = f.commands.cancel(t, d, b.id).await.unwrap_err();
        assert!(matches!(err, RegistryError::FailedPrecondition(_)), "{err}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let pending: Vec<_> = f
            .commands
            .pending(t, d)
            .await
            .expect("pending")
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(pending, [a.id, c.id]);
        let expired = f.commands.get(t, d, s.id).await.expect("get");
        assert_eq!(expired.state, CommandState::Expired);
    }

    #[tokio::test]
    async fn waiting_returns_when_the_device_answers_or_the_wait_ends() {
        let f = fixture();
        let (t, d) = (f.device.tenant_id, f.device.id);
        let (sent, _) = f.commands.send(&f.device, new("x")).await.expect("send");
        let commands = f.commands.clone();
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            commands.respond(t, d, sent.id, 503, b"busy").await
        });
        let done = f
            .commands
            .wait(t, d, sent.id, Duration::from_secs(10))
            .await
            .expect("wait");
        answer.await.expect("task").expect("respond");
        assert_eq!(done.state, CommandState::Failed);
        assert_eq!(
            done.result.map(|r| r.payload),
            Some(serde_json::Value::String("busy".into()))
        );

        let (unanswered, _) = f.commands.send(&f.device, new("y")).await.expect("send");
        let still = f
            .commands
            .wait(t, d, unanswered.id, Duration::from_millis(50))
            .await
            .expect("wait");
        assert_eq!(still.state, CommandState::Pending);
    }

    #[tokio::test]
    async fn long_polls_wake_on_a_new_command_and_take_it_as_delivered() {
        let f = fixture();
        let (t, d) = (f.device.tenant_id, f.device.id);
        let empty = f
            .commands
            .take_pending(t, d, Duration::from_millis(20))
            .await
            .expect("poll");
        assert!(empty.is_empty());
        let commands = f.commands.clone();
        let poll =
            tokio::spawn(async move { commands.take_pending(t, d, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (sent, _) = f.commands.send(&f.device, new("x")).await.expect("send");
        let got = poll.await.expect("task").expect("poll");
        assert_eq!(got.iter().map(|c| c.id).collect::<Vec<_>>(), [sent.id]);
        assert_eq!(got[0].state, CommandState::Delivered);
        assert!(
            f.commands.pending(t, d).await.expect("pending").is_empty(),
            "taken commands are no longer pending"
        );
    }

    #[tokio::test]
    async fn the_sweeper_expires_unanswered_commands_without_a_read() {
        let f = fixture();
        let short = NewCommand {
            ttl_secs: Some(1),
            ..new("short")
        };
        let (due, _) = f.commands.send(&f.device, short).await.expect("send");
        let (_long, _) = f.commands.send(&f.device, new("long")).await.expect("send");
        let (answered, _) = f
            .commands
            .send(
                &f.device,
                NewCommand {
                    ttl_secs: Some(1),
                    ..new("answered")
                },
            )
            .await
            .expect("send");
        let (t, d) = (f.device.tenant_id, f.device.id);
        f.commands
            .respond(t, d, answered.id, 200, b"{}")
            .await
            .expect("respond");
        assert_eq!(
            f.commands.sweep_expired().await.expect("sweep"),
            0,
            "nothing due yet"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(f.commands.sweep_expired().await.expect("sweep"), 1);
        assert_eq!(
            f.commands.sweep_expired().await.expect("sweep"),
            0,
            "swept once"
        );
        let mut consumer = f
            .log
            .consumer("test", COMMANDS_TOPIC)
            .await
            .expect("consumer");
        let finished: Vec<Event> = consumer
            .poll(10, Duration::from_secs(5))
            .await
            .expect("poll")
            .into_iter()
            .map(|r| Event::decode(r.value).expect("event"))
            .collect();
        assert_eq!(finished.len(), 2, "answered and expired, each logged once");
        let mut states = Vec::new();
        for id in [due.id, answered.id] {
            let stored = f
                .commands
                .load(t, d, id)
                .await
                .expect("load")
                .expect("exists");
            states.push(stored.state);
        }
        assert_eq!(states, [CommandState::Expired, CommandState::Succeeded]);
    }
}
