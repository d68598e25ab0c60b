//! The device's credentials: kept in `{root}/secure/credentials.json` (mode 0600, replaced
//! atomically) and renewed at the platform's `POST /api/v1/token/refresh`, which spends the
//! refresh token it is given and returns a new pair.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use reqwest::{Client, StatusCode, Url};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub tenant_id: String,
    pub device_id: String,
    pub access_token: String,
    pub access_token_expires_at_ms: i64,
    pub refresh_token: String,
    /// When the agent got them (not part of the platform's answer).
    #[serde(default)]
    pub obtained_at_ms: i64,
}

/// Renew the access token when it has less than this left.
const RENEW_BEFORE_MS: i64 = 120_000;

impl Credentials {
    /// When to renew: two minutes before expiry, or after two thirds of the token's life
    /// when it lives less than six minutes (so a short TTL does not renew at every connect).
    pub fn renew_at_ms(&self) -> i64 {
        let lifetime = self.access_token_expires_at_ms - self.obtained_at_ms;
        self.access_token_expires_at_ms - RENEW_BEFORE_MS.min(lifetime / 3)
    }
}

impl std::fmt::Debug for Credentials {
    /// Never prints the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tenant_id", &self.tenant_id)
            .field("device_id", &self.device_id)
            .field(
                "access_token_expires_at_ms",
                &self.access_token_expires_at_ms,
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The platform said no: the token was spent, revoked, or the device is gone.
    #[error("the platform refused the refresh token ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("cannot reach the platform: {0}")]
    Transport(#[from] reqwest::Error),
}

/// Exchanges `refresh_token` for new credentials.
pub async fn refresh(
    http: &Client,
    server: &Url,
    refresh_token: &str,
) -> Result<Credentials, RefreshError> {
    let url = server
        .join("api/v1/token/refresh")
        .expect("a constant relative path");
    let response = http
        .post(url)
        .json(&serde_json::json!({ "refresh_token": refresh_token }))
        .send()
        .await?;
    let status = response.status();
    if !status.is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        return Err(RefreshError::Refused {
            status,
            message: body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string(),
        });
    }
    let mut credentials: Credentials = response.json().await?;
    credentials.obtained_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Ok(credentials)
}

/// The directory of secrets: credentials and anything else `wipe` must erase.
pub struct Vault {
    dir: PathBuf,
}

impl Vault {
    pub fn new(root: &Path) -> Self {
        Self {
            dir: root.join("secure"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join("credentials.json")
    }

    pub fn load(&self) -> anyhow::Result<Option<Credentials>> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not valid credentials", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the new credentials beside the old, then renames over them: a crash leaves one
    /// complete set.
    pub fn save(&self, credentials: &Credentials) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        let path = self.path();
        let temporary = self.dir.join("credentials.json.new");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        file.write_all(&serde_json::to_vec(credentials)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(())
    }

    /// Erases every secret.
    pub fn wipe(&self) -> anyhow::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot erase {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lived_tokens_are_renewed_after_two_thirds_of_their_life() {
        let at = |obtained, expires| Credentials {
            tenant_id: "t".into(),
            device_id: "d".into(),
            access_token: String::new(),
            access_token_expires_at_ms: expires,
            refresh_token: String::new(),
            obtained_at_ms: obtained,
        };
        assert_eq!(
            at(0, 3_600_000).renew_at_ms(),
            3_480_000,
            "an hour: two minutes before"
        );
        assert_eq!(at(0, 60_000).renew_at_ms(), 40_000, "a minute: after 40 s");
    }

    #[test]
    fn credentials_are_private_and_survive_a_reload() {
        let root = tempfile::tempdir().expect("tempdir");
        let vault = Vault::new(root.path());
        assert!(vault.load().expect("load").is_none());
        let credentials = Credentials {
            tenant_id: "t".into(),
            device_id: "d".into(),
            access_token: "secret-access".into(),
            access_token_expires_at_ms: 1,
            refresh_token: "tern_rt_secret".into(),
            obtained_at_ms: 0,
        };
        vault.save(&credentials).expect("save");
        let mode = std::fs::metadata(root.path().join("secure/credentials.json"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = vault.load().expect("load").expect("saved");
        assert_eq!(loaded.refresh_token, "tern_rt_secret");
        assert!(!format!("{loaded:?}").contains("secret"));
        vault.wipe().expect("wipe");
        assert!(vault.load().expect("load").is_none());
    }
}
