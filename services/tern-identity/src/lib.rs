//! Identity: who a device or an API caller is.
//!
//! - Devices get a short-lived access token (a JWT signed with Ed25519, verified locally by the
//!   bridge) and a long-lived, revocable refresh token that is exchanged (and rotated) for new
//!   access tokens.
//! - Or a device presents a client certificate issued by a CA its tenant registered
//!   (`certificates.rs`).
//! - API callers use opaque API tokens bound to one tenant; the operator token that `tern up`
//!   creates on first start may manage every tenant.
//!
//! Opaque tokens are random 256-bit secrets; only their SHA-256 is stored, which is safe for
//! secrets of that entropy (argon2 is for low-entropy passwords, which arrive with the user
//! directory). Lookups go by that hash, so no stored secret is ever compared byte by byte.

mod certificates;
mod clients;
mod decisions;
mod device_tokens;
mod error;
mod grpc;
pub mod http;
mod identity;
mod keys;
mod ldap;
mod notices;
pub mod oauth;
mod passwords;
pub mod policy;
mod records;
pub mod scopes;
mod secrets;
mod users;

pub use certificates::TenantCa;
pub use clients::{Clients, GrantType, NewClient, OAuthClient, PORTAL_CLIENT_ID};
pub use device_tokens::{DevicePrincipal, DeviceTokens};
pub use error::{DeviceAuthError, IdentityError};
pub use grpc::{IdentityGrpc, grpc_auth};
pub use identity::{ApiToken, Identity, IdentityConfig};
pub use ldap::LdapConfig;
pub use notices::NOTICES_TOPIC;
pub use oauth::{ApiPrincipal, PrincipalKind};
pub use users::{NewUser, Role, User, Users};
