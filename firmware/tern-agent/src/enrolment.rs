//! Enrolment by the OAuth 2.0 device authorization grant (RFC 8628) with the scope
//! `tern:device`: the agent asks the tenant's authorization server for a code, shows it, and
//! polls the token endpoint until a person has bound the code to a registry device; the
//! answer is that device's own credentials.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::{Client, Url};
use serde::Deserialize;

use crate::credentials::Credentials;

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";
const SCOPE: &str = "tern:device";
/// What `slow_down` adds to the interval (RFC 8628 3.5).
const SLOW_DOWN: Duration = Duration::from_secs(5);

/// The device authorization response (RFC 8628 3.2): what to show the person.
#[derive(Debug, Clone, Deserialize)]
pub struct UserCode {
    pub user_code: String,
    pub expires_in: u64,
    #[serde(default = "default_interval")]
    pub interval: u64,
    device_code: String,
}

fn default_interval() -> u64 {
    5
}

/// The token response of an enrolment: RFC 6749 5.1 plus the device it enrolled.
#[derive(Deserialize)]
struct EnrolledTokens {
    access_token: String,
    expires_in: i64,
    refresh_token: String,
    device_id: String,
    tenant_id: String,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

pub struct DeviceFlow<'a> {
    http: &'a Client,
    issuer: Url,
    client_id: &'a str,
}

impl<'a> DeviceFlow<'a> {
    pub fn new(
        http: &'a Client,
        server: &Url,
        tenant: &str,
        client_id: &'a str,
    ) -> anyhow::Result<Self> {
        let issuer = server
            .join(&format!("oauth2/{tenant}/"))
            .with_context(|| format!("enrolment.tenant: {tenant:?} makes no URL"))?;
        Ok(Self {
            http,
            issuer,
            client_id,
        })
    }

    /// Asks for a device code and the user code to show.
    pub async fn start(&self) -> anyhow::Result<UserCode> {
        let url = self.endpoint("device_authorization");
        let form = [("client_id", self.client_id), ("scope", SCOPE)];
        let response = self.http.post(url).form(&form).send().await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!(
                "the platform refused ({status}): {}",
                describe(response).await
            );
        }
        Ok(response.json().await?)
    }

    /// Polls until the code is approved (credentials), denied or expired (an error).
    pub async fn wait(&self, code: &UserCode) -> anyhow::Result<Credentials> {
        let url = self.endpoint("token");
        let mut interval = Duration::from_secs(code.interval.max(1));
        loop {
            tokio::time::sleep(interval).await;
            let form = [
                ("grant_type", GRANT_TYPE),
                ("device_code", code.device_code.as_str()),
                ("client_id", self.client_id),
            ];
            let response = match self.http.post(url.clone()).form(&form).send().await {
                Ok(r) => r,
                Err(e) => {
                    // The network may come and go while a person walks to a computer.
                    tracing::warn!(error = %e, "cannot reach the platform; polling on");
                    continue;
                }
            };
            if response.status().is_success() {
                let tokens: EnrolledTokens = response
                    .json()
                    .await
                    .context("the token response is not an enrolment's (scope tern:device)")?;
                let now = crate::now_ms();
                return Ok(Credentials {
                    tenant_id: tokens.tenant_id,
                    device_id: tokens.device_id,
                    access_token: tokens.access_token,
                    access_token_expires_at_ms: now + tokens.expires_in * 1000,
                    refresh_token: tokens.refresh_token,
                    obtained_at_ms: now,
                });
            }
            let status = response.status();
            let error: OAuthError = response
                .json()
                .await
                .with_context(|| format!("the platform answered {status} without an error"))?;
            match error.error.as_str() {
                "authorization_pending" => {}
                "slow_down" => interval += SLOW_DOWN,
                "access_denied" => bail!("the enrolment was denied"),
                "expired_token" => bail!("the code expired before anyone approved it; start again"),
                other => bail!(
                    "the platform refused ({other}): {}",
                    error.error_description.unwrap_or_default()
                ),
            }
        }
    }

    fn endpoint(&self, name: &str) -> Url {
        self.issuer.join(name).expect("a relative endpoint name")
    }
}

async fn describe(response: reqwest::Response) -> String {
    match response.json::<OAuthError>().await {
        Ok(e) => format!("{}: {}", e.error, e.error_description.unwrap_or_default()),
        Err(_) => "no reason given".into(),
    }
}
