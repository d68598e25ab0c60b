//! The user directory: people of a tenant who sign in (portal, CLI, device approval), with
//! roles and groups, passwords hashed with argon2id, and lockout after repeated failures.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tern_core::{Tenant, TenantId, ValidationError, now_ms, validate_name};
use tern_store::Store;
use tokio::sync::Mutex;

use crate::ldap::{DirectoryUser, LdapConfig, LdapError};
use crate::scopes::{ADMIN, READ, Scopes, WRITE};
use crate::{IdentityError, passwords, records};

const USER: &str = "user";
const USER_NAME: &str = "user_name";
/// NIST SP 800-63B: at least 8 characters, and allow long passphrases.
const MIN_PASSWORD_CHARS: usize = 8;
const MAX_PASSWORD_CHARS: usize = 1024;

/// What a user may do through the API, granted to the tokens they sign in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything in the tenant, credentials included.
    Admin,
    /// Read and change devices, rules, commands; not credentials.
    Editor,
    /// Read only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Editor => "editor",
            Self::Viewer => "viewer",
        }
    }

    fn scopes(self) -> &'static [&'static str] {
        match self {
            Self::Admin => &[READ, WRITE, ADMIN],
            Self::Editor => &[READ, WRITE],
            Self::Viewer => &[READ],
        }
    }
}

/// A user as the API shows it (never the password hash).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub tenant_id: TenantId,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub roles: Vec<Role>,
    pub groups: Vec<String>,
    pub created_at_ms: i64,
    /// Failed sign-ins since the last successful one.
    pub failed_logins: u32,
    /// Sign-in is refused until then (after too many failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until_ms: Option<i64>,
    /// The user's entry in the tenant's LDAP directory, for users who sign in there (their
    /// name, email, groups and roles are refreshed from it at each sign-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_dn: Option<String>,
}

impl User {
    /// The API scopes the user's roles allow.
    pub fn api_scopes(&self) -> Scopes {
        let all: Vec<&str> = self
            .roles
            .iter()
            .flat_map(|r| r.scopes())
            .copied()
            .collect();
        Scopes::of(&all)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct StoredUser {
    #[serde(flatten)]
    user: User,
    password_hash: String,
}

/// Lockout settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lockout {
    pub max_failures: u32,
    pub lock_secs: u64,
}

pub struct Users {
    store: Arc<dyn Store>,
    lockout: Lockout,
    /// Tenants (by name) whose people sign in against a directory.
    ldap: HashMap<String, LdapConfig>,
    /// Serialises the read-modify-write of failure counters.
    updates: Mutex<()>,
    /// A hash to verify against when the user does not exist, so that the answer takes as long.
    decoy_hash: tokio::sync::OnceCell<String>,
}

impl Users {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        lockout: Lockout,
        ldap: HashMap<String, LdapConfig>,
    ) -> Self {
        Self {
            store,
            lockout,
            ldap,
            updates: Mutex::new(()),
            decoy_hash: tokio::sync::OnceCell::new(),
        }
    }

    pub async fn create(&self, tenant: TenantId, new: NewUser) -> Result<User, IdentityError> {
        validate_name("name", &new.name)?;
        validate_password(&new.password)?;
        if let Some(email) = &new.email {
            if !email.contains('@') || email.len() > 254 {
                return Err(ValidationError::new("email", "expected an email address").into());
            }
        }
        for group in &new.groups {
            validate_name("groups", group)?;
        }
        let name_key = format!("{tenant}/{}", new.name);
        let _guard = self.updates.lock().await;
        if self.store.get_record(USER_NAME, &name_key).await?.is_some() {
            return Err(IdentityError::Conflict(format!(
                "a user named {:?} exists in this tenant",
                new.name
            )));
        }
        let mut roles = new.roles;
        roles.dedup();
        let user = User {
            id: uuid::Uuid::new_v4().to_string(),
            tenant_id: tenant,
            name: new.name,
            email: new.email,
            roles,
            groups: new.groups,
            created_at_ms: now_ms(),
            failed_logins: 0,
            locked_until_ms: None,
            directory_dn: None,
        };
        let stored = StoredUser {
            user: user.clone(),
            password_hash: passwords::hash(&new.password).await?,
        };
        self.put(&stored).await?;
        self.store
            .put_record(USER_NAME, &name_key, user.id.clone().into_bytes().into())
            .await?;
        Ok(user)
    }

    pub async fn list(&self, tenant: TenantId) -> Result<Vec<User>, IdentityError> {
        let stored: Vec<(String, StoredUser)> =
            records::list(&*self.store, USER, &format!("{tenant}/")).await?;
        let mut users: Vec<User> = stored.into_iter().map(|(_, s)| s.user).collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(users)
    }

    /// A user by id or name.
    pub async fn get(&self, tenant: TenantId, reference: &str) -> Result<User, IdentityError> {
        Ok(self.stored(tenant, reference).await?.user)
    }

    pub async fn delete(&self, tenant: TenantId, reference: &str) -> Result<(), IdentityError> {
        let _guard = self.updates.lock().await;
        let user = self.stored(tenant, reference).await?.user;
        self.store
            .delete_record(USER, &format!("{tenant}/{}", user.id))
            .await?;
        self.store
            .delete_record(USER_NAME, &format!("{tenant}/{}", user.name))
            .await?;
        Ok(())
    }

    /// Sets a new password; also lifts a lockout.
    pub async fn set_password(
        &self,
        tenant: TenantId,
        reference: &str,
        password: &str,
    ) -> Result<User, IdentityError> {
        validate_password(password)?;
        let hash = passwords::hash(password).await?;
        self.update(tenant, reference, |s| {
            s.password_hash = hash;
            s.user.failed_logins = 0;
            s.user.locked_until_ms = None;
        })
        .await
    }

    pub async fn unlock(&self, tenant: TenantId, reference: &str) -> Result<User, IdentityError> {
        self.update(tenant, reference, |s| {
            s.user.failed_logins = 0;
            s.user.locked_until_ms = None;
        })
        .await
    }

    /// Checks a sign-in: against the tenant's directory when it has one (people it does not
    /// know fall back to the local users), else locally.
    pub(crate) async fn authenticate(
        &self,
        tenant: &Tenant,
        name: &str,
        password: &str,
    ) -> Result<User, IdentityError> {
        let Some(ldap) = self.ldap.get(&tenant.name) else {
            return self.authenticate_locally(tenant.id, name, password).await;
        };
        if let Ok(shadow) = self.get(tenant.id, name).await {
            if shadow.locked_until_ms.is_some_and(|until| until > now_ms()) {
                tracing::info!(tenant = %tenant.id, user = %shadow.id, "sign-in refused: locked");
                return Err(IdentityError::Unauthenticated);
            }
        }
        match ldap.authenticate(name, password).await {
            Ok(person) => self.record_directory_user(tenant.id, person).await,
            Err(LdapError::UnknownUser) => {
                self.authenticate_locally(tenant.id, name, password).await
            }
            Err(LdapError::WrongPassword) => {
                let _guard = self.updates.lock().await;
                if let Ok(mut shadow) = self.stored(tenant.id, name).await {
                    shadow.user.failed_logins += 1;
                    if shadow.user.failed_logins >= self.lockout.max_failures {
                        shadow.user.locked_until_ms =
                            Some(now_ms() + self.lockout.lock_secs as i64 * 1000);
                    }
                    self.put(&shadow).await?;
                }
                tracing::info!(tenant = %tenant.id, "sign-in refused: the directory refused the password");
                Err(IdentityError::Unauthenticated)
            }
            Err(LdapError::Unavailable(e)) => {
                tracing::error!(tenant = %tenant.id, error = %e, "the LDAP directory failed");
                Err(IdentityError::Unavailable("the tenant's directory".into()))
            }
        }
    }

    /// The local record of a person the directory accepted: created at first sign-in (with an
    /// id derived from the entry's DN), refreshed every time.
    async fn record_directory_user(
        &self,
        tenant: TenantId,
        person: DirectoryUser,
    ) -> Result<User, IdentityError> {
        let _guard = self.updates.lock().await;
        let name_key = format!("{tenant}/{}", person.name);
        let id = directory_user_id(tenant, &person.dn);
        if let Some(existing) = self.store.get_record(USER_NAME, &name_key).await? {
            if existing.as_ref() != id.as_bytes() {
                tracing::warn!(%tenant, name = %person.name, "a local user has the directory user's name; refusing");
                return Err(IdentityError::Unauthenticated);
            }
        }
        let created_at_ms = match self.stored(tenant, &id).await {
            Ok(s) => s.user.created_at_ms,
            Err(_) => now_ms(),
        };
        let user = User {
            id: id.clone(),
            tenant_id: tenant,
            name: person.name,
            email: person.email,
            roles: person.roles,
            groups: person.groups,
            created_at_ms,
            failed_logins: 0,
            locked_until_ms: None,
            directory_dn: Some(person.dn),
        };
        let stored = StoredUser {
            user: user.clone(),
            // Signs in only through the directory.
            password_hash: String::new(),
        };
        self.put(&stored).await?;
        self.store
            .put_record(USER_NAME, &name_key, id.into_bytes().into())
            .await?;
        Ok(user)
    }

    /// Checks a sign-in against the local users. Every failure is the same `Unauthenticated`
    /// to the caller (unknown user, wrong password, locked); the log says which. Each attempt
    /// counts before the password is checked, so parallel guesses cannot exceed the limit.
    async fn authenticate_locally(
        &self,
        tenant: TenantId,
        name: &str,
        password: &str,
    ) -> Result<User, IdentityError> {
        let now = now_ms();
        let stored = {
            let _guard = self.updates.lock().await;
            match self.stored(tenant, name).await {
                Ok(mut stored) => {
                    if stored.user.locked_until_ms.is_some_and(|until| until > now) {
                        tracing::info!(%tenant, user = %stored.user.id, "sign-in refused: locked");
                        return Err(IdentityError::Unauthenticated);
                    }
                    if stored.user.locked_until_ms.is_some() {
                        stored.user.locked_until_ms = None;
                        stored.user.failed_logins = 0;
                    }
                    stored.user.failed_logins += 1;
                    self.put(&stored).await?;
                    Some(stored)
                }
                Err(IdentityError::NotFound(_)) => None,
                Err(e) => return Err(e),
            }
        };
        let Some(mut stored) = stored else {
            // Made at the first unknown name, not at start-up: argon2 is slow on purpose.
            let decoy = self
                .decoy_hash
                .get_or_try_init(|| passwords::hash("decoy password for unknown users"))
                .await?;
            let _ = passwords::verify(password, decoy).await;
            tracing::info!(%tenant, "sign-in refused: unknown user");
            return Err(IdentityError::Unauthenticated);
        };
        // Directory users have no local password.
        let ok = !stored.password_hash.is_empty()
            && passwords::verify(password, &stored.password_hash).await?;
        let _guard = self.updates.lock().await;
        // Re-read: other attempts may have counted meanwhile.
        if let Ok(current) = self.stored(tenant, &stored.user.id).await {
            stored = current;
        }
        if ok {
            stored.user.failed_logins = 0;
            stored.user.locked_until_ms = None;
            self.put(&stored).await?;
            return Ok(stored.user);
        }
        if stored.user.failed_logins >= self.lockout.max_failures {
            stored.user.locked_until_ms = Some(now + self.lockout.lock_secs as i64 * 1000);
            tracing::warn!(%tenant, user = %stored.user.id, "user locked after repeated failed sign-ins");
        }
        self.put(&stored).await?;
        tracing::info!(%tenant, user = %stored.user.id, "sign-in refused: wrong password");
        Err(IdentityError::Unauthenticated)
    }

    async fn update(
        &self,
        tenant: TenantId,
        reference: &str,
        change: impl FnOnce(&mut StoredUser),
    ) -> Result<User, IdentityError> {
        let _guard = self.updates.lock().await;
        let mut stored = self.stored(tenant, reference).await?;
        change(&mut stored);
        self.put(&stored).await?;
        Ok(stored.user)
    }

    async fn stored(&self, tenant: TenantId, reference: &str) -> Result<StoredUser, IdentityError> {
        let by_id = records::get(&*self.store, USER, &format!("{tenant}/{reference}")).await?;
        if let Some(user) = by_id {
            return Ok(user);
        }
        if let Some(id) = self
            .store
            .get_record(USER_NAME, &format!("{tenant}/{reference}"))
            .await?
        {
            let id = String::from_utf8_lossy(&id).into_owned();
            if let Some(user) = records::get(&*self.store, USER, &format!("{tenant}/{id}")).await? {
                return Ok(user);
            }
        }
        Err(IdentityError::NotFound(format!("user {reference:?}")))
    }

    async fn put(&self, stored: &StoredUser) -> Result<(), IdentityError> {
        let key = format!("{}/{}", stored.user.tenant_id, stored.user.id);
        records::put(&*self.store, USER, &key, stored).await
    }
}

/// A stable user id for a directory entry: the same DN is always the same user.
fn directory_user_id(tenant: TenantId, dn: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{tenant}\0{dn}").as_bytes(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

fn validate_password(password: &str) -> Result<(), ValidationError> {
    let chars = password.chars().count();
    if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        return Err(ValidationError::new(
            "password",
            format!("must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tern_store::EmbeddedStore;

    use super::*;

    async fn users(max_failures: u32) -> (tempfile::TempDir, Users) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let lockout = Lockout {
            max_failures,
            lock_secs: 600,
        };
        (dir, Users::new(store, lockout, HashMap::new()))
    }

    fn tenant(id: TenantId) -> Tenant {
        Tenant {
            id,
            name: "acme".into(),
            created_at_ms: 0,
        }
    }

    fn alice() -> NewUser {
        NewUser {
            name: "alice".into(),
            password: "s3cret-passphrase".into(),
            roles: vec![Role::Editor],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn users_sign_in_and_get_their_roles_scopes() {
        let (_dir, users) = users(5).await;
        let t = TenantId::random();
        let created = users.create(t, alice()).await.expect("create");
        assert_eq!(created.api_scopes(), Scopes::of(&[READ, WRITE]));
        let err = users.create(t, alice()).await.unwrap_err();
        assert!(matches!(err, IdentityError::Conflict(_)));
        let signed_in = users
            .authenticate(&tenant(t), "alice", "s3cret-passphrase")
            .await
            .expect("sign in");
        assert_eq!(signed_in.id, created.id);
        assert_eq!(
            users.get(t, &created.id).await.expect("by id").name,
            "alice"
        );
        // Another tenant has no alice.
        assert!(
            users
                .authenticate(&tenant(TenantId::random()), "alice", "s3cret-passphrase")
                .await
                .is_err()
        );
        let err = users
            .create(
                t,
                NewUser {
                    name: "bob".into(),
                    password: "short".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, IdentityError::Invalid(ref v) if v.field == "password"));
    }

    #[tokio::test]
    async fn repeated_failures_lock_the_user_until_unlocked() {
        let (_dir, users) = users(3).await;
        let t = TenantId::random();
        users.create(t, alice()).await.expect("create");
        for _ in 0..3 {
            assert!(
                users
                    .authenticate(&tenant(t), "alice", "wrong password")
                    .await
                    .is_err()
            );
        }
        let locked = users.get(t, "alice").await.expect("get");
        assert!(locked.locked_until_ms.is_some());
        assert!(
            users
                .authenticate(&tenant(t), "alice", "s3cret-passphrase")
                .await
                .is_err(),
            "the right password does not open a locked account"
        );
        users.unlock(t, "alice").await.expect("unlock");
        users
            .authenticate(&tenant(t), "alice", "s3cret-passphrase")
            .await
            .expect("sign in after unlock");
        assert_eq!(users.get(t, "alice").await.expect("get").failed_logins, 0);
    }
}
