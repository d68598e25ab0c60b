//! The admin CLI: each command is one call to a running server's REST API.

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::cli::{
    AdminCommand, AlertCommand, CaCommand, CampaignCommand, ClientCommand, CommandAction,
    DeviceCommand, Global, JobCommand, OtaCommand, Output, PolicyCommand, RuleCommand,
    TenantCommand, TokenCommand, UserCommand,
};
use crate::output;

struct Client {
    http: reqwest::Client,
    server: String,
    /// The bearer token, or why there is none (said when a call needs it).
    token: Result<String, String>,
}

impl Client {
    fn new(global: &Global) -> anyhow::Result<Self> {
        let token = match &global.token {
            Some(token) => Ok(token.clone()),
            None => std::fs::read_to_string(&global.token_file)
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    format!(
                        "no token: pass --token (or TERN_TOKEN), or run where {} exists (--token-file): {e}",
                        global.token_file.display()
                    )
                }),
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            http,
            server: global.server.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call_waiting(method, path, body, None).await
    }

    /// Like [`Client::call`] for a request the server holds for up to `wait_secs`.
    async fn call_waiting(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        wait_secs: Option<u64>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.server);
        let token = self.token.as_deref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut request = self.http.request(method, &url).bearer_auth(token);
        if let Some(wait) = wait_secs {
            request = request.timeout(std::time::Duration::from_secs(wait + 30));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.answer(request).await
    }

    /// Posts a file as the raw request body.
    async fn upload(&self, path: &str, file: &std::path::Path) -> anyhow::Result<Value> {
        let bytes = tokio::fs::read(file)
            .await
            .with_context(|| format!("cannot read {}", file.display()))?;
        let token = self.token.as_deref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let request = self
            .http
            .post(format!("{}{path}", self.server))
            .bearer_auth(token)
            .timeout(std::time::Duration::from_secs(600))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes);
        self.answer(request).await
    }

    /// Posts a form without the bearer token (the OAuth endpoints authenticate otherwise).
    async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.server);
        let request = self
            .http
            .post(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form);
        self.answer(request).await
    }

    async fn answer(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request.send().await.with_context(|| {
            format!(
                "cannot reach the Tern server at {} (is `tern up` running? see --server)",
                self.server
            )
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .context("cannot read the server's response")?;
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_str(&text).with_context(|| {
            format!("the server answered {status} with a body that is not JSON")
        })?;
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .or(value["error_description"].as_str())
                .unwrap_or("request failed");
            bail!("{message} ({status})");
        }
        Ok(value)
    }
}

fn tenant(global: &Global) -> anyhow::Result<&str> {
    global
        .tenant
        .as_deref()
        .context("this command needs a tenant: pass --tenant ID|NAME or set TERN_TENANT")
}

/// An operation's `--params`: a JSON object, `{}` when absent.
fn operation_params(params: Option<String>) -> anyhow::Result<Value> {
    match params {
        Some(text) => {
            serde_json::from_str(&text).with_context(|| format!("--params is not JSON: {text}"))
        }
        None => Ok(json!({})),
    }
}

/// `key=value` labels from the command line.
fn parse_labels(labels: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), Value::String(v.to_string()))),
            _ => bail!("--label expects KEY=VALUE, got {l:?}"),
        })
        .collect()
}

const COMMAND_FIELDS: &[&str] = &[
    "id",
    "name",
    "state",
    "payload",
    "result",
    "created_at_ms",
    "expires_at_ms",
];

const TENANT_FIELDS: &[&str] = &["id", "name", "created_at_ms"];
const TWIN_FIELDS: [&str; 4] = ["desired", "desired_version", "reported", "reported_version"];
const DEVICE_FIELDS: &[&str] = &[
    "id",
    "name",
    "tenant_id",
    "management",
    "owner",
    "groups",
    "labels",
    "hardware_id",
    "gateway_id",
    "disabled",
];

pub async fn run(global: Global, command: AdminCommand) -> anyhow::Result<()> {
    let client = Client::new(&global)?;
    let out = global.output;
    match command {
        AdminCommand::Tenant(cmd) => match cmd {
            TenantCommand::Create { name } => {
                let t = client
                    .call(
                        Method::POST,
                        "/api/v1/tenants",
                        Some(json!({ "name": name })),
                    )
                    .await?;
                output::record(out, &t, TENANT_FIELDS);
            }
            TenantCommand::List => {
                let list = client.call(Method::GET, "/api/v1/tenants", None).await?;
                output::table(out, &list, &["id", "name"]);
            }
            TenantCommand::Show { tenant } => {
                let t = client
                    .call(
                        Method::GET,
                        &format!("/api/v1/tenants/{}", seg(&tenant)),
                        None,
                    )
                    .await?;
                output::record(out, &t, TENANT_FIELDS);
            }
            TenantCommand::Delete { tenant } => {
                client
                    .call(
                        Method::DELETE,
                        &format!("/api/v1/tenants/{}", seg(&tenant)),
                        None,
                    )
                    .await?;
                if out == crate::cli::Output::Human {
                    println!("deleted tenant {tenant}");
                }
            }
            TenantCommand::Retention {
                tenant,
                raw_days,
                minute_days,
                hour_days,
                day_days,
            } => {
                let path = format!("/api/v1/tenants/{}/retention", seg(&tenant));
                let days = [raw_days, minute_days, hour_days, day_days];
                let policy = if days.iter().all(Option::is_none) {
                    client.call(Method::GET, &path, None).await?
                } else {
                    let mut body = serde_json::Map::new();
                    for (key, value) in ["raw_days", "1m_days", "1h_days", "1d_days"]
                        .iter()
                        .zip(days)
                    {
                        if let Some(value) = value {
                            body.insert(key.to_string(), value.into());
                        }
                    }
                    client
                        .call(Method::PUT, &path, Some(Value::Object(body)))
                        .await?
                };
                output::record(out, &policy, &["raw_days", "1m_days", "1h_days", "1d_days"]);
            }
        },
        AdminCommand::Device(cmd) => {
            let base = format!("/api/v1/tenants/{}/devices", seg(tenant(&global)?));
            match cmd {
                DeviceCommand::Create {
                    name,
                    labels,
                    hardware_id,
                    gateway,
                    management,
                } => {
                    let mut body = json!({
                        "name": name,
                        "labels": parse_labels(&labels)?,
                        "hardware_id": hardware_id,
                        "gateway": gateway,
                        "owner": management.owner,
                        "groups": management.groups,
                    });
                    if let Some(level) = management.management {
                        body["management"] = level.into();
                    }
                    let d = client.call(Method::POST, &base, Some(body)).await?;
                    output::record(out, &d, DEVICE_FIELDS);
                }
                DeviceCommand::Set {
                    device,
                    management,
                    no_owner,
                } => {
                    let mut body = serde_json::Map::new();
                    if let Some(level) = management.management {
                        body.insert("management".into(), level.into());
                    }
                    if let Some(owner) = management.owner {
                        body.insert("owner".into(), owner.into());
                    }
                    if no_owner {
                        body.insert("owner".into(), Value::Null);
                    }
                    if !management.groups.is_empty() {
                        body.insert("groups".into(), management.groups.into());
                    }
                    if body.is_empty() {
                        bail!(
                            "nothing to change: give --management, --owner, --no-owner or --group"
                        );
                    }
                    let path = format!("{base}/{}", seg(&device));
                    let d = client
                        .call(Method::PATCH, &path, Some(Value::Object(body)))
                        .await?;
                    output::record(out, &d, DEVICE_FIELDS);
                }
                DeviceCommand::List { selector } => {
                    let path = match selector {
                        Some(selector) => format!("{base}?selector={}", seg(&selector)),
                        None => base.clone(),
                    };
                    let list = client.call(Method::GET, &path, None).await?;
                    output::table(out, &list, &["id", "name", "labels", "hardware_id"]);
                }
                DeviceCommand::Show { device } => {
                    let d = client
                        .call(Method::GET, &format!("{base}/{}", seg(&device)), None)
                        .await?;
                    output::record(out, &d, DEVICE_FIELDS);
                }
                DeviceCommand::Disable { device } => {
                    let d = set_disabled(&client, &base, &device, true).await?;
                    output::record(out, &d, DEVICE_FIELDS);
                }
                DeviceCommand::Enable { device } => {
                    let d = set_disabled(&client, &base, &device, false).await?;
                    output::record(out, &d, DEVICE_FIELDS);
                }
                DeviceCommand::Operate {
                    device,
                    operation,
                    params,
                } => {
                    let path = format!("{base}/{}/operations/{}", seg(&device), seg(&operation));
                    let params = operation_params(params)?;
                    let c = client.call(Method::POST, &path, Some(params)).await?;
                    output::record(out, &c, COMMAND_FIELDS);
                }
                DeviceCommand::Bulk {
                    operation,
                    selector,
                    params,
                    ttl,
                    idempotency_key,
                } => {
                    let body = json!({
                        "selector": selector, "params": operation_params(params)?,
                        "ttl_secs": ttl, "idempotency_key": idempotency_key,
                    });
                    let tenant_base = base.trim_end_matches("/devices");
                    let path = format!("{tenant_base}/operations/{}", seg(&operation));
                    let sent = client.call(Method::POST, &path, Some(body)).await?;
                    if out == Output::Json {
                        output::record(out, &sent, &[]);
                    } else {
                        output::table(out, &sent["commands"], COMMAND_FIELDS);
                        if sent["skipped"].as_array().is_some_and(|s| !s.is_empty()) {
                            println!("skipped:");
                            output::table(out, &sent["skipped"], &["device_name", "reason"]);
                        }
                    }
                }
                DeviceCommand::Locations {
                    device,
                    from,
                    limit,
                } => {
                    let mut path =
                        format!("{base}/{}/locations?order=desc&limit={limit}", seg(&device));
                    if let Some(from) = from {
                        path.push_str(&format!("&from={from}"));
                    }
                    let r = client.call(Method::GET, &path, None).await?;
                    output::table(out, &r["positions"], &["ts", "lat", "lon", "accuracy_m"]);
                }
                DeviceCommand::Twin { device } => {
                    let path = format!("{base}/{}/twin", seg(&device));
                    let twin = client.call(Method::GET, &path, None).await?;
                    output::record(out, &twin, &TWIN_FIELDS);
                }
                DeviceCommand::Desire {
                    device,
                    patch,
                    version,
                } => {
                    let patch: Value = serde_json::from_str(&patch)
                        .context("the desired-state patch must be JSON, e.g. '{\"fan\": 2}'")?;
                    let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
                    let path = format!("{base}/{}/twin/desired{query}", seg(&device));
                    let twin = client.call(Method::PATCH, &path, Some(patch)).await?;
                    output::record(out, &twin, &TWIN_FIELDS);
                }
                DeviceCommand::Status { device } => {
                    let path = format!("{base}/{}/status", seg(&device));
                    let s = client.call(Method::GET, &path, None).await?;
                    output::record(
                        out,
                        &s,
                        &[
                            "device_id",
                            "online",
                            "last_lifecycle",
                            "last_lifecycle_ms",
                            "last_seen_ms",
                        ],
                    );
                }
                DeviceCommand::Delete { device } => {
                    client
                        .call(Method::DELETE, &format!("{base}/{}", seg(&device)), None)
                        .await?;
                    if out == crate::cli::Output::Human {
                        println!("deleted device {device}");
                    }
                }
            }
        }
        AdminCommand::Command(cmd) => {
            let devices = format!("/api/v1/tenants/{}/devices", seg(tenant(&global)?));
            let json_payload = |payload: Option<String>| -> anyhow::Result<Value> {
                match payload {
                    Some(text) => serde_json::from_str(&text)
                        .with_context(|| format!("--payload is not JSON: {text}")),
                    None => Ok(Value::Null),
                }
            };
            match cmd {
                CommandAction::Bulk {
                    name,
                    selector,
                    payload,
                    ttl,
                    idempotency_key,
                } => {
                    let body = json!({
                        "selector": selector, "name": name, "payload": json_payload(payload)?,
                        "ttl_secs": ttl, "idempotency_key": idempotency_key,
                    });
                    let path = format!("/api/v1/tenants/{}/commands", seg(tenant(&global)?));
                    let sent = client.call(Method::POST, &path, Some(body)).await?;
                    output::table(out, &sent["commands"], COMMAND_FIELDS);
                }
                CommandAction::Send {
                    device,
                    name,
                    payload,
                    ttl,
                    idempotency_key,
                    wait,
                } => {
                    let body = json!({
                        "name": name, "payload": json_payload(payload)?, "ttl_secs": ttl,
                        "idempotency_key": idempotency_key, "wait_secs": wait,
                    });
                    let path = format!("{devices}/{}/commands", seg(&device));
                    let c = client
                        .call_waiting(Method::POST, &path, Some(body), wait)
                        .await?;
                    output::record(out, &c, COMMAND_FIELDS);
                    if wait.is_some() && c["state"] != "succeeded" {
                        bail!(
                            "command {} is {}",
                            output::text(&c["id"]),
                            output::text(&c["state"])
                        );
                    }
                }
                CommandAction::List { device, limit } => {
                    let mut path = format!("{devices}/{}/commands", seg(&device));
                    if let Some(limit) = limit {
                        path.push_str(&format!("?limit={limit}"));
                    }
                    let list = client.call(Method::GET, &path, None).await?;
                    output::table(
                        out,
                        &list["commands"],
                        &["id", "name", "state", "created_at_ms"],
                    );
                }
                CommandAction::Show {
                    device,
                    command,
                    wait,
                } => {
                    let mut path = format!("{devices}/{}/commands/{}", seg(&device), seg(&command));
                    if let Some(wait) = wait {
                        path.push_str(&format!("?wait={wait}"));
                    }
                    let c = client.call_waiting(Method::GET, &path, None, wait).await?;
                    output::record(out, &c, &[COMMAND_FIELDS, &["history"]].concat());
                }
                CommandAction::Cancel { device, command } => {
                    let path = format!(
                        "{devices}/{}/commands/{}/cancel",
                        seg(&device),
                        seg(&command)
                    );
                    let c = client.call(Method::POST, &path, None).await?;
                    output::record(out, &c, COMMAND_FIELDS);
                }
            }
        }
        AdminCommand::Ca(cmd) => {
            let base = format!("/api/v1/tenants/{}/cas", seg(tenant(&global)?));
            let fields = ["id", "subject", "not_after_ms"];
            match cmd {
                CaCommand::Add { file } => {
                    let pem = std::fs::read_to_string(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    let body = json!({ "certificate": pem });
                    let ca = client.call(Method::POST, &base, Some(body)).await?;
                    output::record(out, &ca, &fields);
                }
                CaCommand::List => {
                    let list = client.call(Method::GET, &base, None).await?;
                    output::table(out, &list, &fields);
                }
                CaCommand::Delete { id } => {
                    client
                        .call(Method::DELETE, &format!("{base}/{}", seg(&id)), None)
                        .await?;
                }
            }
        }
        AdminCommand::Rule(cmd) => rule(&client, out, tenant(&global)?, cmd).await?,
        AdminCommand::Alert(cmd) => alert(&client, out, tenant(&global)?, cmd).await?,
        AdminCommand::Job(cmd) => job(&client, out, tenant(&global)?, cmd).await?,
        AdminCommand::Client(cmd) => oauth_client(&client, out, tenant(&global)?, cmd).await?,
        AdminCommand::User(cmd) => user(&client, out, tenant(&global)?, cmd).await?,
        AdminCommand::Policy(cmd) => policy(&client, out, tenant(&global)?, cmd).await?,
        AdminCommand::Ota(cmd) => ota(&client, out, tenant(&global)?, cmd).await?,
        AdminCommand::Token(cmd) => {
            let tenant = seg(tenant(&global)?);
            match cmd {
                TokenCommand::Device { device } => {
                    let path = format!("/api/v1/tenants/{tenant}/devices/{}/tokens", seg(&device));
                    let t = client.call(Method::POST, &path, None).await?;
                    output::record(
                        out,
                        &t,
                        &[
                            "device_id",
                            "access_token",
                            "access_token_expires_at_ms",
                            "refresh_token",
                        ],
                    );
                }
                TokenCommand::Revoke { device } => {
                    let path = format!("/api/v1/tenants/{tenant}/devices/{}/tokens", seg(&device));
                    let r = client.call(Method::DELETE, &path, None).await?;
                    output::record(out, &r, &["revoked"]);
                }
                TokenCommand::Api { name } => {
                    let path = format!("/api/v1/tenants/{tenant}/api-tokens");
                    let t = client
                        .call(Method::POST, &path, Some(json!({ "name": name })))
                        .await?;
                    output::record(out, &t, &["id", "name", "tenant_id", "token"]);
                }
                TokenCommand::Approve {
                    user_code,
                    device: Some(device),
                    labels,
                    groups,
                    ..
                } => {
                    let path = format!("/api/v1/tenants/{tenant}/enrolments");
                    let body = json!({
                        "user_code": user_code,
                        "device": device,
                        "labels": parse_labels(&labels)?,
                        "groups": groups,
                    });
                    let r = client.call(Method::POST, &path, Some(body)).await?;
                    output::record(
                        out,
                        &r,
                        &["user_code", "device_id", "device_name", "created", "client"],
                    );
                }
                TokenCommand::Approve {
                    user_code,
                    user: Some(user),
                    deny,
                    password_stdin,
                    ..
                } => {
                    let password = read_password(password_stdin)?;
                    let action = if deny { "deny" } else { "approve" };
                    let form = [
                        ("user_code", user_code.as_str()),
                        ("username", user.as_str()),
                        ("password", password.as_str()),
                        ("action", action),
                    ];
                    let path = format!("/oauth2/{tenant}/device");
                    let r = client.post_form(&path, &form).await?;
                    output::record(out, &r, &["user_code", "approved", "client"]);
                }
                TokenCommand::Approve { .. } => bail!("name --device or --user"),
            }
        }
    }
    Ok(())
}

const ARTIFACT_FIELDS: &[&str] = &["id", "name", "version", "size", "sha256", "created_at_ms"];
const CAMPAIGN_FIELDS: &[&str] = &[
    "id",
    "version",
    "selector",
    "state",
    "reason",
    "current_wave",
    "waves",
    "counts",
];

async fn ota(client: &Client, out: Output, tenant: &str, cmd: OtaCommand) -> anyhow::Result<()> {
    let base = format!("/api/v1/tenants/{}", seg(tenant));
    let campaigns = format!("{base}/campaigns");
    match cmd {
        OtaCommand::Upload {
            file,
            name,
            version,
        } => {
            let path = format!(
                "{base}/artifacts?name={}&version={}",
                seg(&name),
                seg(&version)
            );
            let a = client.upload(&path, &file).await?;
            output::record(out, &a, &[ARTIFACT_FIELDS, &["signature"]].concat());
        }
        OtaCommand::Artifacts => {
            let list = client
                .call(Method::GET, &format!("{base}/artifacts"), None)
                .await?;
            output::table(out, &list["artifacts"], ARTIFACT_FIELDS);
        }
        OtaCommand::Key => {
            let key = client
                .call(Method::GET, &format!("{base}/ota/signing-key"), None)
                .await?;
            output::record(out, &key, &["public_key", "algorithm"]);
        }
        OtaCommand::Campaign(CampaignCommand::Create {
            artifact,
            selector,
            canary,
            wave_size,
            max_concurrent,
            failure_threshold,
            on_failure,
            device_timeout,
            window,
        }) => {
            let window = match window {
                None => Value::Null,
                Some(w) => {
                    let (start, end) = w
                        .split_once('-')
                        .context("--window: HH:MM-HH:MM expected")?;
                    json!({"start": start, "end": end})
                }
            };
            let body = json!({
                "artifact_id": artifact, "selector": selector, "canary_percent": canary,
                "wave_size": wave_size, "max_concurrent": max_concurrent,
                "failure_threshold_percent": failure_threshold, "on_failure": on_failure,
                "device_timeout_secs": device_timeout, "maintenance_window": window,
            });
            let c = client.call(Method::POST, &campaigns, Some(body)).await?;
            output::record(out, &c, CAMPAIGN_FIELDS);
        }
        OtaCommand::Campaign(CampaignCommand::List) => {
            let list = client.call(Method::GET, &campaigns, None).await?;
            output::table(out, &list["campaigns"], CAMPAIGN_FIELDS);
        }
        OtaCommand::Campaign(CampaignCommand::Show { campaign }) => {
            let c = client
                .call(
                    Method::GET,
                    &format!("{campaigns}/{}", seg(&campaign)),
                    None,
                )
                .await?;
            output::record(out, &c, &[CAMPAIGN_FIELDS, &["devices"]].concat());
        }
        OtaCommand::Campaign(CampaignCommand::Pause { campaign }) => {
            control_campaign(client, out, &campaigns, &campaign, "pause").await?;
        }
        OtaCommand::Campaign(CampaignCommand::Resume { campaign }) => {
            control_campaign(client, out, &campaigns, &campaign, "resume").await?;
        }
        OtaCommand::Campaign(CampaignCommand::Abort { campaign }) => {
            control_campaign(client, out, &campaigns, &campaign, "abort").await?;
        }
    }
    Ok(())
}

async fn control_campaign(
    client: &Client,
    out: Output,
    campaigns: &str,
    campaign: &str,
    verb: &str,
) -> anyhow::Result<()> {
    let path = format!("{campaigns}/{}/{verb}", seg(campaign));
    let c = client.call(Method::POST, &path, None).await?;
    output::record(out, &c, CAMPAIGN_FIELDS);
    Ok(())
}

const RULE_FIELDS: &[&str] = &["id", "name", "enabled", "sql", "actions", "version"];

async fn rule(client: &Client, out: Output, tenant: &str, cmd: RuleCommand) -> anyhow::Result<()> {
    let base = format!("/api/v1/tenants/{}/rules", seg(tenant));
    let one = |rule: &str| format!("{base}/{}", seg(rule));
    match cmd {
        RuleCommand::Create {
            name,
            sql,
            actions,
            lateness,
            disabled,
        } => {
            let body = json!({
                "name": name, "sql": sql, "actions": actions,
                "allowed_lateness_secs": lateness, "enabled": !disabled,
            });
            let r = client.call(Method::POST, &base, Some(body)).await?;
            output::record(out, &r, &[RULE_FIELDS, &["webhook_secret"]].concat());
        }
        RuleCommand::List => {
            let list = client.call(Method::GET, &base, None).await?;
            output::table(out, &list, RULE_FIELDS);
        }
        RuleCommand::Show { rule } => {
            let r = client.call(Method::GET, &one(&rule), None).await?;
            output::record(out, &r, &[RULE_FIELDS, &["allowed_lateness_secs"]].concat());
        }
        RuleCommand::Update {
            rule,
            sql,
            actions,
            lateness,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(sql) = sql {
                body.insert("sql".into(), sql.into());
            }
            if !actions.is_empty() {
                body.insert("actions".into(), actions.into());
            }
            if let Some(lateness) = lateness {
                body.insert("allowed_lateness_secs".into(), lateness.into());
            }
            let r = client
                .call(Method::PATCH, &one(&rule), Some(Value::Object(body)))
                .await?;
            output::record(out, &r, &[RULE_FIELDS, &["webhook_secret"]].concat());
        }
        RuleCommand::Test { sql, from, to } => {
            let body = json!({ "sql": sql, "from": from, "to": to });
            let result = client
                .call(
                    Method::POST,
                    &format!("/api/v1/tenants/{}/rule-tests", seg(tenant)),
                    Some(body),
                )
                .await?;
            output::record(out, &result, &["messages", "rows"]);
        }
        RuleCommand::Enable { rule } => {
            let r = client
                .call(Method::PATCH, &one(&rule), Some(json!({ "enabled": true })))
                .await?;
            output::record(out, &r, RULE_FIELDS);
        }
        RuleCommand::Disable { rule } => {
            let r = client
                .call(
                    Method::PATCH,
                    &one(&rule),
                    Some(json!({ "enabled": false })),
                )
                .await?;
            output::record(out, &r, RULE_FIELDS);
        }
        RuleCommand::Delete { rule } => {
            client.call(Method::DELETE, &one(&rule), None).await?;
        }
        RuleCommand::DeadLetters { rule } => {
            let list = client
                .call(Method::GET, &format!("{}/dead-letters", one(&rule)), None)
                .await?;
            output::table(out, &list, &["at_ms", "action", "trigger", "error"]);
        }
    }
    Ok(())
}

const JOB_FIELDS: &[&str] = &[
    "id",
    "kind",
    "state",
    "series_done",
    "series_total",
    "points_read",
    "covered_to_ms",
    "messages_read",
    "rows_emitted",
    "error",
];

async fn job(client: &Client, out: Output, tenant: &str, cmd: JobCommand) -> anyhow::Result<()> {
    let base = format!("/api/v1/tenants/{}/jobs", seg(tenant));
    match cmd {
        JobCommand::RebuildRollups { from, to, wait } => {
            let body = json!({ "from": from, "to": to });
            let job = client
                .call(Method::POST, &format!("{base}/rebuild-rollups"), Some(body))
                .await?;
            finish_job(client, out, &base, job, wait).await?;
        }
        JobCommand::RerunRule {
            rule,
            from,
            to,
            wait,
        } => {
            let body = json!({ "rule": rule, "from": from, "to": to });
            let job = client
                .call(Method::POST, &format!("{base}/rerun-rule"), Some(body))
                .await?;
            finish_job(client, out, &base, job, wait).await?;
        }
        JobCommand::Show { id } => {
            let job = client
                .call(Method::GET, &format!("{base}/{}", seg(&id)), None)
                .await?;
            output::record(out, &job, JOB_FIELDS);
        }
        JobCommand::List => {
            let list = client.call(Method::GET, &base, None).await?;
            output::table(out, &list, JOB_FIELDS);
        }
    }
    Ok(())
}

/// Prints a started job; with `wait`, once it ended (failing unless it succeeded).
async fn finish_job(
    client: &Client,
    out: Output,
    base: &str,
    mut job: Value,
    wait: bool,
) -> anyhow::Result<()> {
    while wait && job["state"] == "running" {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let path = format!("{base}/{}", seg(job["id"].as_str().unwrap_or_default()));
        job = client.call(Method::GET, &path, None).await?;
    }
    output::record(out, &job, JOB_FIELDS);
    if wait && job["state"] != "succeeded" {
        bail!("the job did not succeed");
    }
    Ok(())
}

const ALERT_FIELDS: &[&str] = &[
    "id",
    "rule_name",
    "subject",
    "severity",
    "state",
    "count",
    "last_raised_at_ms",
];

async fn alert(
    client: &Client,
    out: Output,
    tenant: &str,
    cmd: AlertCommand,
) -> anyhow::Result<()> {
    let base = format!("/api/v1/tenants/{}/alerts", seg(tenant));
    match cmd {
        AlertCommand::List {
            state,
            rule,
            device,
        } => {
            let mut query = Vec::new();
            for (key, value) in [("state", state), ("rule", rule), ("device", device)] {
                if let Some(value) = value {
                    query.push(format!("{key}={}", seg(&value)));
                }
            }
            let path = if query.is_empty() {
                base
            } else {
                format!("{base}?{}", query.join("&"))
            };
            let list = client.call(Method::GET, &path, None).await?;
            output::table(out, &list, ALERT_FIELDS);
        }
        AlertCommand::Ack { id } => {
            let a = client
                .call(Method::POST, &format!("{base}/{}/ack", seg(&id)), None)
                .await?;
            output::record(out, &a, ALERT_FIELDS);
        }
        AlertCommand::Clear { id } => {
            let a = client
                .call(Method::POST, &format!("{base}/{}/clear", seg(&id)), None)
                .await?;
            output::record(out, &a, ALERT_FIELDS);
        }
    }
    Ok(())
}

/// Percent-encodes one path segment (device names may contain spaces or slashes).
async fn set_disabled(
    client: &Client,
    devices: &str,
    device: &str,
    disabled: bool,
) -> anyhow::Result<Value> {
    let path = format!("{devices}/{}", seg(device));
    client
        .call(Method::PATCH, &path, Some(json!({ "disabled": disabled })))
        .await
}

fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A password from the first line of stdin (`--password-stdin`) or `TERN_PASSWORD`; never a
/// flag, which other users could read in the process list.
fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    std::env::var("TERN_PASSWORD")
        .context("no password: pass --password-stdin, or set TERN_PASSWORD")
}

const CLIENT_FIELDS: &[&str] = &[
    "client_id",
    "name",
    "confidential",
    "grant_types",
    "redirect_uris",
    "scopes",
    "client_secret",
];

async fn oauth_client(
    client: &Client,
    out: Output,
    tenant: &str,
    cmd: ClientCommand,
) -> anyhow::Result<()> {
    let base = format!("/api/v1/tenants/{}/oauth-clients", seg(tenant));
    match cmd {
        ClientCommand::Create {
            name,
            grants,
            public,
            redirect_uris,
            scope,
        } => {
            let grant_types: Vec<String> = grants
                .into_iter()
                .map(|g| match g.as_str() {
                    "device_code" => "urn:ietf:params:oauth:grant-type:device_code".to_string(),
                    _ => g,
                })
                .collect();
            let body = json!({
                "name": name,
                "confidential": !public,
                "grant_types": grant_types,
                "redirect_uris": redirect_uris,
                "scope": scope,
            });
            let c = client.call(Method::POST, &base, Some(body)).await?;
            output::record(out, &c, CLIENT_FIELDS);
        }
        ClientCommand::List => {
            let list = client.call(Method::GET, &base, None).await?;
            output::table(out, &list, &["client_id", "name", "confidential", "scopes"]);
        }
        ClientCommand::Show { client_id } => {
            let path = format!("{base}/{}", seg(&client_id));
            let c = client.call(Method::GET, &path, None).await?;
            output::record(out, &c, &CLIENT_FIELDS[..6]);
        }
        ClientCommand::Delete { client_id } => {
            let path = format!("{base}/{}", seg(&client_id));
            client.call(Method::DELETE, &path, None).await?;
        }
    }
    Ok(())
}

const USER_FIELDS: &[&str] = &[
    "id",
    "name",
    "email",
    "roles",
    "groups",
    "failed_logins",
    "locked_until_ms",
];

async fn user(client: &Client, out: Output, tenant: &str, cmd: UserCommand) -> anyhow::Result<()> {
    let base = format!("/api/v1/tenants/{}/users", seg(tenant));
    let one = |user: &str| format!("{base}/{}", seg(user));
    match cmd {
        UserCommand::Create {
            name,
            roles,
            groups,
            email,
            password_stdin,
        } => {
            let password = read_password(password_stdin)?;
            let body = json!({
                "name": name,
                "password": password,
                "roles": roles,
                "groups": groups,
                "email": email,
            });
            let u = client.call(Method::POST, &base, Some(body)).await?;
            output::record(out, &u, USER_FIELDS);
        }
        UserCommand::List => {
            let list = client.call(Method::GET, &base, None).await?;
            output::table(
                out,
                &list,
                &["id", "name", "roles", "groups", "locked_until_ms"],
            );
        }
        UserCommand::Show { user } => {
            let u = client.call(Method::GET, &one(&user), None).await?;
            output::record(out, &u, USER_FIELDS);
        }
        UserCommand::Delete { user } => {
            client.call(Method::DELETE, &one(&user), None).await?;
        }
        UserCommand::SetPassword {
            user,
            password_stdin,
        } => {
            let password = read_password(password_stdin)?;
            let path = format!("{}/password", one(&user));
            let u = client
                .call(Method::PUT, &path, Some(json!({ "password": password })))
                .await?;
            output::record(out, &u, USER_FIELDS);
        }
        UserCommand::Unlock { user } => {
            let u = client
                .call(Method::POST, &format!("{}/unlock", one(&user)), None)
                .await?;
            output::record(out, &u, USER_FIELDS);
        }
    }
    Ok(())
}

/// A file's text, or stdin's for `-`.
fn read_input(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

const VERSION_FIELDS: &[&str] = &["version", "change", "author", "created_at_ms", "time_zone"];

async fn policy(
    client: &Client,
    out: Output,
    tenant: &str,
    cmd: PolicyCommand,
) -> anyhow::Result<()> {
    let base = format!("/api/v1/tenants/{}", seg(tenant));
    let one = |id: &str| format!("{base}/policies/{}", seg(id));
    match cmd {
        PolicyCommand::List => {
            let current = client
                .call(Method::GET, &format!("{base}/policies"), None)
                .await?;
            if out == Output::Json {
                output::record(out, &current, &[]);
            } else {
                println!("version {}", output::text(&current["version"]));
                output::table(out, &current["policies"], &["id"]);
            }
        }
        PolicyCommand::Show { id } => {
            let p = client.call(Method::GET, &one(&id), None).await?;
            match out {
                Output::Json => output::record(out, &p, &[]),
                Output::Human => print!("{}", output::text(&p["text"])),
            }
        }
        PolicyCommand::Put { id, file } => {
            let text = read_input(&file)?;
            let v = client
                .call(Method::PUT, &one(&id), Some(json!({ "text": text })))
                .await?;
            output::record(out, &v, VERSION_FIELDS);
        }
        PolicyCommand::Delete { id } => {
            let v = client.call(Method::DELETE, &one(&id), None).await?;
            output::record(out, &v, VERSION_FIELDS);
        }
        PolicyCommand::Versions => {
            let list = client
                .call(Method::GET, &format!("{base}/policy-versions"), None)
                .await?;
            output::table(out, &list, VERSION_FIELDS);
        }
        PolicyCommand::Rollback { version } => {
            let body = json!({ "version": version });
            let v = client
                .call(Method::POST, &format!("{base}/policy-rollback"), Some(body))
                .await?;
            output::record(out, &v, VERSION_FIELDS);
        }
        PolicyCommand::TimeZone { zone } => {
            let body = json!({ "time_zone": zone });
            let v = client
                .call(Method::PUT, &format!("{base}/policy-time-zone"), Some(body))
                .await?;
            output::record(out, &v, VERSION_FIELDS);
        }
        PolicyCommand::Validate { id, file } => {
            let body = json!({ "put": [{ "id": id, "text": read_input(&file)? }] });
            let r = client
                .call(
                    Method::POST,
                    &format!("{base}/policy-validation"),
                    Some(body),
                )
                .await?;
            output::record(out, &r, &["valid", "policies"]);
        }
        PolicyCommand::WhatIf { request, with } => {
            let request: Value = serde_json::from_str(&read_input(&request)?)
                .context("the request file is not JSON")?;
            let put = match with.as_deref() {
                Some([id, file]) => {
                    let text = read_input(std::path::Path::new(file))?;
                    json!([{ "id": id, "text": text }])
                }
                _ => json!([]),
            };
            let body = json!({ "request": request, "put": put });
            let d = client
                .call(Method::POST, &format!("{base}/policy-what-if"), Some(body))
                .await?;
            output::record(out, &d, &["outcome", "policies", "errors"]);
        }
        PolicyCommand::Audit { mode, rate } => {
            let path = format!("{base}/policy-audit");
            let config = match mode {
                None => client.call(Method::GET, &path, None).await?,
                Some(mode) => {
                    let mut body = json!({ "mode": mode });
                    if let Some(rate) = rate {
                        body["sample_rate"] = json!(rate);
                    }
                    client.call(Method::PUT, &path, Some(body)).await?
                }
            };
            output::record(out, &config, &["mode", "sample_rate"]);
        }
        PolicyCommand::Decisions { limit } => {
            let path = format!("{base}/policy-decisions?limit={limit}");
            let list = client.call(Method::GET, &path, None).await?;
            if out == Output::Json {
                output::table(out, &list, &[]);
            } else {
                for r in list.as_array().into_iter().flatten() {
                    println!(
                        "{}  {}  {}  {}  {}",
                        output::text(&r["at_ms"]),
                        output::text(&r["decision"]["outcome"]),
                        output::text(&r["request"]["action"]),
                        output::text(&r["request"]["principal"]["id"]),
                        output::text(&r["decision"]["policies"]),
                    );
                }
            }
        }
    }
    Ok(())
}
