//! Bulk provisioning of simulated devices through Tern's REST API.

use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

pub struct Device {
    pub id: String,
    pub token: String,
}

pub struct Api {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl Api {
    pub fn new(server: &str, token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().build()?,
            server: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.server))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {}", self.server))?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Creates the tenant if needed and devices `{prefix}-{i}`, issuing a token for each.
    pub async fn provision(
        self: Arc<Self>,
        tenant: &str,
        prefix: &str,
        count: usize,
    ) -> anyhow::Result<Vec<Device>> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/tenants",
                Some(json!({ "name": tenant })),
            )
            .await?;
        if status != 201 && status != 409 {
            bail!("cannot create tenant {tenant}: {status} {body}");
        }
        let parallel = Arc::new(Semaphore::new(16));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let api = self.clone();
            let permit = parallel.clone().acquire_owned().await?;
            let (tenant, name) = (tenant.to_string(), format!("{prefix}-{i}"));
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                api.device(&tenant, &name).await
            }));
        }
        let mut devices = Vec::with_capacity(count);
        for task in tasks {
            devices.push(task.await??);
        }
        Ok(devices)
    }

    async fn device(&self, tenant: &str, name: &str) -> anyhow::Result<Device> {
        let base = format!("/api/v1/tenants/{tenant}/devices");
        let (status, body) = self
            .call(reqwest::Method::POST, &base, Some(json!({ "name": name })))
            .await?;
        if status != 201 && status != 409 {
            bail!("cannot create device {name}: {status} {body}");
        }
        let (status, tokens) = self
            .call(
                reqwest::Method::POST,
                &format!("{base}/{name}/tokens"),
                None,
            )
            .await?;
        if status != 201 {
            bail!("cannot issue tokens for {name}: {status} {tokens}");
        }
        Ok(Device {
            id: tokens["device_id"]
                .as_str()
                .context("device_id")?
                .to_string(),
            token: tokens["access_token"]
                .as_str()
                .context("access_token")?
                .to_string(),
        })
    }
}
