//! Scopes: what an OAuth access token may do.
//!
//! The API scopes `tern:read` (GET), `tern:write` (every other method) and `tern:admin`
//! (credentials: API tokens, OAuth clients, users, CAs) are checked by the gateway for every
//! request; fine-grained decisions belong to policies. `openid`, `profile` and `email` are the
//! OpenID Connect scopes; they grant no API access.
//!
//! `tern:device` is enrolment: a device asks for it with the device authorization grant, and
//! once a person binds the user code to a registry device, the token response carries that
//! device's own credentials. An enrolment client may have no other scope or grant.

use std::collections::BTreeSet;

use tern_core::ValidationError;

pub const READ: &str = "tern:read";
pub const WRITE: &str = "tern:write";
pub const ADMIN: &str = "tern:admin";
pub const OPENID: &str = "openid";
pub const PROFILE: &str = "profile";
pub const EMAIL: &str = "email";
pub const DEVICE: &str = "tern:device";

/// Every scope a client may be allowed or a token granted.
pub const KNOWN: [&str; 7] = [READ, WRITE, ADMIN, OPENID, PROFILE, EMAIL, DEVICE];

/// What an API request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiAccess {
    Read,
    Write,
    Admin,
}

impl ApiAccess {
    pub fn scope(self) -> &'static str {
        match self {
            Self::Read => READ,
            Self::Write => WRITE,
            Self::Admin => ADMIN,
        }
    }
}

/// A set of scopes, as in a token's space-separated `scope` claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<String>);

impl Scopes {
    /// Parses a space-separated scope string, refusing scopes this server does not know.
    pub fn parse(field: &str, text: &str) -> Result<Self, ValidationError> {
        let mut set = BTreeSet::new();
        for scope in text.split(' ').filter(|s| !s.is_empty()) {
            if !KNOWN.contains(&scope) {
                return Err(ValidationError::new(
                    field,
                    format!("unknown scope {scope:?}; known: {}", KNOWN.join(" ")),
                ));
            }
            set.insert(scope.to_string());
        }
        Ok(Self(set))
    }

    pub fn of(scopes: &[&str]) -> Self {
        Self(scopes.iter().map(|s| s.to_string()).collect())
    }

    /// Every API scope: what an API token or the operator may do.
    pub fn all_api() -> Self {
        Self::of(&[READ, WRITE, ADMIN])
    }

    pub fn contains(&self, scope: &str) -> bool {
        self.0.contains(scope)
    }

    pub fn intersection(&self, other: &Scopes) -> Scopes {
        Self(self.0.intersection(&other.0).cloned().collect())
    }

    pub fn union(&self, other: &Scopes) -> Scopes {
        Self(self.0.union(&other.0).cloned().collect())
    }

    pub fn is_subset(&self, other: &Scopes) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn allows(&self, access: ApiAccess) -> bool {
        self.contains(access.scope())
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

impl std::fmt::Display for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<&str> = self.0.iter().map(String::as_str).collect();
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_intersect_and_refuse_unknown_ones() {
        let s = Scopes::parse("scope", "tern:read  openid tern:write").expect("parse");
        assert_eq!(s.to_string(), "openid tern:read tern:write");
        assert!(s.allows(ApiAccess::Read) && !s.allows(ApiAccess::Admin));
        let err = Scopes::parse("scope", "tern:read root").unwrap_err();
        assert_eq!(err.field, "scope");
        assert!(err.reason.contains("\"root\""), "{err}");
        let granted = s.intersection(&Scopes::of(&[READ, ADMIN]));
        assert_eq!(granted, Scopes::of(&[READ]));
        assert!(granted.is_subset(&s));
    }
}
