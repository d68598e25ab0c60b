//! Update artifacts: uploaded per tenant, hashed (SHA-256) while they are written, signed with
//! the tenant's Ed25519 update-signing key (over the 32 digest bytes, as tern-agent checks),
//! kept in the store as `ota_chunk` records of [`CHUNK_BYTES`] (so every process sharing the
//! store can serve them) and described by `ota_artifact` records, written last.
//!
//! Artifacts uploaded before chunks existed are files under the artifacts directory; they are
//! still served from there.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms};
use tern_store::Store;
use uuid::Uuid;

use crate::RegistryError;
use crate::registry::{decode, to_bytes};

const ARTIFACT: &str = "ota_artifact";
const SIGNING_KEY: &str = "ota_signing_key";
const CHUNK: &str = "ota_chunk";
/// Bytes per chunk record: small enough for any store's value (ScyllaDB advises under 1 MiB
/// per cell), large enough that a 100 MiB image is 400 records.
pub const CHUNK_BYTES: usize = 256 * 1024;

fn chunk_key(id: Uuid, index: u64) -> String {
    format!("{id}/{index:010}")
}

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
    /// Where artifacts uploaded before chunks existed are.
    legacy_dir: PathBuf,
    max_bytes: u64,
}

/// An upload in progress: bytes go into the digest and, a chunk at a time, into the store
/// under the artifact's id. No `ota_artifact` record names them until [`Artifacts::finish`].
pub struct Upload {
    store: Arc<dyn Store>,
    id: Uuid,
    pending: BytesMut,
    chunks: u64,
    digest: digest::Context,
    size: u64,
    max_bytes: u64,
    finished: bool,
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
        self.pending.extend_from_slice(chunk);
        while self.pending.len() >= CHUNK_BYTES {
            let full = self.pending.split_to(CHUNK_BYTES).freeze();
            self.put_chunk(full).await?;
        }
        Ok(())
    }

    async fn put_chunk(&mut self, bytes: Bytes) -> Result<(), RegistryError> {
        self.store
            .put_record(CHUNK, &chunk_key(self.id, self.chunks), bytes)
            .await?;
        self.chunks += 1;
        Ok(())
    }
}

impl Drop for Upload {
    /// An upload that was not finished leaves nothing behind: its chunks are deleted.
    fn drop(&mut self) {
        if self.finished || self.chunks == 0 {
            return;
        }
        let (store, id, chunks) = (self.store.clone(), self.id, self.chunks);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for index in 0..chunks {
                    if let Err(e) = store.delete_record(CHUNK, &chunk_key(id, index)).await {
                        tracing::warn!(upload = %id, error = %e, "cannot delete an abandoned upload's chunk");
                        return;
                    }
                }
            });
        }
    }
}

fn io(e: std::io::Error) -> RegistryError {
    RegistryError::Storage(tern_store::StoreError::Storage(format!(
        "artifact file: {e}"
    )))
}

impl Artifacts {
    pub fn new(store: Arc<dyn Store>, legacy_dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            store,
            legacy_dir,
            max_bytes,
        }
    }

    pub async fn begin(&self) -> Result<Upload, RegistryError> {
        Ok(Upload {
            store: self.store.clone(),
            id: Uuid::now_v7(),
            pending: BytesMut::with_capacity(CHUNK_BYTES),
            chunks: 0,
            digest: digest::Context::new(&digest::SHA256),
            size: 0,
            max_bytes: self.max_bytes,
            finished: false,
        })
    }

    /// Makes the upload durable, signs it and records it.
    pub async fn finish(
        &self,
        tenant: TenantId,
        mut upload: Upload,
        name: &str,
        version: &str,
    ) -> Result<Artifact, RegistryError> {
        validate_label("name", name)?;
        validate_label("version", version)?;
        if upload.size == 0 {
            return Err(ValidationError::new("body", "the artifact is empty").into());
        }
        let rest = upload.pending.split().freeze();
        if !rest.is_empty() {
            upload.put_chunk(rest).await?;
        }
        let digest = upload.digest.clone().finish();
        let key = self.signing_key(tenant).await?;
        let artifact = Artifact {
            id: upload.id,
            tenant_id: tenant,
            name: name.to_string(),
            version: version.to_string(),
            size: upload.size,
            sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            signature: STANDARD.encode(key.sign(digest.as_ref()).as_ref()),
            created_at_ms: now_ms(),
        };
        self.store
            .put_record(
                ARTIFACT,
                &format!("{tenant}/{}", artifact.id),
                to_bytes(&artifact),
            )
            .await?;
        upload.finished = true;
        Ok(artifact)
    }

    /// The artifact's bytes `start..=end` (inclusive bounds within its size), a chunk at a
    /// time, so a download holds one chunk in memory whatever the artifact's size.
    pub async fn read(
        &self,
        artifact: &Artifact,
        start: u64,
        end: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, RegistryError>> + Send + 'static, RegistryError>
    {
        let legacy = self
            .legacy_dir
            .join(artifact.tenant_id.to_string())
            .join(artifact.id.to_string());
        let legacy = match tokio::fs::File::open(&legacy).await {
            Ok(file) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let state = (self.store.clone(), artifact.id, start, legacy);
        Ok(futures_util::stream::try_unfold(
            state,
            move |(store, id, at, legacy)| async move {
                if at > end {
                    return Ok(None);
                }
                let want = usize::try_from(end + 1 - at)
                    .unwrap_or(usize::MAX)
                    .min(CHUNK_BYTES);
                let bytes = match legacy {
                    Some(mut file) => {
                        use tokio::io::{AsyncReadExt, AsyncSeekExt};
                        let mut buffer = vec![0; want];
                        file.seek(std::io::SeekFrom::Start(at)).await.map_err(io)?;
                        file.read_exact(&mut buffer).await.map_err(io)?;
                        let next = (store, id, at + want as u64, Some(file));
                        return Ok(Some((Bytes::from(buffer), next)));
                    }
                    None => {
                        let index = at / CHUNK_BYTES as u64;
                        let chunk = store
                            .get_record(CHUNK, &chunk_key(id, index))
                            .await?
                            .ok_or_else(|| RegistryError::Corrupt {
                                key: format!("{CHUNK}/{}", chunk_key(id, index)),
                                reason: "missing".into(),
                            })?;
                        let offset = (at % CHUNK_BYTES as u64) as usize;
                        let take = want.min(chunk.len().saturating_sub(offset));
                        if take == 0 {
                            return Err(RegistryError::Corrupt {
                                key: format!("{CHUNK}/{}", chunk_key(id, index)),
                                reason: "shorter than the artifact's size".into(),
                            });
                        }
                        chunk.slice(offset..offset + take)
                    }
                };
                let next = at + bytes.len() as u64;
                Ok(Some((bytes, (store, id, next, None))))
            },
        ))
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

#[cfg(test)]
mod tests {
    use futures_util::TryStreamExt;
    use tern_store::EmbeddedStore;

    use super::*;

    async fn read_all(artifacts: &Artifacts, artifact: &Artifact, start: u64, end: u64) -> Vec<u8> {
        let chunks: Vec<Bytes> = artifacts
            .read(artifact, start, end)
            .await
            .expect("read")
            .try_collect()
            .await
            .expect("chunks");
        chunks.concat()
    }

    #[tokio::test]
    async fn artifacts_live_in_the_store_in_chunks_and_read_back_by_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store")).expect("store"));
        let artifacts = Artifacts::new(store.clone(), dir.path().join("artifacts"), 10 << 20);
        let tenant = TenantId::random();
        let body: Vec<u8> = (0..(2 * CHUNK_BYTES + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();

        let mut upload = artifacts.begin().await.expect("begin");
        for piece in body.chunks(7_000) {
            upload.write(piece).await.expect("write");
        }
        let artifact = artifacts
            .finish(tenant, upload, "firmware", "1.0.0")
            .await
            .expect("finish");
        assert_eq!(artifact.size, body.len() as u64);
        let digest = digest::digest(&digest::SHA256, &body);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(artifact.sha256, hex);
        assert_eq!(
            store
                .list_records(CHUNK, &format!("{}/", artifact.id), None, 100)
                .await
                .expect("list")
                .len(),
            3,
            "two full chunks and the rest"
        );

        // A process that did not receive the upload serves it from the same store.
        let elsewhere = Artifacts::new(store.clone(), dir.path().join("elsewhere"), 10 << 20);
        let last = body.len() as u64 - 1;
        assert_eq!(read_all(&elsewhere, &artifact, 0, last).await, body);
        let boundary = CHUNK_BYTES as u64;
        assert_eq!(
            read_all(&elsewhere, &artifact, boundary - 10, boundary + 10).await,
            &body[CHUNK_BYTES - 10..=CHUNK_BYTES + 10]
        );
        assert_eq!(
            read_all(&elsewhere, &artifact, last, last).await,
            &body[body.len() - 1..]
        );

        // An upload abandoned half-way leaves no chunks behind.
        let mut abandoned = artifacts.begin().await.expect("begin");
        let id = abandoned.id;
        abandoned.write(&body).await.expect("write");
        drop(abandoned);
        let prefix = format!("{id}/");
        for _ in 0..100 {
            if store
                .list_records(CHUNK, &prefix, None, 10)
                .await
                .expect("list")
                .is_empty()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the abandoned upload's chunks are still there");
    }
}
