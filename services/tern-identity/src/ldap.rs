//! The optional LDAP backend of the user directory: a tenant configured with a directory signs
//! its people in against it (search with a service account, then bind as the person), and
//! their groups there give their roles here.

use std::path::PathBuf;
use std::time::Duration;

use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry, ldap_escape};
use serde::{Deserialize, Serialize};
use tern_core::ValidationError;

use crate::users::Role;

/// A tenant's directory (`[identity.ldap.{tenant name}]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldaps://host:636`, or `ldap://` with `starttls`; plain `ldap://` only on loopback.
    pub url: String,
    #[serde(default)]
    pub starttls: bool,
    /// The service account that searches for people.
    pub bind_dn: String,
    /// Its password, read from this file (keep it out of the config).
    #[serde(default)]
    pub bind_password_file: Option<PathBuf>,
    /// Or given here (e.g. from `TERN_IDENTITY__LDAP__{TENANT}__BIND_PASSWORD`).
    #[serde(default)]
    pub bind_password: Option<String>,
    pub user_base_dn: String,
    /// `{username}` is replaced by the escaped sign-in name.
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    #[serde(default)]
    pub group_base_dn: Option<String>,
    /// `{dn}` is replaced by the escaped DN of the person.
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    #[serde(default = "default_group_name")]
    pub group_name_attribute: String,
    /// Members of these groups get the role.
    #[serde(default)]
    pub admin_groups: Vec<String>,
    #[serde(default)]
    pub editor_groups: Vec<String>,
    #[serde(default)]
    pub viewer_groups: Vec<String>,
}

fn default_user_filter() -> String {
    "(&(objectClass=inetOrgPerson)(uid={username}))".into()
}

fn default_group_filter() -> String {
    "(&(objectClass=groupOfNames)(member={dn}))".into()
}

fn default_group_name() -> String {
    "cn".into()
}

/// A person the directory knows and whose password it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirectoryUser {
    pub dn: String,
    pub name: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub roles: Vec<Role>,
}

/// Why a directory sign-in did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LdapError {
    /// The directory has no such person: the local directory may.
    #[error("no such user in the directory")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
    #[error("the directory failed: {0}")]
    Unavailable(String),
}

const TIMEOUT: Duration = Duration::from_secs(5);

impl LdapConfig {
    /// Checked at start-up; `key` is the config key to name (`identity.ldap.acme`).
    pub fn validate(&self, key: &str) -> Result<(), ValidationError> {
        let loopback = ["ldap://127.", "ldap://localhost", "ldap://[::1]"]
            .iter()
            .any(|p| self.url.starts_with(p));
        let tls =
            self.url.starts_with("ldaps://") || (self.url.starts_with("ldap://") && self.starttls);
        if !tls && !loopback {
            return Err(ValidationError::new(
                format!("{key}.url"),
                "use ldaps://, or ldap:// with starttls = true: passwords must not cross the network in clear",
            ));
        }
        if self.bind_password.is_none() && self.bind_password_file.is_none() {
            return Err(ValidationError::new(
                format!("{key}.bind_password_file"),
                "the service account needs a password (bind_password_file or bind_password)",
            ));
        }
        if !self.user_filter.contains("{username}") {
            return Err(ValidationError::new(
                format!("{key}.user_filter"),
                "must contain {username}",
            ));
        }
        Ok(())
    }

    fn bind_password(&self) -> Result<String, LdapError> {
        match (&self.bind_password, &self.bind_password_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|p| p.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| {
                    LdapError::Unavailable(format!("cannot read {}: {e}", path.display()))
                }),
            (None, None) => Err(LdapError::Unavailable("no service account password".into())),
        }
    }

    async fn connect(&self) -> Result<ldap3::Ldap, LdapError> {
        let settings = LdapConnSettings::new()
            .set_conn_timeout(TIMEOUT)
            .set_starttls(self.starttls);
        let (conn, ldap) = LdapConnAsync::with_settings(settings, &self.url)
            .await
            .map_err(|e| LdapError::Unavailable(e.to_string()))?;
        ldap3::drive!(conn);
        Ok(ldap)
    }

    /// Finds the person with the service account, then binds as them with `password`.
    pub(crate) async fn authenticate(
        &self,
        username: &str,
        password: &str,
    ) -> Result<DirectoryUser, LdapError> {
        // An empty password would be an unauthenticated bind, which servers accept (RFC 4513 5.1.2).
        if password.is_empty() {
            return Err(LdapError::WrongPassword);
        }
        let unavailable = |e: ldap3::LdapError| LdapError::Unavailable(e.to_string());
        let mut service = self.connect().await?;
        service.with_timeout(TIMEOUT);
        service
            .simple_bind(&self.bind_dn, &self.bind_password()?)
            .await
            .and_then(|r| r.success())
            .map_err(|e| LdapError::Unavailable(format!("service account bind: {e}")))?;
        let filter = self
            .user_filter
            .replace("{username}", &ldap_escape(username));
        let (entries, _) = service
            .search(
                &self.user_base_dn,
                Scope::Subtree,
                &filter,
                vec!["uid", "cn", "mail"],
            )
            .await
            .and_then(|r| r.success())
            .map_err(unavailable)?;
        let entry = match entries.len() {
            0 => return Err(LdapError::UnknownUser),
            1 => SearchEntry::construct(entries.into_iter().next().ok_or(LdapError::UnknownUser)?),
            _ => {
                return Err(LdapError::Unavailable(format!(
                    "{filter} matches more than one entry"
                )));
            }
        };

        let mut person = self.connect().await?;
        person.with_timeout(TIMEOUT);
        let bound = person
            .simple_bind(&entry.dn, password)
            .await
            .map_err(unavailable)?;
        let _ = person.unbind().await;
        match bound.rc {
            0 => {}
            49 => return Err(LdapError::WrongPassword), // invalidCredentials
            rc => {
                return Err(LdapError::Unavailable(format!(
                    "bind answered {rc}: {}",
                    bound.text
                )));
            }
        }

        let groups = match &self.group_base_dn {
            None => Vec::new(),
            Some(base) => {
                let filter = self.group_filter.replace("{dn}", &ldap_escape(&entry.dn));
                let attr = self.group_name_attribute.as_str();
                let (entries, _) = service
                    .search(base, Scope::Subtree, &filter, vec![attr])
                    .await
                    .and_then(|r| r.success())
                    .map_err(unavailable)?;
                let mut groups: Vec<String> = entries
                    .into_iter()
                    .filter_map(|e| SearchEntry::construct(e).attrs.get(attr)?.first().cloned())
                    .collect();
                groups.sort();
                groups
            }
        };
        let _ = service.unbind().await;
        let mut roles = Vec::new();
        for (role, members) in [
            (Role::Admin, &self.admin_groups),
            (Role::Editor, &self.editor_groups),
            (Role::Viewer, &self.viewer_groups),
        ] {
            if groups.iter().any(|g| members.contains(g)) {
                roles.push(role);
            }
        }
        let first = |a: &str| entry.attrs.get(a).and_then(|v| v.first()).cloned();
        Ok(DirectoryUser {
            name: first("uid").unwrap_or_else(|| username.to_string()),
            email: first("mail"),
            dn: entry.dn,
            groups,
            roles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, starttls: bool) -> LdapConfig {
        LdapConfig {
            url: url.into(),
            starttls,
            bind_dn: "cn=tern".into(),
            bind_password_file: None,
            bind_password: Some("x".into()),
            user_base_dn: "ou=people".into(),
            user_filter: default_user_filter(),
            group_base_dn: None,
            group_filter: default_group_filter(),
            group_name_attribute: default_group_name(),
            admin_groups: vec![],
            editor_groups: vec![],
            viewer_groups: vec![],
        }
    }

    #[test]
    fn passwords_never_cross_the_network_in_clear() {
        config("ldaps://ldap.example.com", false)
            .validate("identity.ldap.acme")
            .expect("ldaps");
        config("ldap://ldap.example.com", true)
            .validate("identity.ldap.acme")
            .expect("starttls");
        config("ldap://127.0.0.1:3899", false)
            .validate("identity.ldap.acme")
            .expect("loopback");
        let err = config("ldap://ldap.example.com", false)
            .validate("identity.ldap.acme")
            .unwrap_err();
        assert_eq!(err.field, "identity.ldap.acme.url");
    }
}
