//! Low-entropy secrets (user passwords) and client secrets at rest: argon2id in PHC string
//! form, with the crate's defaults (OWASP's minimum: 19 MiB, 2 passes). Hashing is deliberately
//! slow, so it runs on the blocking pool.

use argon2::password_hash::SaltString;
use argon2::password_hash::rand_core::OsRng;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

use crate::IdentityError;

pub(crate) async fn hash(secret: &str) -> Result<String, IdentityError> {
    let secret = secret.to_owned();
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| IdentityError::Keys(format!("cannot hash a secret: {e}")))
    })
    .await
    .map_err(|e| IdentityError::Keys(format!("hashing task failed: {e}")))?
}

/// Whether `secret` matches the stored hash (the comparison inside is constant-time).
pub(crate) async fn verify(secret: &str, stored: &str) -> Result<bool, IdentityError> {
    let (secret, stored) = (secret.to_owned(), stored.to_owned());
    tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&stored)
            .map_err(|e| IdentityError::Keys(format!("corrupt password hash: {e}")))?;
        Ok(Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok())
    })
    .await
    .map_err(|e| IdentityError::Keys(format!("hashing task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_salted_argon2id_and_verify_only_the_secret() {
        let a = hash("correct horse").await.expect("hash");
        let b = hash("correct horse").await.expect("hash");
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b, "salted");
        assert!(verify("correct horse", &a).await.expect("verify"));
        assert!(!verify("correct horsE", &a).await.expect("verify"));
        assert!(verify("x", "not a hash").await.is_err());
    }
}
