//! The Ed25519 key that signs device access tokens. Created on first start and kept in the
//! store, so tokens stay valid across restarts. (Scheduled rotation with overlap and a JWKS
//! endpoint come with the OAuth2 server.)

use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use jsonwebtoken::{DecodingKey, EncodingKey};
use tern_store::Store;

use crate::IdentityError;
use crate::secrets::sha256_hex;

const KIND: &str = "signing_key";
const CURRENT: &str = "current";

pub(crate) struct SigningKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
}

impl SigningKey {
    /// Loads the current key, creating it on first start.
    pub async fn load_or_create(store: &Arc<dyn Store>) -> Result<Self, IdentityError> {
        let pkcs8 = match store.get_record(KIND, CURRENT).await? {
            Some(bytes) => bytes.to_vec(),
            None => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| IdentityError::Keys("cannot generate an Ed25519 key".into()))?;
                let bytes = doc.as_ref().to_vec();
                store
                    .put_record(KIND, CURRENT, bytes.clone().into())
                    .await?;
                tracing::info!("created the token signing key");
                bytes
            }
        };
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| {
            IdentityError::Keys("the stored signing key is not a valid Ed25519 key".into())
        })?;
        let public = pair.public_key().as_ref();
        Ok(Self {
            kid: sha256_hex(public)[..16].to_string(),
            encoding: EncodingKey::from_ed_der(&pkcs8),
            decoding: DecodingKey::from_ed_der(public),
        })
    }
}
