//! Update artifacts: uploaded per tenant, hashed (SHA-256) while they are written, signed with
//! the tenant's Ed25519 update-signing key (over the 32 digest bytes, as tern-agent checks),
//! kept as files under the artifacts directory and described by `ota_artifact` records.

use std::path::PathBuf;
use std::sync::Arc;

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms};
use tern_store::Store;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::RegistryError;
use crate::registry::{decode, to_bytes};

const ARTIFACT: &str = "ota_artifact";
const SIGNING_KEY: &str = "ota_signing_key";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub name: String,
    pub version: String,
    pub size: u64,
    /// Hex.
    pub sha256: String,
    /// Base64 Ed25519 signature of the digest by the tenant's update-signing key.
    pub signature: String,
    pub created_at_ms: i64,
}

pub struct Artifacts {
    store: Arc<dyn Store>,
    dir: PathBuf,
    max_bytes: u64,
}

/// An upload in progress: bytes go to a temporary file and into the digest.
pub struct Upload {
    file: tokio::fs::File,
    temporary: PathBuf,
    digest: digest::Context,
    size: u64,
    max_bytes: u64,
}

fn validate_label(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() || value.len() > 128 || value.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must be 1..=128 characters without control characters",
        ));
    }
    Ok(())
}

impl Upload {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), RegistryError> {
        self.size += chunk.len() as u64;
        if self.size > self.max_bytes {
            return Err(ValidationError::new(
                "body",
                format!(
                    "artifacts are at most {} bytes (ota.max_artifact_bytes)",
                    self.max_bytes
                ),
            )
            .into());
        }
        self.digest.update(chunk);
        self.file.write_all(chunk).await.map_err(io)?;
        Ok(())
    }
}

impl Drop for Upload {
    /// An upload that was not finished leaves nothing behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.temporary);
    }
}

fn io(e: std::io::Error) -> RegistryError {
    RegistryError::Storage(tern_store::StoreError::Storage(format!(
        "artifact file: {e}"
    )))
}

impl Artifacts {
    pub fn new(store: Arc<dyn Store>, dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            store,
            dir,
            max_bytes,
        }
    }

    pub async fn begin(&self) -> Result<Upload, RegistryError> {
        let uploads = self.dir.join("uploads");
        tokio::fs::create_dir_all(&uploads).await.map_err(io)?;
        let temporary = uploads.join(Uuid::new_v4().to_string());
        let file = tokio::fs::File::create(&temporary).await.map_err(io)?;
        Ok(Upload {
            file,
            temporary,
            digest: digest::Context::new(&digest::SHA256),
            size: 0,
            max_bytes: self.max_bytes,
        })
    }

    /// Makes the upload durable, signs it and records it.
    pub async fn finish(
        &self,
        tenant: TenantId,
        upload: Upload,
        name: &str,
        version: &str,
    ) -> Result<Artifact, RegistryError> {
        validate_label("name", name)?;
        validate_label("version", version)?;
        if upload.size == 0 {
            return Err(ValidationError::new("body", "the artifact is empty").into());
        }
        upload.file.sync_all().await.map_err(io)?;
        let digest = upload.digest.clone().finish();
        let key = self.signing_key(tenant).await?;
        let artifact = Artifact {
            id: Uuid::now_v7(),
            tenant_id: tenant,
            name: name.to_string(),
            version: version.to_string(),
            size: upload.size,
            sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            signature: STANDARD.encode(key.sign(digest.as_ref()).as_ref()),
            created_at_ms: now_ms(),
        };
        let path = self.path(&artifact);
        tokio::fs::create_dir_all(path.parent().expect("a tenant directory"))
            .await
            .map_err(io)?;
        tokio::fs::rename(&upload.temporary, &path)
            .await
            .map_err(io)?;
        self.store
            .put_record(
                ARTIFACT,
                &format!("{tenant}/{}", artifact.id),
                to_bytes(&artifact),
            )
            .await?;
        Ok(artifact)
    }

    /// Where the artifact's bytes are.
    pub fn path(&self, artifact: &Artifact) -> PathBuf {
        self.dir
            .join(artifact.tenant_id.to_string())
            .join(artifact.id.to_string())
    }

    pub async fn get(&self, tenant: TenantId, id: Uuid) -> Result<Artifact, RegistryError> {
        let key = format!("{tenant}/{id}");
        match self.store.get_record(ARTIFACT, &key).await? {
            Some(bytes) => decode(&key, &bytes),
            None => Err(RegistryError::NotFound(format!("artifact {id}"))),
        }
    }

    pub async fn list(&self, tenant: TenantId) -> Result<Vec<Artifact>, RegistryError> {
        crate::registry::list_all(self.store.as_ref(), ARTIFACT, &format!("{tenant}/")).await
    }

    /// The tenant's update-signing public key (base64, 32 bytes): what devices are given as
    /// tern-agent's `update.public_key`.
    pub async fn public_key(&self, tenant: TenantId) -> Result<String, RegistryError> {
        let key = self.signing_key(tenant).await?;
        Ok(STANDARD.encode(key.public_key().as_ref()))
    }

    /// The tenant's key pair, made on first use (by compare-and-swap, so concurrent first
    /// uses agree on one key).
    async fn signing_key(&self, tenant: TenantId) -> Result<Ed25519KeyPair, RegistryError> {
        let key = tenant.to_string();
        let pkcs8 = match self.store.get_record(SIGNING_KEY, &key).await? {
            Some(bytes) => bytes,
            None => {
                let fresh = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| corrupt(&key, "cannot generate a key"))?;
                let fresh = bytes::Bytes::copy_from_slice(fresh.as_ref());
                if self
                    .store
                    .compare_and_swap(SIGNING_KEY, &key, None, Some(fresh.clone()))
                    .await?
                {
                    fresh
                } else {
                    self.store
                        .get_record(SIGNING_KEY, &key)
                        .await?
                        .ok_or_else(|| corrupt(&key, "vanished"))?
                }
            }
        };
        Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| corrupt(&key, "not an Ed25519 key"))
    }
}

fn corrupt(key: &str, reason: &str) -> RegistryError {
    RegistryError::Corrupt {
        key: format!("{SIGNING_KEY}/{key}"),
        reason: reason.to_string(),
    }
}
