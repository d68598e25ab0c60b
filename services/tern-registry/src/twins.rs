//! Device twins: a desired document (what operators want the device to be) and a reported one
//! (what the device says it is), each a JSON object with a version and per-field update times.
//!
//! Both change by JSON Merge Patch (RFC 7386): members of the patch replace the document's,
//! objects merge member by member, `null` deletes. The desired side may be patched with the
//! version it was read at (optimistic concurrency: a stale version is a conflict); the device's
//! reported patches always apply, in the order they arrive. Every desired change is handed to
//! the device's connection (the bridge's [`TwinRoute`]) as the whole desired document and its
//! version, so a device that missed one (offline) is right again with the next, or when it
//! subscribes.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tern_core::{Device, DeviceId, TenantId, ValidationError, now_ms};
use tern_store::Store;

use crate::RegistryError;

const RECORD_KIND: &str = "twin";

/// Limits (`[twins]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwinsConfig {
    /// Largest desired or reported document (its JSON encoding), in bytes.
    pub max_document_bytes: usize,
}

impl Default for TwinsConfig {
    fn default() -> Self {
        Self {
            max_document_bytes: 64 * 1024,
        }
    }
}

/// A device's twin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    pub desired: Map<String, Value>,
    pub desired_version: u64,
    pub reported: Map<String, Value>,
    pub reported_version: u64,
    /// When each field last changed (ms since the epoch), by path (`a.b`).
    pub metadata: TwinMetadata,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinMetadata {
    pub desired: BTreeMap<String, i64>,
    pub reported: BTreeMap<String, i64>,
}

/// What a device receives on `twin/desired`: the whole desired document and its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub version: u64,
    pub desired: Map<String, Value>,
}

/// Hands desired changes to a device's live connection (the bridge).
#[async_trait::async_trait]
pub trait TwinRoute: Send + Sync {
    async fn desired_changed(&self, tenant: TenantId, device: DeviceId, state: &DesiredState);
}

pub struct Twins {
    store: Arc<dyn Store>,
    config: TwinsConfig,
    route: OnceLock<Arc<dyn TwinRoute>>,
    /// Read-modify-write of one twin at a time, striped by device.
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl Twins {
    pub fn new(store: Arc<dyn Store>, config: TwinsConfig) -> Self {
        Self {
            store,
            config,
            route: OnceLock::new(),
            locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// Connects the bridge; set once at start-up.
    pub fn set_route(&self, route: Arc<dyn TwinRoute>) {
        let _ = self.route.set(route);
    }

    /// Whether the typed operation `operation` may be sent to `device`: its management level
    /// allows it, and its agent, if it declares `capabilities` in its reported twin (tern-agent
    /// does), offers it. The refusal says which of the two.
    pub async fn may_receive(&self, device: &Device, operation: &str) -> Result<(), RegistryError> {
        if !device.management.allows(operation) {
            return Err(RegistryError::FailedPrecondition(format!(
                "device {} is {}: `{operation}` is not allowed (see its `management`)",
                device.name,
                device.management.as_str()
            )));
        }
        let twin = self.get(device.tenant_id, device.id).await?;
        if let Some(offered) = twin.reported.get("capabilities").and_then(Value::as_array)
            && !offered.iter().any(|c| c == operation)
        {
            return Err(RegistryError::FailedPrecondition(format!(
                "device {} does not offer `{operation}`; its agent offers {}",
                device.name,
                Value::Array(offered.clone())
            )));
        }
        Ok(())
    }

    pub async fn get(&self, tenant: TenantId, device: DeviceId) -> Result<Twin, RegistryError> {
        Ok(
            match self
                .store
                .get_record(RECORD_KIND, &key(tenant, device))
                .await?
            {
                Some(value) => serde_json::from_slice(&value).map_err(|e| {
                    RegistryError::FailedPrecondition(format!("unreadable twin: {e}"))
                })?,
                None => Twin::default(),
            },
        )
    }

    /// What the device is owed on `twin/desired`.
    pub async fn desired(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<DesiredState, RegistryError> {
        let twin = self.get(tenant, device).await?;
        Ok(DesiredState {
            version: twin.desired_version,
            desired: twin.desired,
        })
    }

    /// Merges `patch` into the desired document; with `expected_version`, only if the
    /// document is still at that version. The device's connection gets the result.
    pub async fn update_desired(
        &self,
        tenant: TenantId,
        device: DeviceId,
        patch: &Value,
        expected_version: Option<u64>,
    ) -> Result<Twin, RegistryError> {
        let twin = self
            .update(tenant, device, "desired", |twin| {
                if let Some(expected) = expected_version
                    && expected != twin.desired_version
                {
                    return Err(RegistryError::Conflict(format!(
                        "the desired document is at version {}, not {expected}",
                        twin.desired_version
                    )));
                }
                merge_patch(
                    &mut twin.desired,
                    patch,
                    &mut twin.metadata.desired,
                    "desired",
                )?;
                twin.desired_version += 1;
                Ok(())
            })
            .await?;
        if let Some(route) = self.route.get() {
            let state = DesiredState {
                version: twin.desired_version,
                desired: twin.desired.clone(),
            };
            route.desired_changed(tenant, device, &state).await;
        }
        Ok(twin)
    }

    /// Merges the device's `patch` into its reported document.
    pub async fn update_reported(
        &self,
        tenant: TenantId,
        device: DeviceId,
        patch: &Value,
    ) -> Result<Twin, RegistryError> {
        self.update(tenant, device, "reported", |twin| {
            merge_patch(
                &mut twin.reported,
                patch,
                &mut twin.metadata.reported,
                "reported",
            )?;
            twin.reported_version += 1;
            Ok(())
        })
        .await
    }

    async fn update(
        &self,
        tenant: TenantId,
        device: DeviceId,
        side: &'static str,
        change: impl FnOnce(&mut Twin) -> Result<(), RegistryError>,
    ) -> Result<Twin, RegistryError> {
        let stripe = (device.0.as_u128() as usize) % self.locks.len();
        let _guard = self.locks[stripe].lock().await;
        let mut twin = self.get(tenant, device).await?;
        change(&mut twin)?;
        let document = if side == "desired" {
            &twin.desired
        } else {
            &twin.reported
        };
        let size = serde_json::to_vec(document)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > self.config.max_document_bytes {
            return Err(ValidationError::new(
                side,
                format!(
                    "the {side} document would be {size} bytes; at most {} (`twins.max_document_bytes`)",
                    self.config.max_document_bytes
                ),
            )
            .into());
        }
        let value = serde_json::to_vec(&twin)
            .map_err(|e| RegistryError::FailedPrecondition(e.to_string()))?;
        self.store
            .put_record(RECORD_KIND, &key(tenant, device), Bytes::from(value))
            .await?;
        Ok(twin)
    }
}

fn key(tenant: TenantId, device: DeviceId) -> String {
    format!("{tenant}/{device}")
}

/// RFC 7386 JSON Merge Patch of an object into `target`, recording when each changed field
/// changed (`metadata`, by dotted path).
fn merge_patch(
    target: &mut Map<String, Value>,
    patch: &Value,
    metadata: &mut BTreeMap<String, i64>,
    field: &'static str,
) -> Result<(), RegistryError> {
    let Value::Object(patch) = patch else {
        return Err(ValidationError::new(
            field,
            "must be a JSON object (a merge patch, RFC 7386: null deletes a member)",
        )
        .into());
    };
    merge_object(target, patch, metadata, "", now_ms());
    Ok(())
}

fn merge_object(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    metadata: &mut BTreeMap<String, i64>,
    prefix: &str,
    now: i64,
) {
    for (name, value) in patch {
        let path = format!("{prefix}{name}");
        let nested = format!("{path}.");
        match value {
            Value::Null => {
                target.remove(name);
                metadata.retain(|p, _| p != &path && !p.starts_with(&nested));
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(name.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                    metadata.remove(&path);
                }
                if let Value::Object(slot) = slot {
                    merge_object(slot, inner, metadata, &nested, now);
                }
            }
            other => {
                target.insert(name.clone(), other.clone());
                metadata.retain(|p, _| !p.starts_with(&nested));
                metadata.insert(path, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;
    use tern_store::EmbeddedStore;

    #[derive(Default)]
    struct Seen(Mutex<Vec<DesiredState>>);

    #[async_trait::async_trait]
    impl TwinRoute for Seen {
        async fn desired_changed(&self, _: TenantId, _: DeviceId, state: &DesiredState) {
            self.0.lock().expect("lock").push(state.clone());
        }
    }

    fn twins(dir: &tempfile::TempDir, max: usize) -> Twins {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        Twins::new(
            store,
            TwinsConfig {
                max_document_bytes: max,
            },
        )
    }

    #[tokio::test]
    async fn merge_patches_apply_with_versions_timestamps_and_conflicts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let twins = twins(&dir, 1024);
        let seen = Arc::new(Seen::default());
        twins.set_route(seen.clone());
        let (t, d) = (TenantId::random(), DeviceId::random());
        let patch = json!({"fan": {"speed": 3, "mode": "auto"}, "led": true});
        let twin = twins
            .update_desired(t, d, &patch, Some(0))
            .await
            .expect("v1");
        assert_eq!(twin.desired_version, 1);
        assert!(twin.metadata.desired.contains_key("fan.speed"));
        let twin = twins
            .update_desired(t, d, &json!({"fan": {"mode": null}, "led": false}), None)
            .await
            .expect("v2");
        assert_eq!(
            Value::Object(twin.desired.clone()),
            json!({"fan": {"speed": 3}, "led": false})
        );
        assert!(
            !twin.metadata.desired.contains_key("fan.mode"),
            "deleted fields lose their time"
        );
        let stale = twins
            .update_desired(t, d, &json!({"led": true}), Some(1))
            .await;
        assert!(
            matches!(stale, Err(RegistryError::Conflict(_))),
            "{stale:?}"
        );
        assert_eq!(
            seen.0
                .lock()
                .expect("lock")
                .iter()
                .map(|s| s.version)
                .collect::<Vec<_>>(),
            [1, 2],
            "the device is handed each change, whole"
        );

        twins
            .update_reported(t, d, &json!({"fan": {"speed": 3}}))
            .await
            .expect("r1");
        let twin = twins.get(t, d).await.expect("get");
        assert_eq!((twin.desired_version, twin.reported_version), (2, 1));
        assert_eq!(Value::Object(twin.reported), json!({"fan": {"speed": 3}}));
        assert!(
            twins
                .get(TenantId::random(), d)
                .await
                .expect("other")
                .desired
                .is_empty()
        );
    }

    #[tokio::test]
    async fn documents_are_objects_within_the_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let twins = twins(&dir, 64);
        let (t, d) = (TenantId::random(), DeviceId::random());
        let not_object = twins.update_reported(t, d, &json!([1, 2])).await;
        assert!(matches!(not_object, Err(RegistryError::Invalid(_))));
        let big = json!({"blob": "x".repeat(100)});
        let too_big = twins.update_reported(t, d, &big).await;
        assert!(matches!(too_big, Err(RegistryError::Invalid(e)) if e.field == "reported"));
        assert_eq!(
            twins.get(t, d).await.expect("get").reported_version,
            0,
            "nothing stored"
        );
    }
}
