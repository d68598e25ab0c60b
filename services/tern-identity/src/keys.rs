//! The Ed25519 keys that sign every token (device access tokens, OAuth access and ID tokens).
//!
//! Keys rotate on a schedule with overlap on both sides: a new key is published in the JWKS
//! [`PREPUBLISH_SECS`] before it starts signing (so verifiers that cache the JWKS know it in
//! time), and a retired key stays published until every token it signed has expired. Keys are
//! kept in the store, so tokens stay valid across restarts; another instance's new key is
//! picked up when a token names a key this one does not know yet.

use std::sync::{Arc, RwLock};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tern_core::now_ms;
use tern_store::Store;

use crate::IdentityError;
use crate::secrets::sha256_hex;

const KIND: &str = "signing_keys";
/// Where the single key of earlier versions was kept; imported once as the first key.
const LEGACY_KIND: &str = "signing_key";
const LEGACY_KEY: &str = "current";
/// How long a new key is published before it signs.
pub(crate) const PREPUBLISH_SECS: i64 = 3600;

#[derive(Serialize, Deserialize)]
struct KeyRecord {
    /// PKCS#8 document, base64.
    pkcs8: String,
    created_at_s: i64,
    /// When it starts signing.
    active_from_s: i64,
}

struct Key {
    kid: String,
    public: Vec<u8>,
    created_at_s: i64,
    active_from_s: i64,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Key {
    fn from_record(record: &KeyRecord) -> Result<Self, IdentityError> {
        let pkcs8 = STANDARD
            .decode(&record.pkcs8)
            .map_err(|_| IdentityError::Keys("a stored signing key is not base64".into()))?;
        Self::from_pkcs8(&pkcs8, record.created_at_s, record.active_from_s)
    }

    fn from_pkcs8(
        pkcs8: &[u8],
        created_at_s: i64,
        active_from_s: i64,
    ) -> Result<Self, IdentityError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| {
            IdentityError::Keys("a stored signing key is not a valid Ed25519 key".into())
        })?;
        let public = pair.public_key().as_ref().to_vec();
        Ok(Self {
            kid: sha256_hex(&public)[..16].to_string(),
            encoding: EncodingKey::from_ed_der(pkcs8),
            decoding: DecodingKey::from_ed_der(&public),
            public,
            created_at_s,
            active_from_s,
        })
    }
}

/// The published keys of this installation, newest last.
pub(crate) struct Keyring {
    store: Arc<dyn Store>,
    keys: RwLock<Vec<Arc<Key>>>,
    rotation_secs: i64,
    /// How long a retired key is kept: the longest lifetime of a token it may have signed.
    retain_secs: i64,
}

impl Keyring {
    pub async fn load(
        store: Arc<dyn Store>,
        rotation_secs: i64,
        retain_secs: i64,
    ) -> Result<Self, IdentityError> {
        let ring = Self {
            store,
            keys: RwLock::new(Vec::new()),
            rotation_secs,
            retain_secs,
        };
        ring.import_legacy_key().await?;
        ring.reload().await?;
        ring.rotate_if_due(now_ms() / 1000).await?;
        Ok(ring)
    }

    async fn import_legacy_key(&self) -> Result<(), IdentityError> {
        let Some(pkcs8) = self.store.get_record(LEGACY_KIND, LEGACY_KEY).await? else {
            return Ok(());
        };
        let now = now_ms() / 1000;
        let key = Key::from_pkcs8(&pkcs8, now, 0)?;
        let record = KeyRecord {
            pkcs8: STANDARD.encode(&pkcs8),
            created_at_s: now,
            active_from_s: 0,
        };
        self.store.put_record(KIND, &key.kid, json(&record)).await?;
        self.store.delete_record(LEGACY_KIND, LEGACY_KEY).await?;
        tracing::info!(kid = %key.kid, "imported the signing key of an earlier version");
        Ok(())
    }

    /// Reads the keys from the store (another instance may have rotated).
    pub async fn reload(&self) -> Result<(), IdentityError> {
        let mut keys = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_records(KIND, "", after.as_deref(), 100)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (_, bytes) in &page {
                let record: KeyRecord = serde_json::from_slice(bytes)
                    .map_err(|e| IdentityError::Keys(format!("corrupt signing key record: {e}")))?;
                keys.push(Arc::new(Key::from_record(&record)?));
            }
        }
        keys.sort_by_key(|k| (k.active_from_s, k.created_at_s));
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(())
    }

    /// Creates the next key when the active one is due for rotation (and the first key), and
    /// drops retired keys whose tokens have all expired. Returns whether anything changed.
    pub async fn rotate_if_due(&self, now_s: i64) -> Result<bool, IdentityError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut changed = false;
        let newest = keys.last();
        let due = newest.is_none_or(|k| {
            k.active_from_s.max(k.created_at_s) + self.rotation_secs <= now_s + PREPUBLISH_SECS
        });
        if due {
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| IdentityError::Keys("cannot generate an Ed25519 key".into()))?;
            // The very first key signs at once: there is nothing to overlap with.
            let active_from_s = if newest.is_none() {
                now_s
            } else {
                now_s + PREPUBLISH_SECS
            };
            let record = KeyRecord {
                pkcs8: STANDARD.encode(doc.as_ref()),
                created_at_s: now_s,
                active_from_s,
            };
            let key = Key::from_record(&record)?;
            self.store.put_record(KIND, &key.kid, json(&record)).await?;
            tracing::info!(kid = %key.kid, active_from_s, "created a signing key");
            changed = true;
        }
        // A key is retired when its successor starts signing.
        for pair in keys.windows(2) {
            let (old, next) = (&pair[0], &pair[1]);
            if next.active_from_s + self.retain_secs < now_s {
                self.store.delete_record(KIND, &old.kid).await?;
                tracing::info!(kid = %old.kid, "dropped a retired signing key");
                changed = true;
            }
        }
        if changed {
            self.reload().await?;
        }
        Ok(changed)
    }

    fn signing_key(&self, now_s: i64) -> Result<Arc<Key>, IdentityError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .rev()
            .find(|k| k.active_from_s <= now_s)
            .cloned()
            .ok_or_else(|| IdentityError::Keys("no signing key is active".into()))
    }

    /// Signs `claims` with the active key; `typ` is the JWT's media type (`at+jwt`, `JWT`).
    pub fn sign<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, IdentityError> {
        let key = self.signing_key(now_ms() / 1000)?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        header.typ = Some(typ.to_string());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .map_err(|e| IdentityError::Keys(format!("cannot sign a token: {e}")))
    }

    /// The verification key a token's header names (`None`: unknown key, or no `kid`).
    pub fn decoding_key(&self, token: &str) -> Option<DecodingKey> {
        let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .find(|k| k.kid == kid)
            .map(|k| k.decoding.clone())
    }

    /// The public keys as a JWK Set (RFC 7517; OKP keys per RFC 8037).
    pub fn jwks(&self) -> serde_json::Value {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<_> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": URL_SAFE_NO_PAD.encode(&k.public),
                    "kid": k.kid,
                    "use": "sig",
                    "alg": "EdDSA",
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    #[cfg(test)]
    pub fn kids(&self) -> Vec<String> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.iter().map(|k| k.kid.clone()).collect()
    }

    #[cfg(test)]
    pub fn active_kid(&self, now_s: i64) -> Option<String> {
        self.signing_key(now_s).ok().map(|k| k.kid.clone())
    }
}

fn json<T: Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use tern_store::EmbeddedStore;

    use super::*;

    const DAY: i64 = 86_400;

    #[tokio::test]
    async fn keys_rotate_with_prepublication_and_retire_after_their_tokens_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let ring = Keyring::load(store.clone(), 30 * DAY, DAY)
            .await
            .expect("load");
        let now = now_ms() / 1000;
        let first = ring.active_kid(now).expect("first key signs at once");
        assert_eq!(ring.kids(), vec![first.clone()]);
        assert!(
            !ring.rotate_if_due(now + DAY).await.expect("rotate"),
            "not due yet"
        );

        // An hour before the rotation date the next key is published but does not sign yet.
        let t = now + 30 * DAY - PREPUBLISH_SECS;
        assert!(ring.rotate_if_due(t).await.expect("rotate"));
        let kids = ring.kids();
        assert_eq!(kids.len(), 2);
        let second = kids[1].clone();
        assert_eq!(ring.active_kid(t).as_deref(), Some(first.as_str()));
        assert_eq!(
            ring.active_kid(t + PREPUBLISH_SECS).as_deref(),
            Some(second.as_str())
        );
        let jwks = ring.jwks();
        assert_eq!(jwks["keys"].as_array().expect("keys").len(), 2);
        assert_eq!(jwks["keys"][0]["kty"], "OKP");

        // The retired key stays while tokens it signed may live, then goes.
        assert!(
            !ring
                .rotate_if_due(t + PREPUBLISH_SECS + DAY - 1)
                .await
                .expect("rotate")
        );
        assert_eq!(ring.kids().len(), 2);
        assert!(
            ring.rotate_if_due(t + PREPUBLISH_SECS + DAY + 1)
                .await
                .expect("rotate")
        );
        assert_eq!(ring.kids(), vec![second.clone()]);

        // Another instance loading the same store sees the same keys.
        let other = Keyring::load(store, 30 * DAY, DAY).await.expect("load");
        assert_eq!(other.kids(), vec![second]);
    }

    #[tokio::test]
    async fn the_key_of_an_earlier_version_is_imported_with_its_kid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        store
            .put_record(LEGACY_KIND, LEGACY_KEY, doc.as_ref().to_vec().into())
            .await
            .expect("put");
        let legacy = Key::from_pkcs8(doc.as_ref(), 0, 0).expect("key");
        let ring = Keyring::load(store.clone(), 30 * DAY, DAY)
            .await
            .expect("load");
        assert_eq!(ring.kids(), vec![legacy.kid]);
        assert!(
            store
                .get_record(LEGACY_KIND, LEGACY_KEY)
                .await
                .expect("get")
                .is_none()
        );
    }
}
