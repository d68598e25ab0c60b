//! Routing over NATS, for when the registry and the bridge holding a device are not the same
//! process: commands, desired twin changes and revocations go to the subjects of the device,
//! `{prefix}.device.{tenant}.{device}.{command|twin|revoked}`, and only the bridge instance that
//! holds the device's connection subscribes to them ([`NatsEndpoint`]). A bridge that takes a
//! device's connection publishes `.takeover`, so that another instance still holding an older
//! connection of the device closes it (one session per client, as MQTT requires).
//!
//! A command is a request: the holder answers whether a connection took it. Nobody subscribed
//! (NATS "no responders") means the device is offline: the command stays pending in the
//! registry and goes out when the device subscribes to its commands again. Twin changes and
//! revocations are plain publishes (a device that is not connected needs neither).
//!
//! Tern does not authenticate publishers on these subjects: the NATS server's own authorization
//! must keep others off them. Tern signs in with a token or a user and password, over TLS with
//! an optional client certificate (`[routing.nats]`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, RequestErrorKind, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tern_core::{Command, DeviceId, TenantId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{AccessRevoked, CommandRoute, DesiredState, TwinRoute};

/// `[routing.nats]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// The NATS server(s), `nats://host:port` separated by commas.
    pub url: String,
    /// First token of every subject, so installations can share a NATS cluster.
    pub subject_prefix: String,
    /// How long a command waits for the holding bridge to answer, in milliseconds.
    pub request_timeout_ms: u64,
    /// A file holding the token the server expects (`authorization { token }`).
    pub token_file: Option<PathBuf>,
    /// A user to sign in as, with the password in `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// TLS: the CA (PEM) that signed the server's certificate. Setting it, or a `tls://` URL,
    /// requires TLS.
    pub ca_file: Option<PathBuf>,
    /// This process's certificate and key (PEM), for a server that verifies clients.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Why Tern could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    #[error("`{key}`: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{key}`: {path} is empty")]
    Empty { key: &'static str, path: PathBuf },
    #[error(transparent)]
    Connect(#[from] async_nats::ConnectError),
}

/// A secret from a file, without surrounding whitespace.
fn read_secret(path: &Path, key: &'static str) -> Result<String, NatsConnectError> {
    let secret = std::fs::read_to_string(path).map_err(|source| NatsConnectError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(NatsConnectError::Empty {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(secret.to_string())
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://localhost:4222".into(),
            subject_prefix: "tern".into(),
            request_timeout_ms: 2000,
            token_file: None,
            user: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl NatsConfig {
    /// Names the first setting that cannot work, as (`routing.nats.<key>`, reason).
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.url.trim().is_empty() {
            return Err((
                "routing.nats.url",
                "must name at least one nats://host:port",
            ));
        }
        let prefix_ok = !self.subject_prefix.is_empty()
            && self
                .subject_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !prefix_ok {
            return Err((
                "routing.nats.subject_prefix",
                "must be one subject token: letters, digits, '_' or '-'",
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(("routing.nats.request_timeout_ms", "must be at least 1"));
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err((
                "routing.nats.password_file",
                "must be set together with `routing.nats.user`",
            ));
        }
        if self.token_file.is_some() && self.user.is_some() {
            return Err((
                "routing.nats.token_file",
                "cannot be set with `routing.nats.user`: the server takes one or the other",
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err((
                "routing.nats.key_file",
                "must be set together with `routing.nats.cert_file`",
            ));
        }
        Ok(())
    }

    /// Connects once; afterwards the client reconnects by itself, with backoff.
    pub async fn connect(&self) -> Result<Client, NatsConnectError> {
        let mut options = ConnectOptions::new()
            .name("tern")
            .request_timeout(Some(Duration::from_millis(self.request_timeout_ms)));
        if let Some(path) = &self.token_file {
            options = options.token(read_secret(path, "routing.nats.token_file")?);
        }
        if let (Some(user), Some(path)) = (&self.user, &self.password_file) {
            let password = read_secret(path, "routing.nats.password_file")?;
            options = options.user_and_password(user.clone(), password);
        }
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options.connect(self.url.as_str()).await?)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Command,
    Twin,
    Revoked,
    Takeover,
}

impl Kind {
    fn token(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Twin => "twin",
            Kind::Revoked => "revoked",
            Kind::Takeover => "takeover",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        [Kind::Command, Kind::Twin, Kind::Revoked, Kind::Takeover]
            .into_iter()
            .find(|k| k.token() == token)
    }
}

fn subject(prefix: &str, tenant: TenantId, device: DeviceId, kind: Kind) -> String {
    format!("{prefix}.device.{tenant}.{device}.{}", kind.token())
}

const TAKEN: &[u8] = b"taken";
const NOT_TAKEN: &[u8] = b"not-taken";

/// The registry's side: the route of commands, twins and revocations.
pub struct NatsRouter {
    client: Client,
    prefix: String,
}

impl NatsRouter {
    pub fn new(client: Client, config: &NatsConfig) -> Self {
        Self {
            client,
            prefix: config.subject_prefix.clone(),
        }
    }

    async fn publish(&self, tenant: TenantId, device: DeviceId, kind: Kind, payload: Bytes) {
        let subject = subject(&self.prefix, tenant, device, kind);
        if let Err(e) = self.client.publish(subject, payload).await {
            tracing::error!(%tenant, %device, kind = kind.token(), error = %e, "NATS publish failed");
        }
    }
}

#[async_trait]
impl CommandRoute for NatsRouter {
    async fn deliver(&self, command: &Command) -> bool {
        let (tenant, device) = (command.tenant_id, command.device_id);
        let payload = match serde_json::to_vec(command) {
            Ok(json) => Bytes::from(json),
            Err(e) => {
                tracing::error!(command = %command.id, error = %e, "cannot encode a command");
                return false;
            }
        };
        let subject = subject(&self.prefix, tenant, device, Kind::Command);
        match self.client.request(subject, payload).await {
            Ok(reply) => reply.payload.as_ref() == TAKEN,
            Err(e) if e.kind() == RequestErrorKind::NoResponders => false,
            Err(e) => {
                tracing::warn!(%tenant, %device, command = %command.id, error = %e,
                    "no answer from the bridge holding the device; the command stays pending");
                false
            }
        }
    }
}

#[async_trait]
impl TwinRoute for NatsRouter {
    async fn desired_changed(&self, tenant: TenantId, device: DeviceId, state: &DesiredState) {
        match serde_json::to_vec(state) {
            Ok(json) => self.publish(tenant, device, Kind::Twin, json.into()).await,
            Err(e) => tracing::error!(%tenant, %device, error = %e, "cannot encode a twin"),
        }
    }
}

#[async_trait]
impl AccessRevoked for NatsRouter {
    async fn access_revoked(&self, tenant: TenantId, device: DeviceId) {
        self.publish(tenant, device, Kind::Revoked, Bytes::new())
            .await;
    }
}

/// Told when a device's connection starts and ends on this bridge instance.
pub trait DevicePresence: Send + Sync {
    fn attached(&self, tenant: TenantId, device: DeviceId);
    fn detached(&self, tenant: TenantId, device: DeviceId);
}

/// Told when another bridge instance took a device's connection.
pub trait TakenOver: Send + Sync {
    /// Closes this instance's connection of the device, if any.
    fn taken_over(&self, tenant: TenantId, device: DeviceId);
}

/// Where the endpoint hands what arrives: the bridge's own, in-process routes.
#[derive(Clone)]
pub struct LocalRoutes {
    pub commands: Arc<dyn CommandRoute>,
    pub twins: Arc<dyn TwinRoute>,
    pub access: Arc<dyn AccessRevoked>,
    pub takeover: Arc<dyn TakenOver>,
}

enum Presence {
    Attached(TenantId, DeviceId),
    Detached(TenantId, DeviceId),
}

/// The bridge's side: subscribes to the subjects of each device while it has a connection
/// here, and hands what arrives to the local routes.
pub struct NatsEndpoint {
    changes: mpsc::UnboundedSender<Presence>,
    task: JoinHandle<()>,
}

impl NatsEndpoint {
    pub fn start(client: Client, config: &NatsConfig, local: LocalRoutes) -> Self {
        // Unbounded: one small message per connection start or end, which the connections
        // themselves already bound.
        let (changes, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(track_presence(
            client,
            config.subject_prefix.clone(),
            local,
            rx,
        ));

        Self { changes, task }
    }
}

impl Drop for NatsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DevicePresence for NatsEndpoint {
    fn attached(&self, tenant: TenantId, device: DeviceId) {
        let _ = self.changes.send(Presence::Attached(tenant, device));
    }

    fn detached(&self, tenant: TenantId, device: DeviceId) {
        let _ = self.changes.send(Presence::Detached(tenant, device));
    }
}

struct Held {
    /// Connections of the device here: a returning device may overlap with the one it replaces.
    connections: usize,
    listener: JoinHandle<()>,
}

async fn track_presence(
    client: Client,
    prefix: String,
    local: LocalRoutes,
    mut changes: mpsc::UnboundedReceiver<Presence>,
) {
    let mut held: HashMap<(TenantId, DeviceId), Held> = HashMap::new();
    // Tells this instance's takeover announcements from the others'.
    let instance = Bytes::from(uuid::Uuid::new_v4().to_string());
    while let Some(change) = changes.recv().await {
        match change {
            Presence::Attached(tenant, device) => {
                if let Some(h) = held.get_mut(&(tenant, device)) {
                    h.connections += 1;
                    continue;
                }
                let filter = format!("{prefix}.device.{tenant}.{device}.*");
                match client.subscribe(filter).await {
                    Ok(subscriber) => {
                        let listener = tokio::spawn(listen(
                            client.clone(),
                            subscriber,
                            local.clone(),
                            (tenant, device),
                            instance.clone(),
                        ));
                        // Any other instance holding the device lets go of it.
                        let takeover = subject(&prefix, tenant, device, Kind::Takeover);
                        if let Err(e) = client.publish(takeover, instance.clone()).await {
                            tracing::warn!(%tenant, %device, error = %e, "cannot announce a takeover over NATS");
                        }
                        held.insert(
                            (tenant, device),
                            Held {
                                connections: 1,
                                listener,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(%tenant, %device, error = %e,
                            "cannot subscribe to the device's NATS subjects; its commands wait for its next subscription");
                    }
                }
            }
            Presence::Detached(tenant, device) => {
                if let Some(h) = held.get_mut(&(tenant, device)) {
                    h.connections -= 1;
                    if h.connections == 0 {
                        // Dropping the subscriber (with the task) unsubscribes.
                        h.listener.abort();
                        held.remove(&(tenant, device));
                    }
                }
            }
        }
    }
    for (_, h) in held {
        h.listener.abort();
    }
}

async fn listen(
    client: Client,
    mut subscriber: async_nats::Subscriber,
    local: LocalRoutes,
    (tenant, device): (TenantId, DeviceId),
    instance: Bytes,
) {
    while let Some(message) = subscriber.next().await {
        let kind = message
            .subject
            .rsplit('.')
            .next()
            .and_then(Kind::from_token);
        match kind {
            Some(Kind::Command) => {
                let taken = match serde_json::from_slice::<Command>(&message.payload) {
                    // Only the device whose subject it came on: a command naming another
                    // device is refused, whatever the publisher meant.
                    Ok(command) if command.tenant_id == tenant && command.device_id == device => {
                        local.commands.deliver(&command).await
                    }
                    Ok(_) | Err(_) => {
                        tracing::warn!(%tenant, %device, "refused a malformed NATS command");
                        false
                    }
                };
                reply(&client, message.reply, taken).await;
            }
            Some(Kind::Twin) => match serde_json::from_slice::<DesiredState>(&message.payload) {
                Ok(state) => local.twins.desired_changed(tenant, device, &state).await,
                Err(e) => {
                    tracing::warn!(%tenant, %device, error = %e, "refused a malformed NATS twin")
                }
            },
            Some(Kind::Revoked) => local.access.access_revoked(tenant, device).await,
            Some(Kind::Takeover) if message.payload != instance => {
                local.takeover.taken_over(tenant, device);
            }
            Some(Kind::Takeover) => {}
            None => {}
        }
    }
}

async fn reply(client: &Client, to: Option<Subject>, taken: bool) {
    if let Some(to) = to {
        let answer = Bytes::from_static(if taken { TAKEN } else { NOT_TAKEN });
        if let Err(e) = client.publish(to, answer).await {
            tracing::warn!(error = %e, "cannot answer a NATS command request");
        }
    }
}
