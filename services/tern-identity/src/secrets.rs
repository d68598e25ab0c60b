//! Random opaque tokens and their stored form.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::IdentityError;

/// A new secret `{prefix}{43 base64url characters}` (256 random bits). The prefix says what the
/// token is, which helps secret scanners and people reading logs of a leak.
pub(crate) fn new_token(prefix: &str) -> Result<String, IdentityError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Keys("the system random generator failed".into()))?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// The stored form of a token: hex SHA-256.
pub(crate) fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    digest(&SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hashed() {
        let a = new_token("tern_rt_").expect("token");
        let b = new_token("tern_rt_").expect("token");
        assert!(a.starts_with("tern_rt_") && a.len() == 8 + 43);
        assert_ne!(a, b);
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), token_hash(&b));
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
