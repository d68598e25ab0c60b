//! Commands and management operations, carried out one at a time in the order they arrive,
//! each answered on `command/res/{id}/{status}` through the outbox; and the desired twin.
//! What must wait for the answer to reach the platform (reboot, wipe, decommission, a
//! reconnect with new credentials) runs after the answer's PUBACK.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tern_core::{OPERATION_PREFIX, Operation};
use tokio::sync::mpsc;

use crate::hooks::{self, HookError, Invocation};
use crate::session::Command;
use crate::update::{self, UpdateError};
use crate::{Agent, Exit};

/// How long a destructive follow-up waits for its answer to be delivered.
const ANSWER_DELIVERY: Duration = Duration::from_secs(60);

struct Answer {
    status: u16,
    body: Value,
    then: Option<Then>,
}

enum Then {
    Reboot { hook: String, delay: Duration },
    Reconnect,
    Wipe,
    Decommission,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body,
            then: None,
        }
    }

    fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            body: json!({ "error": message.to_string() }),
            then: None,
        }
    }

    fn not_configured(hook: &str) -> Self {
        Self::error(501, format!("this device has no `hooks.{hook}` configured"))
    }

    fn then(mut self, then: Then) -> Self {
        self.then = Some(then);
        self
    }
}

impl From<HookError> for Answer {
    fn from(e: HookError) -> Self {
        Self::error(500, e)
    }
}

pub async fn serve(agent: Arc<Agent>, mut commands: mpsc::Receiver<Command>) {
    while let Some(command) = commands.recv().await {
        tracing::info!(id = %command.id, name = %command.name, "command");
        let answer = match command.name.strip_prefix(OPERATION_PREFIX) {
            Some(_) => match serde_json::from_slice::<Operation>(&command.payload) {
                Ok(operation) => operate(&agent, operation).await,
                Err(e) => Answer::error(400, format!("not a valid operation: {e}")),
            },
            None => plain(&agent, &command).await,
        };
        let topic = format!("command/res/{}/{}", command.id, answer.status);
        let body = serde_json::to_vec(&answer.body).expect("JSON");
        let seq = match agent.outbox().push(&topic, &body) {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot queue a command answer");
                continue;
            }
        };
        if let Some(then) = answer.then {
            if tokio::time::timeout(ANSWER_DELIVERY, agent.outbox().delivered(seq))
                .await
                .is_err()
            {
                tracing::warn!(id = %command.id, "answer not delivered in time; going ahead");
            }
            follow_up(&agent, then).await;
        }
    }
}

async fn follow_up(agent: &Agent, then: Then) {
    match then {
        Then::Reboot { hook, delay } => {
            tokio::time::sleep(delay).await;
            if let Err(e) = hooks::run(&hook, Invocation::default(), agent.hook_timeout()).await {
                tracing::error!(error = %e, "reboot hook failed");
            }
        }
        Then::Reconnect => agent.reconnect.notify_one(),
        Then::Wipe | Then::Decommission => {
            let decommission = matches!(then, Then::Decommission);
            if decommission && let Err(e) = std::fs::write(agent.decommissioned_marker(), b"") {
                tracing::error!(error = %e, "cannot mark the device decommissioned");
            }
            if let Err(e) = agent.vault.wipe() {
                tracing::error!(error = %format!("{e:#}"), "wipe failed");
            }
            tracing::warn!(decommission, "secure store wiped; stopping");
            agent.stop(if decommission {
                Exit::Decommissioned
            } else {
                Exit::Wiped
            });
        }
    }
}

/// A plain command goes to `hooks.command` (argument: its name; input: its payload); the
/// hook's output is the answer, kept as JSON when it is JSON.
async fn plain(agent: &Agent, command: &Command) -> Answer {
    let Some(hook) = &agent.config.hooks.command else {
        return Answer::not_configured("command");
    };
    let call = Invocation {
        args: &[&command.name],
        stdin: Some(&command.payload),
        env: &[("TERN_COMMAND_ID", &command.id)],
    };
    match hooks::run(hook, call, agent.hook_timeout()).await {
        Ok(out) => Answer::ok(serde_json::from_str(&out).unwrap_or(Value::String(out))),
        Err(e) => e.into(),
    }
}

async fn operate(agent: &Agent, operation: Operation) -> Answer {
    let hooks = &agent.config.hooks;
    let timeout = agent.hook_timeout();
    let state_saved = |result: anyhow::Result<()>, body: Value| match result {
        Ok(()) => Answer::ok(body),
        Err(e) => Answer::error(500, format!("{e:#}")),
    };
    match operation {
        Operation::Reboot { delay_s } => match &hooks.reboot {
            Some(hook) => Answer {
                status: 202,
                body: json!({ "rebooting_in_s": delay_s }),
                then: None,
            }
            .then(Then::Reboot {
                hook: hook.clone(),
                delay: Duration::from_secs(u64::from(delay_s)),
            }),
            None => Answer::not_configured("reboot"),
        },
        Operation::Locate => locate(agent).await,
        Operation::Lock | Operation::Unlock => {
            let locked = matches!(operation, Operation::Lock);
            let (hook, name) = if locked {
                (&hooks.lock, "lock")
            } else {
                (&hooks.unlock, "unlock")
            };
            if let Some(hook) = hook
                && let Err(e) = hooks::run(hook, Invocation::default(), timeout).await
            {
                return Answer::error(500, format!("{name}: {e}"));
            }
            state_saved(
                agent.change_state(|s| s.locked = locked),
                json!({ "locked": locked }),
            )
        }
        Operation::Wipe => Answer::ok(json!({ "wiped": true })).then(Then::Wipe),
        Operation::Decommission => {
            Answer::ok(json!({ "decommissioned": true })).then(Then::Decommission)
        }
        Operation::Feature { feature, enabled } => {
            let Some(hook) = &hooks.feature else {
                return Answer::not_configured("feature");
            };
            let switch = if enabled { "on" } else { "off" };
            let call = Invocation {
                args: &[&feature, switch],
                ..Invocation::default()
            };
            if let Err(e) = hooks::run(hook, call, timeout).await {
                return e.into();
            }
            state_saved(
                agent.change_state(|s| {
                    s.features.insert(feature.clone(), enabled);
                }),
                json!({ "feature": feature, "enabled": enabled }),
            )
        }
        Operation::Configure {
            wifi,
            apn,
            settings,
        } => {
            if wifi.is_some() || apn.is_some() {
                let Some(hook) = &hooks.network else {
                    return Answer::not_configured("network");
                };
                let input = serde_json::to_vec(&json!({ "wifi": wifi, "apn": apn })).expect("JSON");
                let call = Invocation {
                    stdin: Some(&input),
                    ..Invocation::default()
                };
                if let Err(e) = hooks::run(hook, call, timeout).await {
                    return e.into();
                }
            }
            state_saved(
                agent.change_state(|s| {
                    if let Some(wifi) = &wifi {
                        s.network.wifi_ssid = Some(wifi.ssid.clone());
                    }
                    if let Some(apn) = &apn {
                        s.network.apn = Some(apn.clone());
                    }
                    merge_settings(&mut s.settings, &settings);
                }),
                json!({ "configured": true }),
            )
        }
        Operation::RotateCredentials => match agent.credentials(true).await {
            Ok(_) => Answer::ok(json!({ "rotated": true })).then(Then::Reconnect),
            Err(e) => Answer::error(500, format!("{e:#}")),
        },
        Operation::Update {
            version,
            url,
            sha256,
            signature,
        } => match install(agent, &version, &url, &sha256, signature.as_deref()).await {
            Ok(slot) => Answer::ok(json!({ "version": version, "slot": slot })),
            Err(e) => {
                let status = match e {
                    UpdateError::Verify(_) => 422,
                    UpdateError::Download(_) => 502,
                    _ => 500,
                };
                Answer {
                    status,
                    body: json!({ "state": e.state(), "error": e.to_string() }),
                    then: None,
                }
            }
        },
    }
}

/// `settings` merge like a JSON merge patch at the top level: `null` removes a setting.
fn merge_settings(settings: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if value.is_null() {
            settings.remove(key);
        } else {
            settings.insert(key.clone(), value.clone());
        }
    }
}

/// Asks `hooks.location`, answers with the position and records it as telemetry (`lat`,
/// `lon`, `accuracy_m`), which is the device's location history.
async fn locate(agent: &Agent) -> Answer {
    let Some(hook) = &agent.config.hooks.location else {
        return Answer::not_configured("location");
    };
    let out = match hooks::run(hook, Invocation::default(), agent.hook_timeout()).await {
        Ok(out) => out,
        Err(e) => return e.into(),
    };
    let position: Value = serde_json::from_str(&out).unwrap_or_default();
    let (Some(lat), Some(lon)) = (position["lat"].as_f64(), position["lon"].as_f64()) else {
        return Answer::error(500, "hooks.location printed no {\"lat\", \"lon\"}");
    };
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Answer::error(
            500,
            format!("hooks.location printed an impossible position {lat}, {lon}"),
        );
    }
    let mut fix = json!({ "lat": lat, "lon": lon });
    if let Some(accuracy) = position["accuracy_m"].as_f64() {
        fix["accuracy_m"] = accuracy.into();
    }
    if let Err(e) = agent
        .outbox()
        .push("telemetry", &serde_json::to_vec(&fix).expect("JSON"))
    {
        tracing::warn!(error = %format!("{e:#}"), "cannot record the position");
    }
    Answer::ok(fix)
}

/// Reports an update's progress in the twin (`update`: version, state, error).
fn progress(agent: &Agent, version: &str, state: &str, error: Option<&str>) {
    let patch = json!({ "update": { "version": version, "state": state, "error": error } });
    if let Err(e) = agent.report(&patch) {
        tracing::warn!(error = %format!("{e:#}"), "cannot report update progress");
    }
}

async fn install(
    agent: &Agent,
    version: &str,
    url: &str,
    sha256: &str,
    signature: Option<&str>,
) -> Result<String, UpdateError> {
    let result = install_steps(agent, version, url, sha256, signature).await;
    match &result {
        Ok(_) => progress(agent, version, "succeeded", None),
        Err(e) => progress(agent, version, e.state(), Some(&e.to_string())),
    }
    result
}

async fn install_steps(
    agent: &Agent,
    version: &str,
    url: &str,
    sha256: &str,
    signature: Option<&str>,
) -> Result<String, UpdateError> {
    // It names a file below: only the 64 hex digits the contract allows.
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(UpdateError::Verify(format!(
            "sha256 must be 64 hex digits, got {sha256:?}"
        )));
    }
    let config = &agent.config.update;
    let downloads = agent.config.root_dir.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(|e| UpdateError::Download(e.into()))?;
    // Named by digest: a retried update resumes its own partial download, never another's.
    let part = downloads.join(format!("{}.part", sha256.to_ascii_lowercase()));

    progress(agent, version, "downloading", None);
    // The platform's own artifacts (`/device/v1/artifacts/{id}`) need the device's token;
    // other servers never see it.
    let own = reqwest::Url::parse(url).is_ok_and(|u| u.origin() == agent.server.origin());
    let token = match own {
        true => Some(
            agent
                .credentials(false)
                .await
                .map_err(UpdateError::Download)?
                .access_token,
        ),
        false => None,
    };
    tracing::info!(%url, with_device_token = token.is_some(), "downloading");
    update::download(
        &agent.http,
        url,
        token.as_deref(),
        &part,
        config.max_artifact_bytes,
        config.download_attempts,
    )
    .await
    .map_err(UpdateError::Download)?;

    progress(agent, version, "verifying", None);
    let digest = update::sha256_file(&part).map_err(UpdateError::Download)?;
    if let Err(e) = update::verify(&digest, sha256, signature, agent.public_key.as_deref()) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }

    progress(agent, version, "installing", None);
    let slots = &agent.slots;
    let previous = slots.active();
    let slot = slots.inactive();
    let artifact = slots
        .fill(slot, &part, version)
        .map_err(UpdateError::Install)?;
    let slot_dir = slots.dir(slot);
    let slot_dir = slot_dir.to_string_lossy();
    let artifact = artifact.to_string_lossy();
    let env = [
        ("TERN_UPDATE_VERSION", version),
        ("TERN_UPDATE_SLOT", slot),
        ("TERN_UPDATE_SLOT_DIR", slot_dir.as_ref()),
        ("TERN_UPDATE_ARTIFACT", artifact.as_ref()),
    ];
    let hooks = &agent.config.hooks;
    if let Some(hook) = &hooks.install {
        let call = Invocation {
            env: &env,
            ..Invocation::default()
        };
        hooks::run(hook, call, agent.hook_timeout())
            .await
            .map_err(|e| UpdateError::Install(e.into()))?;
    }
    slots.switch(Some(slot)).map_err(UpdateError::Install)?;
    if let Some(hook) = &hooks.health_check {
        let call = Invocation {
            env: &env,
            ..Invocation::default()
        };
        if let Err(e) = hooks::run(hook, call, agent.hook_timeout()).await {
            slots
                .switch(previous.as_deref())
                .map_err(UpdateError::Install)?;
            return Err(UpdateError::RolledBack(e.to_string()));
        }
    }
    agent
        .change_state(|s| {
            s.firmware = Some(crate::state::Firmware {
                version: version.to_string(),
                slot: slot.to_string(),
            });
        })
        .map_err(UpdateError::Install)?;
    Ok(slot.to_string())
}

/// Applies each newer desired twin document (through `hooks.twin` when set), stores it in
/// `{root}/state/desired.json` and reports the version applied, or why it was not.
pub async fn follow_desired(agent: Arc<Agent>, mut documents: mpsc::Receiver<Value>) {
    while let Some(document) = documents.recv().await {
        let Some(version) = document["version"].as_u64() else {
            tracing::warn!("desired twin without a version");
            continue;
        };
        if agent.state().desired_version >= Some(version) {
            continue;
        }
        let desired = serde_json::to_vec(&document["desired"]).expect("JSON");
        if let Some(hook) = &agent.config.hooks.twin {
            let call = Invocation {
                stdin: Some(&desired),
                ..Invocation::default()
            };
            if let Err(e) = hooks::run(hook, call, agent.hook_timeout()).await {
                let patch =
                    json!({ "desired_error": { "version": version, "error": e.to_string() } });
                if let Err(e) = agent.report(&patch) {
                    tracing::warn!(error = %format!("{e:#}"), "cannot report");
                }
                continue;
            }
        }
        let applied = agent
            .state_file
            .write("desired.json", &desired)
            .and_then(|()| agent.change_state(|s| s.desired_version = Some(version)))
            .and_then(|()| agent.report(&json!({ "desired_error": null })).map(drop));
        if let Err(e) = applied {
            tracing::error!(error = %format!("{e:#}"), "cannot record the desired twin");
        }
    }
}
