//! OTA campaigns: one artifact rolled out to the devices a selector picks, in stages: a canary
//! wave (a percentage of the devices), then waves of `wave_size`; each wave starts only when
//! the previous one has finished, at most `max_concurrent` devices update at once, new
//! updates start only inside the maintenance window, and when the failure rate among the
//! finished devices reaches the threshold the campaign pauses or aborts on its own.
//!
//! Each device gets the typed `update` operation as a command (idempotency key
//! `campaign:{id}:{device}`, so a repeated tick never sends twice); its progress comes from the
//! command's outcome and, meanwhile, from the `update.state` the agent reports in its twin.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tern_core::{
    CommandId, CommandState, DeviceId, Operation, Selector, TenantId, ValidationError, now_ms,
};
use tern_store::Store;
use uuid::Uuid;

use super::artifacts::Artifacts;
use crate::registry::{decode, to_bytes};
use crate::{Commands, Lease, NewCommand, Registry, RegistryError, Twins};

const CAMPAIGN: &str = "ota_campaign";
const TARGET: &str = "ota_campaign_device";
/// `{tenant}/{campaign}` of every running campaign, so a tick reads only those.
const RUNNING: &str = "ota_campaign_running";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    #[default]
    Abort,
    Pause,
}

/// When new updates may start: `HH:MM` to `HH:MM`, UTC; the end may be past midnight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start: String,
    pub end: String,
}

fn minutes(field: &str, hhmm: &str) -> Result<u32, ValidationError> {
    let parsed = hhmm.split_once(':').and_then(|(h, m)| {
        let (h, m) = (h.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
        (h < 24 && m < 60 && hhmm.len() == 5).then_some(h * 60 + m)
    });
    parsed.ok_or_else(|| ValidationError::new(field, format!("HH:MM expected, got {hhmm:?}")))
}

impl Window {
    fn validate(&self) -> Result<(), ValidationError> {
        minutes("maintenance_window.start", &self.start)?;
        minutes("maintenance_window.end", &self.end)?;
        Ok(())
    }

    /// Whether `now_ms` is inside the window.
    pub fn contains(&self, now_ms: i64) -> bool {
        let (Ok(start), Ok(end)) = (minutes("", &self.start), minutes("", &self.end)) else {
            return false;
        };
        let now = ((now_ms / 60_000) % (24 * 60)) as u32;
        if start <= end {
            (start..end).contains(&now)
        } else {
            now >= start || now < end
        }
    }
}

fn default_canary() -> u8 {
    10
}
fn default_concurrency() -> u32 {
    50
}
fn default_threshold() -> u8 {
    20
}
fn default_timeout() -> u64 {
    3600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCampaign {
    pub artifact_id: Uuid,
    /// Label selector (`site=plant-3,tier!=test`); the devices are fixed at creation.
    pub selector: String,
    #[serde(default = "default_canary")]
    pub canary_percent: u8,
    /// Devices per wave after the canary; 0: all the rest in one wave.
    #[serde(default)]
    pub wave_size: u32,
    #[serde(default = "default_concurrency")]
    pub max_concurrent: u32,
    #[serde(default = "default_threshold")]
    pub failure_threshold_percent: u8,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// How long a device has to finish its update (the command's TTL).
    #[serde(default = "default_timeout")]
    pub device_timeout_secs: u64,
    #[serde(default)]
    pub maintenance_window: Option<Window>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    Running,
    Paused,
    Aborted,
    Completed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub total: u32,
    pub pending: u32,
    pub in_progress: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub skipped: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub artifact_id: Uuid,
    pub version: String,
    pub selector: String,
    pub canary_percent: u8,
    pub wave_size: u32,
    pub max_concurrent: u32,
    pub failure_threshold_percent: u8,
    pub on_failure: OnFailure,
    pub device_timeout_secs: u64,
    pub maintenance_window: Option<Window>,
    pub state: CampaignState,
    /// Why it paused or aborted.
    pub reason: Option<String>,
    pub waves: u32,
    /// The wave being rolled out (0 is the canary).
    pub current_wave: u32,
    pub counts: Counts,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Pending,
    InProgress,
    Succeeded,
    Failed,
    /// Not updated: the campaign was aborted first, or the device was deleted.
    Skipped,
}

/// One device of a campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub device_id: DeviceId,
    pub wave: u32,
    pub state: TargetState,
    pub command_id: Option<CommandId>,
    /// The agent's last reported step (`downloading`, `verifying`, `installing`, ...).
    pub progress: Option<String>,
    pub reason: Option<String>,
    pub updated_at_ms: i64,
}

pub struct Campaigns {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    commands: Arc<Commands>,
    twins: Arc<Twins>,
    artifacts: Arc<Artifacts>,
    /// Where devices download artifacts: `{public_url}/device/v1/artifacts/{id}`.
    public_url: String,
}

fn key(tenant: TenantId, id: Uuid) -> String {
    format!("{tenant}/{id}")
}

impl Campaigns {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        commands: Arc<Commands>,
        twins: Arc<Twins>,
        artifacts: Arc<Artifacts>,
        public_url: String,
    ) -> Self {
        Self {
            store,
            registry,
            commands,
            twins,
            artifacts,
            public_url: public_url.trim_end_matches('/').to_string(),
        }
    }

    pub async fn create(
        &self,
        tenant: TenantId,
        new: NewCampaign,
    ) -> Result<Campaign, RegistryError> {
        if new.canary_percent > 100 {
            return Err(ValidationError::new("canary_percent", "must be 0..=100").into());
        }
        if !(1..=100).contains(&new.failure_threshold_percent) {
            return Err(
                ValidationError::new("failure_threshold_percent", "must be 1..=100").into(),
            );
        }
        if new.max_concurrent == 0 {
            return Err(ValidationError::new("max_concurrent", "must be at least 1").into());
        }
        if new.device_timeout_secs == 0 {
            return Err(ValidationError::new("device_timeout_secs", "must be at least 1").into());
        }
        if let Some(window) = &new.maintenance_window {
            window.validate()?;
        }
        let artifact = self.artifacts.get(tenant, new.artifact_id).await?;
        let selector = Selector::parse(&new.selector)?;
        let mut devices = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = self
                .registry
                .select_devices(tenant, &selector, after, 500)
                .await?;
            devices.extend(page.into_iter().map(|d| d.id));
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        if devices.is_empty() {
            return Err(ValidationError::new("selector", "selects no device").into());
        }
        let waves = assign_waves(devices.len(), new.canary_percent, new.wave_size);
        let now = now_ms();
        let id = Uuid::now_v7();
        let targets: Vec<(String, bytes::Bytes)> = devices
            .iter()
            .zip(&waves)
            .map(|(device, wave)| {
                let target = Target {
                    device_id: *device,
                    wave: *wave,
                    state: TargetState::Pending,
                    command_id: None,
                    progress: None,
                    reason: None,
                    updated_at_ms: now,
                };
                (format!("{tenant}/{id}/{device}"), to_bytes(&target))
            })
            .collect();
        self.store.put_records(TARGET, targets).await?;
        let campaign = Campaign {
            id,
            tenant_id: tenant,
            artifact_id: artifact.id,
            version: artifact.version,
            selector: new.selector,
            canary_percent: new.canary_percent,
            wave_size: new.wave_size,
            max_concurrent: new.max_concurrent,
            failure_threshold_percent: new.failure_threshold_percent,
            on_failure: new.on_failure,
            device_timeout_secs: new.device_timeout_secs,
            maintenance_window: new.maintenance_window,
            state: CampaignState::Running,
            reason: None,
            waves: waves.iter().max().map_or(0, |w| w + 1),
            current_wave: 0,
            counts: Counts {
                total: devices.len() as u32,
                pending: devices.len() as u32,
                ..Counts::default()
            },
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.save(&campaign).await?;
        Ok(campaign)
    }

    /// Stores the campaign and keeps the index of running ones, which is all a tick reads.
    /// The index entry is written before a running campaign and removed after a stopped one,
    /// so a crash in between leaves an extra entry (skipped and removed by the next tick),
    /// never a running campaign nobody advances.
    async fn save(&self, campaign: &Campaign) -> Result<(), RegistryError> {
        let key = key(campaign.tenant_id, campaign.id);
        let running = campaign.state == CampaignState::Running;
        if running {
            self.store
                .put_record(RUNNING, &key, bytes::Bytes::new())
                .await?;
        }
        self.store
            .put_record(CAMPAIGN, &key, to_bytes(campaign))
            .await?;
        if !running {
            self.store.delete_record(RUNNING, &key).await?;
        }
        Ok(())
    }

    pub async fn get(&self, tenant: TenantId, id: Uuid) -> Result<Campaign, RegistryError> {
        let key = key(tenant, id);
        match self.store.get_record(CAMPAIGN, &key).await? {
            Some(bytes) => decode(&key, &bytes),
            None => Err(RegistryError::NotFound(format!("campaign {id}"))),
        }
    }

    pub async fn list(&self, tenant: TenantId) -> Result<Vec<Campaign>, RegistryError> {
        crate::registry::list_all(self.store.as_ref(), CAMPAIGN, &format!("{tenant}/")).await
    }

    /// The campaign's devices, in wave order.
    pub async fn targets(&self, tenant: TenantId, id: Uuid) -> Result<Vec<Target>, RegistryError> {
        let mut targets: Vec<Target> =
            crate::registry::list_all(self.store.as_ref(), TARGET, &format!("{tenant}/{id}/"))
                .await?;
        targets.sort_by_key(|t| t.wave);
        Ok(targets)
    }

    async fn save_target(&self, campaign: &Campaign, target: &Target) -> Result<(), RegistryError> {
        let key = format!(
            "{}/{}/{}",
            campaign.tenant_id, campaign.id, target.device_id
        );
        self.store
            .put_record(TARGET, &key, to_bytes(target))
            .await?;
        Ok(())
    }

    /// Pauses a running campaign: devices updating finish, no new ones start.
    pub async fn pause(&self, tenant: TenantId, id: Uuid) -> Result<Campaign, RegistryError> {
        self.transition(tenant, id, CampaignState::Paused, "paused by an operator")
            .await
    }

    pub async fn resume(&self, tenant: TenantId, id: Uuid) -> Result<Campaign, RegistryError> {
        let mut campaign = self.get(tenant, id).await?;
        if campaign.state != CampaignState::Paused {
            return Err(RegistryError::FailedPrecondition(format!(
                "campaign {id} is {:?}, not paused",
                campaign.state
            )));
        }
        campaign.state = CampaignState::Running;
        campaign.reason = None;
        campaign.updated_at_ms = now_ms();
        self.save(&campaign).await?;
        Ok(campaign)
    }

    /// Aborts: updates in progress are cancelled, devices not started are skipped.
    pub async fn abort(&self, tenant: TenantId, id: Uuid) -> Result<Campaign, RegistryError> {
        self.transition(tenant, id, CampaignState::Aborted, "aborted by an operator")
            .await
    }

    async fn transition(
        &self,
        tenant: TenantId,
        id: Uuid,
        to: CampaignState,
        reason: &str,
    ) -> Result<Campaign, RegistryError> {
        let mut campaign = self.get(tenant, id).await?;
        let allowed = matches!(
            (campaign.state, to),
            (CampaignState::Running, CampaignState::Paused)
                | (
                    CampaignState::Running | CampaignState::Paused,
                    CampaignState::Aborted
                )
        );
        if !allowed {
            return Err(RegistryError::FailedPrecondition(format!(
                "campaign {id} is {:?}",
                campaign.state
            )));
        }
        let mut targets = self.targets(tenant, id).await?;
        self.stop(&mut campaign, &mut targets, to, reason.to_string())
            .await?;
        Ok(campaign)
    }

    /// Moves the campaign to `to` (paused or aborted); aborting cancels and skips.
    async fn stop(
        &self,
        campaign: &mut Campaign,
        targets: &mut [Target],
        to: CampaignState,
        reason: String,
    ) -> Result<(), RegistryError> {
        if to == CampaignState::Aborted {
            let now = now_ms();
            for target in targets.iter_mut() {
                match target.state {
                    TargetState::InProgress => {
                        if let Some(command) = target.command_id {
                            // Already finished is fine: the next look records the outcome.
                            let _ = self
                                .commands
                                .cancel(campaign.tenant_id, target.device_id, command)
                                .await;
                        }
                        target.state = TargetState::Skipped;
                        target.reason = Some("cancelled: campaign aborted".into());
                    }
                    TargetState::Pending => {
                        target.state = TargetState::Skipped;
                        target.reason = Some("campaign aborted".into());
                    }
                    _ => continue,
                }
                target.updated_at_ms = now;
                self.save_target(campaign, target).await?;
            }
        }
        tracing::warn!(campaign = %campaign.id, state = ?to, %reason, "OTA campaign stopped");
        campaign.state = to;
        campaign.reason = Some(reason);
        campaign.counts = count(targets);
        campaign.updated_at_ms = now_ms();
        self.save(campaign).await
    }

    /// Advances the running campaigns every `interval` until `stop` completes.
    pub async fn run(
        self: Arc<Self>,
        interval: std::time::Duration,
        stop: impl Future<Output = ()>,
    ) {
        let mut ticks = tokio::time::interval(interval);
        // One process advances the campaigns when several share the store.
        let lease = Lease::new(
            self.store.clone(),
            "ota-campaigns",
            (interval * 3).max(std::time::Duration::from_secs(10)),
        );
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    match lease.hold().await {
                        Ok(true) => {
                            if let Err(e) = self.tick().await {
                                tracing::error!(error = %e, "OTA campaigns");
                            }
                        }
                        Ok(false) => {}
                        Err(e) => tracing::error!(error = %e, "OTA campaigns: cannot read their lease"),
                    }
                }
                () = &mut stop => {
                    lease.release().await;
                    return;
                }
            }
        }
    }

    /// Advances every running campaign of every tenant.
    pub async fn tick(&self) -> Result<(), RegistryError> {
        let mut running = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list_records(RUNNING, "", after.as_deref(), 500)
                .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            running.extend(page.into_iter().map(|(key, _)| key));
        }
        for key in running {
            let Some(bytes) = self.store.get_record(CAMPAIGN, &key).await? else {
                self.store.delete_record(RUNNING, &key).await?;
                continue;
            };
            let mut campaign: Campaign = decode(&key, &bytes)?;
            if campaign.state != CampaignState::Running {
                self.store.delete_record(RUNNING, &key).await?;
                continue;
            }
            if let Err(e) = self.advance(&mut campaign).await {
                tracing::error!(campaign = %campaign.id, error = %e, "OTA campaign step failed");
            }
        }
        Ok(())
    }

    async fn advance(&self, campaign: &mut Campaign) -> Result<(), RegistryError> {
        let tenant = campaign.tenant_id;
        let mut targets = self.targets(tenant, campaign.id).await?;
        for target in targets.iter_mut() {
            if target.state == TargetState::InProgress && self.follow(campaign, target).await? {
                target.updated_at_ms = now_ms();
                self.save_target(campaign, target).await?;
            }
        }
        let counts = count(&targets);
        let finished = counts.succeeded + counts.failed;
        if counts.failed > 0
            && counts.failed * 100 >= u32::from(campaign.failure_threshold_percent) * finished
        {
            let reason = format!(
                "{} of {finished} finished devices failed ({}%), at or above the threshold of {}%",
                counts.failed,
                counts.failed * 100 / finished,
                campaign.failure_threshold_percent
            );
            let to = match campaign.on_failure {
                OnFailure::Abort => CampaignState::Aborted,
                OnFailure::Pause => CampaignState::Paused,
            };
            return self.stop(campaign, &mut targets, to, reason).await;
        }
        let unfinished = targets
            .iter()
            .filter(|t| matches!(t.state, TargetState::Pending | TargetState::InProgress))
            .map(|t| t.wave)
            .min();
        let Some(wave) = unfinished else {
            campaign.state = CampaignState::Completed;
            campaign.counts = counts;
            campaign.updated_at_ms = now_ms();
            tracing::info!(campaign = %campaign.id, "OTA campaign completed");
            return self.save(campaign).await;
        };
        let wave_changed = campaign.current_wave != wave;
        campaign.current_wave = wave;
        let in_window = campaign
            .maintenance_window
            .as_ref()
            .is_none_or(|w| w.contains(now_ms()));
        let mut room = campaign.max_concurrent.saturating_sub(counts.in_progress);
        if in_window {
            for target in targets.iter_mut() {
                if room == 0 {
                    break;
                }
                if target.wave == wave && target.state == TargetState::Pending {
                    self.start(campaign, target).await?;
                    self.save_target(campaign, target).await?;
                    room -= 1;
                }
            }
        }
        let counts = count(&targets);
        if wave_changed || counts != campaign.counts {
            campaign.counts = counts;
            campaign.updated_at_ms = now_ms();
            self.save(campaign).await?;
        }
        Ok(())
    }

    /// Sends the update to one device.
    async fn start(&self, campaign: &Campaign, target: &mut Target) -> Result<(), RegistryError> {
        target.updated_at_ms = now_ms();
        let tenant = campaign.tenant_id.to_string();
        let device = match self
            .registry
            .device(&tenant, &target.device_id.to_string())
            .await
        {
            Ok(device) => device,
            Err(RegistryError::NotFound(_)) => {
                target.state = TargetState::Skipped;
                target.reason = Some("the device was deleted".into());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match self.twins.may_receive(&device, "update").await {
            Ok(()) => {}
            Err(RegistryError::FailedPrecondition(why)) => {
                target.state = TargetState::Skipped;
                target.reason = Some(why);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let artifact = self
            .artifacts
            .get(campaign.tenant_id, campaign.artifact_id)
            .await?;
        let operation = Operation::Update {
            version: artifact.version.clone(),
            url: format!("{}/device/v1/artifacts/{}", self.public_url, artifact.id),
            sha256: artifact.sha256.clone(),
            signature: Some(artifact.signature.clone()),
        };
        let (command, _) = self
            .commands
            .send(
                &device,
                NewCommand {
                    name: operation.command_name(),
                    payload: operation.payload(),
                    ttl_secs: Some(campaign.device_timeout_secs),
                    idempotency_key: Some(format!("campaign:{}:{}", campaign.id, device.id)),
                },
            )
            .await?;
        target.state = TargetState::InProgress;
        target.command_id = Some(command.id);
        Ok(())
    }

    /// Looks at an updating device; returns whether its record changed.
    async fn follow(
        &self,
        campaign: &Campaign,
        target: &mut Target,
    ) -> Result<bool, RegistryError> {
        let Some(id) = target.command_id else {
            return Ok(false);
        };
        let command = match self
            .commands
            .get(campaign.tenant_id, target.device_id, id)
            .await
        {
            Ok(command) => command,
            Err(RegistryError::NotFound(_)) => {
                target.state = TargetState::Skipped;
                target.reason = Some("the device was deleted".into());
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let reason = |what: &str| {
            let payload = command.result.as_ref().map(|r| &r.payload);
            let detail = payload
                .and_then(|p| p["error"].as_str())
                .map(str::to_string)
                .or_else(|| payload.map(|p| p.to_string()));
            Some(match detail {
                Some(detail) => format!("{what}: {detail}"),
                None => what.to_string(),
            })
        };
        let (state, why) = match command.state {
            CommandState::Succeeded => (TargetState::Succeeded, None),
            CommandState::Failed => (TargetState::Failed, reason("failed")),
            CommandState::Expired => (
                TargetState::Failed,
                Some(format!(
                    "no outcome within device_timeout_secs ({})",
                    campaign.device_timeout_secs
                )),
            ),
            CommandState::Cancelled => (TargetState::Failed, Some("cancelled".into())),
            CommandState::Pending | CommandState::Delivered => {
                let twin = self.twins.get(campaign.tenant_id, target.device_id).await?;
                let update = twin.reported.get("update");
                let progress = update
                    .filter(|u| u["version"] == campaign.version.as_str())
                    .and_then(|u| u["state"].as_str())
                    .map(str::to_string);
                if progress.is_some() && progress != target.progress {
                    target.progress = progress;
                    return Ok(true);
                }
                return Ok(false);
            }
        };
        target.state = state;
        target.reason = why;
        target.progress = Some(match state {
            TargetState::Succeeded => "succeeded".into(),
            _ => command
                .result
                .as_ref()
                .and_then(|r| r.payload["state"].as_str())
                .unwrap_or("failed")
                .to_string(),
        });
        Ok(true)
    }
}

fn count(targets: &[Target]) -> Counts {
    let mut counts = Counts {
        total: targets.len() as u32,
        ..Counts::default()
    };
    for target in targets {
        *match target.state {
            TargetState::Pending => &mut counts.pending,
            TargetState::InProgress => &mut counts.in_progress,
            TargetState::Succeeded => &mut counts.succeeded,
            TargetState::Failed => &mut counts.failed,
            TargetState::Skipped => &mut counts.skipped,
        } += 1;
    }
    counts
}

/// The wave of each of `n` devices: the first `canary_percent` (at least one, when the
/// percentage is not 0) are wave 0; the rest go in waves of `wave_size` (0: one wave).
fn assign_waves(n: usize, canary_percent: u8, wave_size: u32) -> Vec<u32> {
    let canary = if canary_percent == 0 {
        0
    } else {
        (n * usize::from(canary_percent)).div_ceil(100).clamp(1, n)
    };
    let first_wave = u32::from(canary > 0);
    (0..n)
        .map(|i| {
            if i < canary {
                0
            } else if wave_size == 0 {
                first_wave
            } else {
                first_wave + ((i - canary) / wave_size as usize) as u32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tern_core::{CommandState, NewDevice};
    use tern_eventlog::{EmbeddedLog, EmbeddedLogConfig, EventLog};
    use tern_store::EmbeddedStore;

    use super::*;
    use crate::{CommandsConfig, TwinsConfig};

    /// A tick reads only the running campaigns' index: a stopped campaign leaves it, and its
    /// devices are not touched again.
    #[tokio::test]
    async fn ticks_advance_running_campaigns_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store")).expect("store"));
        let log: Arc<dyn EventLog> = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("log"))).expect("log"),
        );
        let registry = Arc::new(Registry::new(store.clone()));
        let commands = Arc::new(Commands::new(store.clone(), log, CommandsConfig::default()));
        let twins = Arc::new(Twins::new(store.clone(), TwinsConfig::default()));
        let artifacts = Arc::new(Artifacts::new(store.clone(), dir.path().join("a"), 1 << 20));
        let campaigns = Campaigns::new(
            store.clone(),
            registry.clone(),
            commands.clone(),
            twins,
            artifacts.clone(),
            "http://tern.example".into(),
        );
        let tenant = registry.create_tenant("acme").await.expect("tenant");
        for name in ["a", "b"] {
            let new = NewDevice {
                name: name.into(),
                ..NewDevice::default()
            };
            registry.create_device("acme", new).await.expect("device");
        }
        let mut upload = artifacts.begin().await.expect("upload");
        upload.write(b"firmware").await.expect("write");
        let artifact = artifacts
            .finish(tenant.id, upload, "fw", "2.0")
            .await
            .expect("artifact");
        let new = NewCampaign {
            artifact_id: artifact.id,
            selector: String::new(),
            canary_percent: 50,
            wave_size: 0,
            max_concurrent: 10,
            failure_threshold_percent: 20,
            on_failure: OnFailure::Abort,
            device_timeout_secs: 60,
            maintenance_window: None,
        };
        let campaign = campaigns.create(tenant.id, new).await.expect("campaign");
        let running = async || {
            store
                .list_records(RUNNING, "", None, 10)
                .await
                .expect("index")
        };
        assert_eq!(running().await.len(), 1);

        campaigns.tick().await.expect("tick");
        let targets = campaigns
            .targets(tenant.id, campaign.id)
            .await
            .expect("targets");
        assert_eq!(
            targets[0].state,
            TargetState::InProgress,
            "the canary is sent"
        );
        assert_eq!(
            targets[1].state,
            TargetState::Pending,
            "the next wave waits"
        );
        let sent = targets[0].command_id.expect("command");
        let command = commands
            .get(tenant.id, targets[0].device_id, sent)
            .await
            .expect("command");
        assert_eq!(command.name, "tern.update");
        assert_eq!(
            command.payload["url"],
            format!("http://tern.example/device/v1/artifacts/{}", artifact.id)
        );

        campaigns
            .abort(tenant.id, campaign.id)
            .await
            .expect("abort");
        assert!(
            running().await.is_empty(),
            "a stopped campaign leaves the index"
        );
        let cancelled = commands
            .get(tenant.id, targets[0].device_id, sent)
            .await
            .expect("command");
        assert_eq!(cancelled.state, CommandState::Cancelled);
        campaigns.tick().await.expect("tick");
        let after = campaigns
            .targets(tenant.id, campaign.id)
            .await
            .expect("targets");
        assert!(
            after.iter().all(|t| t.state == TargetState::Skipped),
            "{after:?}"
        );
        assert!(after[1].command_id.is_none(), "never sent");
    }

    #[test]
    fn canary_then_waves() {
        assert_eq!(assign_waves(10, 10, 3), [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
        assert_eq!(assign_waves(3, 10, 0), [0, 1, 1], "at least one canary");
        assert_eq!(assign_waves(4, 0, 2), [0, 0, 1, 1], "no canary");
        assert_eq!(assign_waves(2, 100, 0), [0, 0]);
    }

    #[test]
    fn windows_may_cross_midnight() {
        let at = |h: i64, m: i64| (h * 60 + m) * 60_000 + 3 * 86_400_000;
        let night = Window {
            start: "22:00".into(),
            end: "04:30".into(),
        };
        assert!(night.contains(at(23, 0)));
        assert!(night.contains(at(4, 29)));
        assert!(!night.contains(at(4, 30)));
        assert!(!night.contains(at(12, 0)));
        let day = Window {
            start: "09:00".into(),
            end: "17:00".into(),
        };
        assert!(day.contains(at(9, 0)) && !day.contains(at(17, 0)));
        assert!(
            Window {
                start: "9:00".into(),
                end: "17:00".into()
            }
            .validate()
            .is_err()
        );
        assert!(
            Window {
                start: "24:00".into(),
                end: "17:00".into()
            }
            .validate()
            .is_err()
        );
    }
}
