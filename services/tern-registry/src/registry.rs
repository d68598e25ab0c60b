use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tern_core::{
    Caller, Device, DeviceId, ManagementLevel, NewDevice, Selector, Tenant, TenantId,
    ValidationError, now_ms, validate_groups, validate_labels, validate_name,
};
use tern_store::Store;
use tokio::sync::Mutex;

use crate::RegistryError;

const TENANT: &str = "tenant";
const TENANT_NAME: &str = "tenant_name";
const DEVICE: &str = "device";
const DEVICE_NAME: &str = "device_name";
const DEVICE_HARDWARE_ID: &str = "device_hwid";
const PAGE: usize = 1000;

/// Tenant names are slugs (`acme`, `acme-eu`) so they fit in URLs and topic namespaces; they
/// may not look like a UUID, so a reference is unambiguously a name or an id.
pub fn validate_tenant_name(name: &str) -> Result<(), ValidationError> {
    let slug = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !slug {
        return Err(ValidationError::new(
            "name",
            "tenant names are 1..=63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
        ));
    }
    if TenantId::parse(name).is_ok() {
        return Err(ValidationError::new(
            "name",
            "tenant names may not be UUIDs",
        ));
    }
    Ok(())
}

/// Told when a device's access ends (disabled, deleted, tokens revoked), so that whoever
/// holds its connections closes them at once instead of when they next reconnect.
#[async_trait::async_trait]
pub trait AccessRevoked: Send + Sync {
    async fn access_revoked(&self, tenant: TenantId, device: DeviceId);
}

/// A partial update of a device: absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    pub disabled: Option<bool>,
    /// Replaces all labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// Sets (a device id or name) or, with `null`, clears the device's gateway.
    #[serde(default, deserialize_with = "present")]
    pub gateway: Option<Option<String>>,
    pub management: Option<ManagementLevel>,
    /// Sets or, with `null`, clears the owner.
    #[serde(default, deserialize_with = "present")]
    pub owner: Option<Option<String>>,
    /// Replaces all groups.
    pub groups: Option<BTreeSet<String>>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The registry over a store. Unique names and hardware ids are claimed, and devices updated,
/// with the store's compare-and-swap, so both hold across registries sharing a store. Creating
/// and deleting are serialised with each other in this process (a tenant is deleted only
/// without devices).
pub struct Registry {
    store: Arc<dyn Store>,
    write_lock: Mutex<()>,
    revocations: OnceLock<Arc<dyn AccessRevoked>>,
}

impl Registry {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            write_lock: Mutex::new(()),
            revocations: OnceLock::new(),
        }
    }

    /// Connects the bridge(s) that must hear of revocations; set once at start-up.
    pub fn set_access_listener(&self, listener: Arc<dyn AccessRevoked>) {
        let _ = self.revocations.set(listener);
    }

    async fn revoked(&self, device: &Device) {
        if let Some(listener) = self.revocations.get() {
            listener.access_revoked(device.tenant_id, device.id).await;
        }
    }

    /// Changes what the patch names (enabled, labels, gateway, management level, owner,
    /// groups). Disabling ends its connections.
    pub async fn update_device(
        &self,
        tenant: &str,
        reference: &str,
        patch: DevicePatch,
    ) -> Result<Device, RegistryError> {
        if let Some(labels) = &patch.labels {
            validate_labels(labels)?;
        }
        if let Some(Some(owner)) = &patch.owner {
            validate_name("owner", owner)?;
        }
        if let Some(groups) = &patch.groups {
            validate_groups(groups)?;
        }
        let device = self.device(tenant, reference).await?;
        let gateway = match &patch.gateway {
            Some(Some(gateway)) => Some(Some(self.gateway_for(&device, gateway).await?)),
            Some(None) => Some(None),
            None => None,
        };
        let (before, after) = self
            .modify_device(device.tenant_id, device.id, |d| {
                if let Some(gateway) = gateway {
                    d.gateway_id = gateway;
                }
                if let Some(labels) = &patch.labels {
                    d.labels = labels.clone();
                }
                if let Some(disabled) = patch.disabled {
                    d.disabled = disabled;
                }
                if let Some(management) = patch.management {
                    d.management = management;
                }
                if let Some(owner) = &patch.owner {
                    d.owner = owner.clone();
                }
                if let Some(groups) = &patch.groups {
                    d.groups = groups.clone();
                }
            })
            .await?;
        if after.disabled && !before.disabled {
            self.revoked(&after).await;
        }
        Ok(after)
    }

    /// Applies `change` to the stored device with a swap, reading it again when another writer
    /// (here or in another process) changed it meanwhile, so no update is lost. Returns the
    /// device before and after.
    async fn modify_device(
        &self,
        tenant: TenantId,
        id: DeviceId,
        mut change: impl FnMut(&mut Device),
    ) -> Result<(Device, Device), RegistryError> {
        let key = format!("{tenant}/{id}");
        for _ in 0..16 {
            let read = self
                .store
                .get_record(DEVICE, &key)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("device {id}")))?;
            let before: Device = decode(&key, &read)?;
            let mut after = before.clone();
            change(&mut after);
            let written = self
                .store
                .compare_and_swap(DEVICE, &key, Some(read), Some(to_bytes(&after)))
                .await?;
            if written {
                return Ok((before, after));
            }
        }
        Err(RegistryError::Conflict(format!(
            "device {id} kept changing; try again"
        )))
    }

    /// Refuses every access token issued to the device so far and ends its connections.
    /// Tokens issued from the next second on are valid again.
    pub async fn revoke_access_tokens(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<Device, RegistryError> {
        let device = self.device_of(tenant, &device.to_string()).await?;
        let valid_from = now_ms() / 1000 + 1;
        let (_, device) = self
            .modify_device(device.tenant_id, device.id, |d| {
                d.tokens_valid_from_s = valid_from;
            })
            .await?;
        self.revoked(&device).await;
        Ok(device)
    }

    pub async fn create_tenant(&self, name: &str) -> Result<Tenant, RegistryError> {
        validate_tenant_name(name)?;
        let tenant = Tenant {
            id: TenantId::random(),
            name: name.to_string(),
            created_at_ms: now_ms(),
        };
        let id = tenant.id.to_string();
        if !self.claim(TENANT_NAME, name, &id).await? {
            return Err(RegistryError::Conflict(format!(
                "a tenant named {name:?} already exists"
            )));
        }
        if let Err(e) = self.put(TENANT, &id, &tenant).await {
            self.release(TENANT_NAME, name, &id).await;
            return Err(e);
        }
        Ok(tenant)
    }

    /// Takes a unique name (or hardware id) for `id`: of any number of registries sharing the
    /// store, exactly one gets it. Returns false when it is taken.
    async fn claim(&self, kind: &str, key: &str, id: &str) -> Result<bool, RegistryError> {
        Ok(self
            .store
            .compare_and_swap(kind, key, None, Some(id.to_string().into_bytes().into()))
            .await?)
    }

    /// Gives back a claim whose record could not be written (best effort: a leftover claim
    /// only keeps the name taken).
    async fn release(&self, kind: &str, key: &str, id: &str) {
        let held = Some(id.to_string().into_bytes().into());
        if let Err(e) = self.store.compare_and_swap(kind, key, held, None).await {
            tracing::error!(kind, key, error = %e, "cannot release a claimed name");
        }
    }

    /// Finds a tenant by id or name.
    pub async fn tenant(&self, reference: &str) -> Result<Tenant, RegistryError> {
        let id = match TenantId::parse(reference) {
            Ok(id) => id.to_string(),
            Err(_) => match self.store.get_record(TENANT_NAME, reference).await? {
                Some(id) => String::from_utf8_lossy(&id).into_owned(),
                None => return Err(RegistryError::NotFound(format!("tenant {reference:?}"))),
            },
        };
        self.get(TENANT, &id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("tenant {reference:?}")))
    }

    /// Resolves a tenant reference for a caller. A tenant-scoped caller is refused any other
    /// tenant before a lookup, so it learns nothing about which other tenants exist.
    pub async fn tenant_for(
        &self,
        caller: Caller,
        reference: &str,
    ) -> Result<Tenant, RegistryError> {
        match caller {
            Caller::Operator => self.tenant(reference).await,
            Caller::Tenant(own) => {
                let tenant = self.tenant(&own.to_string()).await?;
                if reference == tenant.name || TenantId::parse(reference).ok() == Some(own) {
                    Ok(tenant)
                } else {
                    Err(RegistryError::Forbidden(format!(
                        "this token is not valid for tenant {reference:?}"
                    )))
                }
            }
        }
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, RegistryError> {
        list_all(self.store.as_ref(), TENANT, "").await
    }

    /// Deletes an empty tenant; a tenant that still has devices is refused.
    pub async fn delete_tenant(&self, reference: &str) -> Result<Tenant, RegistryError> {
        let tenant = self.tenant(reference).await?;
        let _guard = self.write_lock.lock().await;
        let prefix = format!("{}/", tenant.id);
        if !self
            .store
            .list_records(DEVICE, &prefix, None, 1)
            .await?
            .is_empty()
        {
            return Err(RegistryError::FailedPrecondition(format!(
                "tenant {:?} still has devices; delete them first",
                tenant.name
            )));
        }
        self.store
            .delete_record(TENANT, &tenant.id.to_string())
            .await?;
        self.store.delete_record(TENANT_NAME, &tenant.name).await?;
        Ok(tenant)
    }

    pub async fn create_device(
        &self,
        tenant: &str,
        new: NewDevice,
    ) -> Result<Device, RegistryError> {
        new.validate()?;
        let tenant = self.tenant(tenant).await?;
        if DeviceId::parse(&new.name).is_ok() {
            return Err(ValidationError::new("name", "device names may not be UUIDs").into());
        }
        let name_key = format!("{}/{}", tenant.id, new.name);
        let hardware_key = new
            .hardware_id
            .as_ref()
            .map(|hw| format!("{}/{hw}", tenant.id));
        let mut device = Device {
            id: DeviceId::random(),
            tenant_id: tenant.id,
            name: new.name,
            labels: new.labels,
            hardware_id: new.hardware_id,
            created_at_ms: now_ms(),
            disabled: false,
            tokens_valid_from_s: 0,
            gateway_id: None,
            management: new.management,
            owner: new.owner,
            groups: new.groups,
        };
        if let Some(gateway) = &new.gateway {
            device.gateway_id = Some(self.gateway_for(&device, gateway).await?);
        }
        let id = device.id.to_string();
        // Serialised with deleting its tenant in this process (that check and delete are not
        // atomic across processes yet).
        let _guard = self.write_lock.lock().await;
        if !self.claim(DEVICE_NAME, &name_key, &id).await? {
            return Err(RegistryError::Conflict(format!(
                "a device named {:?} already exists in tenant {:?}",
                device.name, tenant.name
            )));
        }
        if let Some(key) = &hardware_key
            && !self.claim(DEVICE_HARDWARE_ID, key, &id).await?
        {
            self.release(DEVICE_NAME, &name_key, &id).await;
            return Err(RegistryError::Conflict(format!(
                "a device with hardware id {:?} already exists in tenant {:?}",
                device.hardware_id.clone().unwrap_or_default(),
                tenant.name
            )));
        }
        if let Err(e) = self
            .put(DEVICE, &format!("{}/{id}", tenant.id), &device)
            .await
        {
            self.release(DEVICE_NAME, &name_key, &id).await;
            if let Some(key) = &hardware_key {
                self.release(DEVICE_HARDWARE_ID, key, &id).await;
            }
            return Err(e);
        }
        Ok(device)
    }

    /// Resolves the gateway a device names: another device of its tenant.
    async fn gateway_for(
        &self,
        device: &Device,
        reference: &str,
    ) -> Result<DeviceId, RegistryError> {
        let gateway = match self.device_of(device.tenant_id, reference).await {
            Err(RegistryError::NotFound(_)) => {
                return Err(ValidationError::new(
                    "gateway",
                    format!("no device {reference:?} in this tenant"),
                )
                .into());
            }
            other => other?,
        };
        if gateway.id == device.id {
            return Err(
                ValidationError::new("gateway", "a device cannot be its own gateway").into(),
            );
        }
        Ok(gateway.id)
    }

    /// The device `child` (id or name) of the gateway's tenant, if `gateway` may act for it:
    /// the child names it as its gateway and is not disabled.
    pub async fn child_of(
        &self,
        tenant: TenantId,
        gateway: DeviceId,
        child: &str,
    ) -> Result<Device, RegistryError> {
        let device = self.device_of(tenant, child).await?;
        if device.gateway_id != Some(gateway) {
            return Err(RegistryError::Forbidden(format!(
                "this device is not the gateway of {child:?}"
            )));
        }
        if device.disabled {
            return Err(RegistryError::Forbidden(format!(
                "device {child:?} is disabled"
            )));
        }
        Ok(device)
    }

    /// Finds a device of a tenant by id or name.
    pub async fn device(&self, tenant: &str, reference: &str) -> Result<Device, RegistryError> {
        let tenant = self.tenant(tenant).await?;
        self.device_of(tenant.id, reference).await
    }

    /// Like [`Registry::device`] for a tenant already resolved (the hot path of the bridge).
    pub async fn device_of(
        &self,
        tenant: TenantId,
        reference: &str,
    ) -> Result<Device, RegistryError> {
        let id = match DeviceId::parse(reference) {
            Ok(id) => id.to_string(),
            Err(_) => {
                validate_name("device", reference)?;
                match self
                    .store
                    .get_record(DEVICE_NAME, &format!("{tenant}/{reference}"))
                    .await?
                {
                    Some(id) => String::from_utf8_lossy(&id).into_owned(),
                    None => return Err(RegistryError::NotFound(format!("device {reference:?}"))),
                }
            }
        };
        self.get(DEVICE, &format!("{tenant}/{id}"))
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device {reference:?}")))
    }

    pub async fn list_devices(&self, tenant: &str) -> Result<Vec<Device>, RegistryError> {
        let tenant = self.tenant(tenant).await?;
        let everything = Selector::default();
        Ok(self
            .select_devices(tenant.id, &everything, None, usize::MAX)
            .await?
            .0)
    }

    /// Up to `limit` devices of the tenant whose labels `selector` selects, in id order, after
    /// the device id `after`. The second value is the cursor of the next page (the last device
    /// returned) when the page is full.
    pub async fn select_devices(
        &self,
        tenant: TenantId,
        selector: &Selector,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<(Vec<Device>, Option<DeviceId>), RegistryError> {
        let prefix = format!("{tenant}/");
        let mut cursor = after.map(|id| format!("{prefix}{id}"));
        let mut out = Vec::new();
        loop {
            let page = self
                .store
                .list_records(DEVICE, &prefix, cursor.as_deref(), PAGE)
                .await?;
            let full = page.len() == PAGE;
            for (key, bytes) in page {
                let device: Device = decode(&key, &bytes)?;
                cursor = Some(key);
                if selector.matches(&device) {
                    out.push(device);
                    if out.len() == limit {
                        let next = out.last().map(|d| d.id);
                        return Ok((out, next));
                    }
                }
            }
            if !full {
                return Ok((out, None));
            }
        }
    }

    pub async fn delete_device(
        &self,
        tenant: &str,
        reference: &str,
    ) -> Result<Device, RegistryError> {
        let device = self.device(tenant, reference).await?;
        let _guard = self.write_lock.lock().await;
        let t = device.tenant_id;
        self.store
            .delete_record(DEVICE, &format!("{t}/{}", device.id))
            .await?;
        self.store
            .delete_record(DEVICE_NAME, &format!("{t}/{}", device.name))
            .await?;
        if let Some(hw) = &device.hardware_id {
            self.store
                .delete_record(DEVICE_HARDWARE_ID, &format!("{t}/{hw}"))
                .await?;
        }
        self.revoked(&device).await;
        Ok(device)
    }

    async fn put<T: Serialize>(
        &self,
        kind: &str,
        key: &str,
        value: &T,
    ) -> Result<(), RegistryError> {
        self.store.put_record(kind, key, to_bytes(value)).await?;
        Ok(())
    }

    async fn get<T: DeserializeOwned>(
        &self,
        kind: &str,
        key: &str,
    ) -> Result<Option<T>, RegistryError> {
        match self.store.get_record(kind, key).await? {
            None => Ok(None),
            Some(bytes) => decode(key, &bytes).map(Some),
        }
    }
}

/// Every record of `kind` under `prefix`, decoded, a page at a time.
pub(crate) async fn list_all<T: DeserializeOwned>(
    store: &dyn Store,
    kind: &str,
    prefix: &str,
) -> Result<Vec<T>, RegistryError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_records(kind, prefix, after.as_deref(), PAGE)
            .await?;
        let full = page.len() == PAGE;
        for (key, bytes) in page {
            out.push(decode(&key, &bytes)?);
            after = Some(key);
        }
        if !full {
            return Ok(out);
        }
    }
}

pub(crate) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// JSON for a record; serialising our own plain structs cannot fail.
pub(crate) fn to_bytes<T: Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tern_store::EmbeddedStore;

    use super::*;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("store");
        (dir, Registry::new(Arc::new(store)))
    }

    fn new_device(name: &str, hardware_id: Option<&str>) -> NewDevice {
        NewDevice {
            name: name.into(),
            labels: BTreeMap::from([("site".into(), "berlin".into())]),
            hardware_id: hardware_id.map(Into::into),
            ..NewDevice::default()
        }
    }

    #[tokio::test]
    async fn names_and_hardware_ids_are_unique_across_registries_sharing_a_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let (a, b) = (Registry::new(store.clone()), Registry::new(store));
        let (x, y) = tokio::join!(a.create_tenant("acme"), b.create_tenant("acme"));
        assert_eq!([x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(), 1);
        let tenant = x.or(y).expect("one tenant");
        assert_eq!(a.tenant("acme").await.expect("found").id, tenant.id);

        let (x, y) = tokio::join!(
            a.create_device("acme", new_device("pump", Some("hw-1"))),
            b.create_device("acme", new_device("pump", Some("hw-2")))
        );
        assert!(matches!(
            (&x, &y),
            (Ok(_), Err(RegistryError::Conflict(_))) | (Err(RegistryError::Conflict(_)), Ok(_))
        ));
        let (x, y) = tokio::join!(
            a.create_device("acme", new_device("valve", Some("hw-9"))),
            b.create_device("acme", new_device("meter", Some("hw-9")))
        );
        assert_eq!(
            [x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(),
            1,
            "one hardware id"
        );
        // The loser's name was given back: it can be created with another hardware id.
        let lost = if x.is_ok() { "meter" } else { "valve" };
        a.create_device("acme", new_device(lost, Some("hw-10")))
            .await
            .expect("the name of the refused device is free");
    }

    /// Two registries updating one device at once: both changes stay (no lost update).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_device_updates_across_registries_are_all_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let (a, b) = (
            Arc::new(Registry::new(store.clone())),
            Arc::new(Registry::new(store)),
        );
        a.create_tenant("acme").await.expect("tenant");
        a.create_device("acme", new_device("pump", None))
            .await
            .expect("device");
        for round in 0..40 {
            let labels = BTreeMap::from([("round".to_string(), round.to_string())]);
            let relabel = tokio::spawn({
                let (a, labels) = (a.clone(), labels.clone());
                async move {
                    let patch = DevicePatch {
                        labels: Some(labels),
                        ..DevicePatch::default()
                    };
                    a.update_device("acme", "pump", patch).await
                }
            });
            let toggle = tokio::spawn({
                let b = b.clone();
                async move {
                    let patch = DevicePatch {
                        disabled: Some(round % 2 == 0),
                        ..DevicePatch::default()
                    };
                    b.update_device("acme", "pump", patch).await
                }
            });
            relabel.await.expect("task").expect("labels");
            toggle.await.expect("task").expect("disabled");
            let stored = b.device("acme", "pump").await.expect("device");
            assert_eq!(stored.labels, labels, "round {round}: the labels stayed");
            assert_eq!(
                stored.disabled,
                round % 2 == 0,
                "round {round}: so did disabled"
            );
        }
    }

    #[tokio::test]
    async fn tenants_are_found_by_id_or_name_and_names_are_unique() {
        let (_dir, registry) = registry();
        let acme = registry.create_tenant("acme").await.expect("create");
        assert_eq!(registry.tenant("acme").await.expect("by name"), acme);
        assert_eq!(
            registry.tenant(&acme.id.to_string()).await.expect("by id"),
            acme
        );
        assert!(matches!(
            registry.create_tenant("acme").await,
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            registry.create_tenant("Acme Corp").await,
            Err(RegistryError::Invalid(_))
        ));
        let uuid_like = TenantId::random().to_string();
        assert!(matches!(
            registry.create_tenant(&uuid_like).await,
            Err(RegistryError::Invalid(_))
        ));
        assert!(matches!(
            registry.tenant("nope").await,
            Err(RegistryError::NotFound(_))
        ));
        registry.create_tenant("globex").await.expect("create");
        let names: Vec<String> = registry
            .list_tenants()
            .await
            .expect("list")
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names.len(), 2);
    }

    #[tokio::test]
    async fn tenant_scoped_callers_see_only_their_tenant() {
        let (_dir, registry) = registry();
        let acme = registry.create_tenant("acme").await.expect("create");
        let globex = registry.create_tenant("globex").await.expect("create");
        let caller = Caller::Tenant(acme.id);
        assert_eq!(
            registry.tenant_for(caller, "acme").await.expect("own"),
            acme
        );
        assert_eq!(
            registry
                .tenant_for(caller, &acme.id.to_string())
                .await
                .expect("own"),
            acme
        );
        for other in ["globex", &globex.id.to_string(), "does-not-exist"] {
            assert!(matches!(
                registry.tenant_for(caller, other).await,
                Err(RegistryError::Forbidden(_))
            ));
        }
        assert_eq!(
            registry
                .tenant_for(Caller::Operator, "globex")
                .await
                .expect("operator"),
            globex
        );
    }

    #[tokio::test]
    async fn devices_belong_to_one_tenant() {
        let (_dir, registry) = registry();
        registry.create_tenant("acme").await.expect("create");
        registry.create_tenant("globex").await.expect("create");
        let boiler = registry
            .create_device("acme", new_device("boiler-1", Some("SN-1")))
            .await
            .expect("create");
        assert_eq!(
            registry.device("acme", "boiler-1").await.expect("by name"),
            boiler
        );
        assert_eq!(
            registry
                .device("acme", &boiler.id.to_string())
                .await
                .expect("by id"),
            boiler
        );
        // The same id under another tenant is not visible.
        assert!(matches!(
            registry.device("globex", &boiler.id.to_string()).await,
            Err(RegistryError::NotFound(_))
        ));
        // Names and hardware ids are unique per tenant, not globally.
        assert!(matches!(
            registry
                .create_device("acme", new_device("boiler-1", None))
                .await,
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            registry
                .create_device("acme", new_device("boiler-2", Some("SN-1")))
                .await,
            Err(RegistryError::Conflict(_))
        ));
        registry
            .create_device("globex", new_device("boiler-1", Some("SN-1")))
            .await
            .expect("other tenant");
        assert_eq!(registry.list_devices("acme").await.expect("list").len(), 1);
    }

    #[tokio::test]
    async fn deleting_frees_names_and_tenants_with_devices_are_kept() {
        let (_dir, registry) = registry();
        registry.create_tenant("acme").await.expect("create");
        registry
            .create_device("acme", new_device("boiler-1", Some("SN-1")))
            .await
            .expect("create");
        assert!(matches!(
            registry.delete_tenant("acme").await,
            Err(RegistryError::FailedPrecondition(_))
        ));
        registry
            .delete_device("acme", "boiler-1")
            .await
            .expect("delete");
        assert!(matches!(
            registry.device("acme", "boiler-1").await,
            Err(RegistryError::NotFound(_))
        ));
        registry
            .create_device("acme", new_device("boiler-1", Some("SN-1")))
            .await
            .expect("name reusable");
        registry
            .delete_device("acme", "boiler-1")
            .await
            .expect("delete");
        registry.delete_tenant("acme").await.expect("empty tenant");
        assert!(registry.list_tenants().await.expect("list").is_empty());
        registry
            .create_tenant("acme")
            .await
            .expect("tenant name reusable");
    }

    #[tokio::test]
    async fn bad_input_names_the_field() {
        let (_dir, registry) = registry();
        registry.create_tenant("acme").await.expect("create");
        let mut bad = new_device("ok", None);
        bad.labels.insert("bad key".into(), "x".into());
        match registry.create_device("acme", bad).await {
            Err(RegistryError::Invalid(e)) => assert_eq!(e.field, "labels.bad key"),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }
}
