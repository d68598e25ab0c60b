//! tern-agent: the Linux device agent. It keeps one MQTT connection to the platform
//! (`session.rs`), publishes everything through an on-disk outbox (`outbox.rs`), reads
//! telemetry sources (`telemetry.rs`), applies the desired twin and carries out commands and
//! management operations (`operations.rs`, updates in `update.rs`) through the owner's hooks
//! (`hooks.rs`), and renews its own credentials (`credentials.rs`), which it got by enrolling
//! (`enrolment.rs`).

pub mod config;
pub mod credentials;
pub mod enrolment;
pub mod hooks;
pub mod operations;
pub mod outbox;
pub mod session;
pub mod state;
pub mod telemetry;
pub mod update;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::{Client, Url};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};

use crate::config::AgentConfig;
use crate::credentials::{Credentials, RefreshError, Vault};
use crate::outbox::Outbox;
use crate::session::{Inbound, SessionError};
use crate::state::{DeviceState, StateFile};
use crate::update::Slots;

/// Why the agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to (a signal).
    Stopped,
    /// A `wipe` erased its credentials; it needs `tern-agent enroll` again.
    Wiped,
    /// A `decommission`: wiped, and it refuses to run until enrolled again.
    Decommissioned,
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub struct Agent {
    config: AgentConfig,
    server: Url,
    http: Client,
    vault: Vault,
    /// Held across a refresh, so two renewals never spend the same refresh token.
    credentials: tokio::sync::Mutex<Option<Credentials>>,
    state_file: StateFile,
    state: Mutex<DeviceState>,
    outbox: Outbox,
    slots: Slots,
    public_key: Option<Vec<u8>>,
    reconnect: Notify,
    exit: watch::Sender<Option<Exit>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn http_client(config: &AgentConfig) -> anyhow::Result<Client> {
    let mut builder = Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60));
    if let Some(ca) = &config.ca_file {
        let pem =
            std::fs::read(ca).with_context(|| format!("ca_file: cannot read {}", ca.display()))?;
        for certificate in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("ca_file: no PEM certificates in {}", ca.display()))?
        {
            builder = builder.add_root_certificate(certificate);
        }
    }
    Ok(builder.build()?)
}

impl Agent {
    pub fn new(config: AgentConfig) -> anyhow::Result<Arc<Self>> {
        config.validate()?;
        let root = &config.root_dir;
        std::fs::create_dir_all(root)
            .with_context(|| format!("root_dir: cannot create {}", root.display()))?;
        let state_file = StateFile::new(root);
        let state = state_file.load()?;
        Ok(Arc::new(Self {
            server: config.server_url()?,
            http: http_client(&config)?,
            vault: Vault::new(root),
            credentials: tokio::sync::Mutex::new(None),
            state: Mutex::new(state),
            state_file,
            outbox: Outbox::open(&root.join("outbox"), config.telemetry.buffer_max_messages)?,
            slots: Slots::new(root),
            public_key: config
                .update
                .public_key
                .as_deref()
                .map(update::parse_public_key)
                .transpose()?,
            reconnect: Notify::new(),
            exit: watch::Sender::new(None),
            config,
        }))
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn decommissioned_marker(&self) -> PathBuf {
        self.config.root_dir.join("decommissioned")
    }

    fn hook_timeout(&self) -> Duration {
        Duration::from_secs(self.config.hooks.timeout_secs)
    }

    /// Takes a pre-issued refresh token (from `tern token device`), exchanges it for the
    /// device's own credentials and stores them.
    pub async fn enroll(&self, refresh_token: &str) -> anyhow::Result<Credentials> {
        let credentials = credentials::refresh(&self.http, &self.server, refresh_token)
            .await
            .context("enrolment failed")?;
        self.keep_enrolled(credentials).await
    }

    /// Enrols by the device authorization grant (`[enrolment]` in the configuration):
    /// `show` gets the code to display; returns once a person approved it.
    pub async fn enroll_with_code(
        &self,
        show: impl FnOnce(&enrolment::UserCode),
    ) -> anyhow::Result<Credentials> {
        let settings = &self.config.enrolment;
        let (Some(tenant), Some(client_id)) = (&settings.tenant, &settings.client_id) else {
            bail!(
                "enrolment.tenant and enrolment.client_id are not configured (or pass a \
                 pre-issued token in TERN_AGENT_REFRESH_TOKEN)"
            );
        };
        let flow = enrolment::DeviceFlow::new(&self.http, &self.server, tenant, client_id)?;
        let code = flow.start().await.context("enrolment failed")?;
        show(&code);
        let credentials = flow.wait(&code).await.context("enrolment failed")?;
        self.keep_enrolled(credentials).await
    }

    async fn keep_enrolled(&self, credentials: Credentials) -> anyhow::Result<Credentials> {
        self.vault.save(&credentials)?;
        let _ = std::fs::remove_file(self.decommissioned_marker());
        *self.credentials.lock().await = Some(credentials.clone());
        Ok(credentials)
    }

    /// The stored credentials, renewed first when `renew` is set or the access token is
    /// about to expire.
    async fn credentials(&self, renew: bool) -> anyhow::Result<Credentials> {
        let mut held = self.credentials.lock().await;
        if held.is_none() {
            *held = self.vault.load()?;
        }
        let Some(current) = held.clone() else {
            bail!("not enrolled: run `tern-agent enroll` first");
        };
        if !renew && now_ms() < current.renew_at_ms() {
            return Ok(current);
        }
        let renewed =
            credentials::refresh(&self.http, &self.server, &current.refresh_token).await?;
        self.vault.save(&renewed)?;
        tracing::info!(device = %renewed.device_id, "credentials renewed");
        *held = Some(renewed.clone());
        Ok(renewed)
    }

    /// Publishes a twin reported patch (through the outbox).
    pub fn report(&self, patch: &Value) -> anyhow::Result<u64> {
        self.outbox
            .push("twin/reported", &serde_json::to_vec(patch)?)
    }

    /// Reports the whole state and what the agent can do (operations whose hook is missing
    /// are left out, so the platform refuses them before sending).
    fn report_state(&self) -> anyhow::Result<()> {
        let mut reported = self.state.lock().expect("state lock").reported();
        reported["capabilities"] = self.capabilities().into();
        self.report(&reported).map(drop)
    }

    pub fn capabilities(&self) -> Vec<&'static str> {
        let hooks = &self.config.hooks;
        let mut offered = vec![
            "lock",
            "unlock",
            "wipe",
            "configure",
            "rotate_credentials",
            "update",
            "decommission",
        ];
        for (operation, hook) in [
            ("reboot", &hooks.reboot),
            ("locate", &hooks.location),
            ("feature", &hooks.feature),
        ] {
            if hook.is_some() {
                offered.push(operation);
            }
        }
        offered
    }

    /// Changes the device state, stores it and reports it.
    pub fn change_state(&self, change: impl FnOnce(&mut DeviceState)) -> anyhow::Result<()> {
        let reported = {
            let mut state = self.state.lock().expect("state lock");
            change(&mut state);
            self.state_file.save(&state)?;
            state.reported()
        };
        self.report(&reported).map(drop)
    }

    pub fn state(&self) -> DeviceState {
        self.state.lock().expect("state lock").clone()
    }

    fn stop(&self, exit: Exit) {
        self.exit.send_replace(Some(exit));
    }

    /// Stops the agent (for a signal).
    pub fn shut_down(&self) {
        self.stop(Exit::Stopped);
    }

    /// Runs until stopped, wiped or decommissioned: connects, reconnects with backoff,
    /// renews credentials, and keeps the workers going meanwhile.
    pub async fn run(self: Arc<Self>) -> anyhow::Result<Exit> {
        if self.decommissioned_marker().exists() {
            bail!("this device was decommissioned; `tern-agent enroll` it again to reuse it");
        }
        let (commands, commands_rx) = mpsc::channel(64);
        let (desired, desired_rx) = mpsc::channel(8);
        let inbound = Inbound { commands, desired };
        let workers = [
            tokio::spawn(operations::serve(self.clone(), commands_rx)),
            tokio::spawn(operations::follow_desired(self.clone(), desired_rx)),
            tokio::spawn(self.clone().publish_telemetry()),
        ];
        let mut exit = self.exit.subscribe();
        let mut backoff = Duration::from_secs(1);
        let mut renew = false;
        let result = loop {
            if let Some(why) = *exit.borrow_and_update() {
                break Ok(why);
            }
            let attempt = async {
                let credentials = self.credentials(renew).await?;
                let expiry =
                    Duration::from_millis((credentials.renew_at_ms() - now_ms()).max(0) as u64);
                let started = tokio::time::Instant::now();
                let until = async {
                    tokio::select! {
                        () = self.reconnect.notified() => {}
                        () = tokio::time::sleep(expiry) => {}
                        _ = exit.changed() => {}
                    }
                };
                let ended = session::run(&self, &credentials, &inbound, until).await;
                anyhow::Ok((ended, started.elapsed()))
            };
            match attempt.await {
                Ok((Ok(()), _)) => {
                    // Ended on purpose: new credentials, a token about to expire (renewed by
                    // `credentials` on the way back), or exit.
                    renew = false;
                    backoff = Duration::from_secs(1);
                    continue;
                }
                Ok((Err(SessionError::Refused(code)), _)) => {
                    tracing::warn!(?code, "connection refused; renewing credentials");
                    renew = true;
                }
                Ok((Err(e), lasted)) => {
                    tracing::warn!(error = %e, "connection lost");
                    renew = false;
                    if lasted > Duration::from_secs(30) {
                        backoff = Duration::from_secs(1);
                    }
                }
                Err(e) => {
                    match e.downcast_ref::<RefreshError>() {
                        Some(RefreshError::Refused { .. }) => {
                            tracing::error!(error = %format!("{e:#}"), "credentials refused; waiting for the device to be re-enabled or enrolled again")
                        }
                        _ => tracing::warn!(error = %format!("{e:#}"), "cannot connect"),
                    }
                    if self.vault.load()?.is_none() {
                        break Err(e);
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = exit.changed() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        for worker in workers {
            worker.abort();
        }
        result
    }

    async fn publish_telemetry(self: Arc<Self>) {
        let interval = Duration::from_secs(self.config.telemetry.interval_secs);
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            let readings = telemetry::collect(&self.config.telemetry, self.hook_timeout()).await;
            if readings.is_empty() {
                continue;
            }
            let pushed = serde_json::to_vec(&readings)
                .map_err(anyhow::Error::from)
                .and_then(|payload| self.outbox.push("telemetry", &payload));
            if let Err(e) = pushed {
                tracing::error!(error = %format!("{e:#}"), "cannot buffer telemetry");
            }
        }
    }
}
