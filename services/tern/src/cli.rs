//! Command-line interface. Conventions every command keeps: `--server URL` (env `TERN_SERVER`),
//! `--tenant ID|NAME` (env `TERN_TENANT`), human-readable output by default and
//! `--output json` for scripts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Tern IoT platform: run it (`tern up`) and manage it"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// URL of a running Tern server's HTTP API.
    #[arg(
        long,
        global = true,
        env = "TERN_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Tenant to act on, by id or name.
    #[arg(long, global = true, env = "TERN_TENANT")]
    pub tenant: Option<String>,
    /// API or operator token. Without one, the operator token file is used.
    #[arg(long, global = true, env = "TERN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token, used when --token is not given (`tern up` writes the operator
    /// token to data/admin.token on first start).
    #[arg(
        long,
        global = true,
        env = "TERN_TOKEN_FILE",
        default_value = "data/admin.token"
    )]
    pub token_file: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run every service in one process on embedded storage.
    Up(UpArgs),
    /// Run the device endpoints alone (MQTT, MQTT over TLS and WebSocket, CoAP); with the
    /// other services as separate processes on the shared store, Kafka and NATS.
    Bridge(UpArgs),
    /// Run the registry alone: the `tern.v1.Registry` gRPC service, OTA campaigns and
    /// command expiry.
    Registry(UpArgs),
    /// Run identity alone: the `tern.v1.Identity` gRPC service, OAuth 2.0 / OpenID Connect
    /// and signing-key rotation.
    Identity(UpArgs),
    /// Run analytics alone: ingest into the store, rules, webhooks and retention.
    Analytics(UpArgs),
    /// Run the REST API alone (`/api/v1`).
    Gateway(UpArgs),
    /// Serve the web dashboard's pages alone.
    Dashboard(UpArgs),
    /// Serve the store to other processes over gRPC (`tern.v1.Store`): the shared store of
    /// the distributed mode. Other processes name it in `store.url`.
    Store(StoreArgs),
    #[command(flatten)]
    Admin(AdminCommand),
}

/// Commands that call a running server.
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Manage tenants (needs the operator token).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage devices of a tenant.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Issue credentials.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Send commands to devices and follow them.
    #[command(subcommand)]
    Command(CommandAction),
    /// The tenant's CA certificates: devices with client certificates they issued connect
    /// over MQTT/TLS without a token (mTLS).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Rules: SQL over the tenant's telemetry that raises alerts or sends commands.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Alerts raised by rules.
    #[command(subcommand)]
    Alert(AlertCommand),
    /// Background jobs of a tenant, with progress.
    #[command(subcommand)]
    Job(JobCommand),
    /// OAuth clients of the tenant: services (client credentials), the portal and other apps
    /// (authorization code with PKCE), headless devices (device authorization grant).
    #[command(subcommand)]
    Client(ClientCommand),
    /// People of the tenant who sign in: roles, groups, passwords, lockout.
    #[command(subcommand)]
    User(UserCommand),
    /// The tenant's access policies (Cedar): versions, rollback, validation, what-if, audit.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Over-the-air updates: artifacts, the signing key, and campaigns that roll them out.
    #[command(subcommand)]
    Ota(OtaCommand),
}

#[derive(clap::Args)]
pub struct DeviceManagement {
    /// non_managed, semi_managed or fully_managed (docs/devices.md).
    #[arg(long)]
    pub management: Option<String>,
    /// The user (by name) the device belongs to.
    #[arg(long)]
    pub owner: Option<String>,
    /// A group the device is in; repeat for more (with `set`, replaces all groups).
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
}

#[derive(Subcommand)]
pub enum OtaCommand {
    /// Upload an artifact; it is hashed (SHA-256) and signed with the tenant's key.
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
    },
    /// The tenant's artifacts.
    Artifacts,
    /// The tenant's update-signing public key, for tern-agent's `update.public_key`.
    Key,
    /// OTA campaigns.
    #[command(subcommand)]
    Campaign(CampaignCommand),
}

#[derive(Subcommand)]
pub enum CampaignCommand {
    /// Roll an artifact out to the devices a label selector picks: a canary wave, then waves,
    /// stopping on its own when too many fail.
    Create {
        #[arg(long)]
        artifact: String,
        /// Label selector, e.g. 'site=plant-3,tier!=test'.
        #[arg(long)]
        selector: String,
        /// Percentage of the devices updated first, on their own.
        #[arg(long, default_value_t = 10)]
        canary: u8,
        /// Devices per wave after the canary (0: all the rest together).
        #[arg(long, default_value_t = 0)]
        wave_size: u32,
        /// Most devices updating at once.
        #[arg(long, default_value_t = 50)]
        max_concurrent: u32,
        /// Failure rate (percent of finished devices) that stops the campaign.
        #[arg(long, default_value_t = 20)]
        failure_threshold: u8,
        /// What crossing the threshold does: abort or pause.
        #[arg(long, default_value = "abort")]
        on_failure: String,
        /// Seconds a device has to finish its update.
        #[arg(long, default_value_t = 3600)]
        device_timeout: u64,
        /// Start updates only between these UTC times, e.g. 22:00-04:00.
        #[arg(long, value_name = "HH:MM-HH:MM")]
        window: Option<String>,
    },
    List,
    /// A campaign with every device's progress.
    Show {
        campaign: String,
    },
    /// Devices updating finish; no new ones start.
    Pause {
        campaign: String,
    },
    Resume {
        campaign: String,
    },
    /// Cancel updates in progress and skip the rest.
    Abort {
        campaign: String,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// The current policies and their version.
    List,
    /// One policy's Cedar source.
    Show { id: String },
    /// Create or replace a policy from a Cedar file ("-" for stdin); validated before saving.
    Put { id: String, file: PathBuf },
    /// Delete a policy.
    Delete { id: String },
    /// Every version of the policy set, newest first.
    Versions,
    /// Make an earlier version current again (as a new version).
    Rollback { version: u64 },
    /// The time zone of the policies' context.hour and context.weekday, e.g. Europe/Berlin
    /// (an IANA name; UTC by default). Saved as a new version.
    TimeZone { zone: String },
    /// Check a policy file against the schema and the other policies, without saving.
    Validate { id: String, file: PathBuf },
    /// Decide a request (JSON file, "-" for stdin) as the current policies would, or with
    /// a policy file put in their place first.
    WhatIf {
        request: PathBuf,
        /// Policy id and Cedar file to try in place of the current one.
        #[arg(long, num_args = 2, value_names = ["ID", "FILE"])]
        with: Option<Vec<String>>,
    },
    /// Show the audit setting, or set it: off, sampled (with --rate) or full.
    Audit {
        mode: Option<String>,
        #[arg(long)]
        rate: Option<f64>,
    },
    /// The most recent audited decisions.
    Decisions {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Register a client. A confidential client's secret is shown once.
    Create {
        #[arg(long)]
        name: String,
        /// client_credentials, authorization_code, refresh_token or device_code; repeatable.
        #[arg(long = "grant", required = true)]
        grants: Vec<String>,
        /// A client that cannot keep a secret (portal, CLI, device): no secret, PKCE instead.
        #[arg(long)]
        public: bool,
        /// Where the authorization code may be sent: https://, or http:// on loopback; repeatable.
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// The most its tokens may hold, space-separated [default: tern:read].
        #[arg(long)]
        scope: Option<String>,
    },
    /// The tenant's clients.
    List,
    /// One client.
    Show { client_id: String },
    /// Delete a client; its tokens stop being refreshed.
    Delete { client_id: String },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user. The password is read from stdin (--password-stdin) or TERN_PASSWORD.
    Create {
        name: String,
        /// admin, editor or viewer; repeatable.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// A group the user belongs to; repeatable.
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long)]
        email: Option<String>,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// The tenant's users.
    List,
    /// One user (by id or name).
    Show { user: String },
    /// Delete a user.
    Delete { user: String },
    /// Set a user's password (from stdin or TERN_PASSWORD); also lifts a lockout.
    SetPassword {
        user: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Lift the lockout that repeated failed sign-ins caused.
    Unlock { user: String },
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// Recompute the tenant's rollups from raw points (whole UTC days around the range).
    RebuildRollups {
        /// Start, ms since the epoch (default: the beginning).
        #[arg(long)]
        from: Option<i64>,
        /// End, ms since the epoch (default: now).
        #[arg(long)]
        to: Option<i64>,
        /// Wait until the job ends; exit 1 if it failed.
        #[arg(long)]
        wait: bool,
    },
    /// Re-run a rule over stored telemetry and carry out what it emits (backfill): alerts,
    /// commands, webhooks, republishes, under the live engine's idempotency keys, so no
    /// command it already sent is sent again.
    RerunRule {
        /// The rule (id or name).
        rule: String,
        /// Start, ms since the epoch.
        #[arg(long)]
        from: i64,
        /// End, ms since the epoch (default: now).
        #[arg(long)]
        to: Option<i64>,
        /// Wait until the job ends; exit 1 if it failed.
        #[arg(long)]
        wait: bool,
    },
    /// One job and its progress.
    Show { id: String },
    /// The tenant's jobs, newest first.
    List,
}

#[derive(Subcommand)]
pub enum RuleCommand {
    /// Save a rule; it runs at once unless --disabled.
    Create {
        #[arg(long)]
        name: String,
        /// e.g. "SELECT device, temp FROM telemetry WHERE temp > 50" (see docs/rules.md).
        #[arg(long)]
        sql: String,
        /// alert[:info|warning|critical], command:NAME or command:NAME@SELECTOR; repeatable.
        #[arg(long = "action", required = true)]
        actions: Vec<String>,
        /// Seconds a window waits for late messages after its end.
        #[arg(long)]
        lateness: Option<u64>,
        #[arg(long)]
        disabled: bool,
    },
    /// The tenant's rules.
    List,
    /// One rule (by name or id).
    Show {
        rule: String,
    },
    /// Change a rule's SQL or actions (the rule's windows start afresh).
    Update {
        rule: String,
        #[arg(long)]
        sql: Option<String>,
        /// Replaces all actions; repeatable.
        #[arg(long = "action")]
        actions: Vec<String>,
        #[arg(long)]
        lateness: Option<u64>,
    },
    /// Run a rule's SQL over stored telemetry and show the rows it would have emitted,
    /// without acting on them.
    Test {
        #[arg(long)]
        sql: String,
        /// Start of the range, ms since the epoch (default: an hour ago).
        #[arg(long)]
        from: Option<i64>,
        /// End of the range, ms since the epoch (default: now).
        #[arg(long)]
        to: Option<i64>,
    },
    Enable {
        rule: String,
    },
    Disable {
        rule: String,
    },
    Delete {
        rule: String,
    },
    /// Actions the rule could not carry out, with the error.
    DeadLetters {
        rule: String,
    },
}

#[derive(Subcommand)]
pub enum AlertCommand {
    /// The tenant's alerts, most recently raised first.
    List {
        /// active, acknowledged or cleared.
        #[arg(long)]
        state: Option<String>,
        /// Only this rule's (name or id).
        #[arg(long)]
        rule: Option<String>,
        /// Only this device's (name or id).
        #[arg(long)]
        device: Option<String>,
    },
    /// Acknowledge an alert: someone is on it.
    Ack { id: String },
    /// Clear an alert; the rule's next firing opens a new one.
    Clear { id: String },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Register a CA certificate (PEM file).
    Add { file: PathBuf },
    /// List the tenant's CA certificates.
    List,
    /// Delete a CA certificate (by id, its SHA-256 fingerprint).
    Delete { id: String },
}

#[derive(Subcommand)]
pub enum CommandAction {
    /// Send a command to every device a label selector selects (each gets its own command).
    Bulk {
        /// Command name, e.g. `reboot`.
        name: String,
        /// Label selector: `site=berlin,env!=prod,camera,tier in (a,b)`.
        #[arg(long, short = 'l')]
        selector: String,
        /// JSON payload sent to each device.
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
        /// Seconds before an unanswered command expires [default: commands.default_ttl_secs].
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
        /// Retrying with the same key sends nothing twice.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Send a command to a device (by id or name). With --wait, wait for the device's answer
    /// and exit non-zero unless it succeeded.
    Send {
        device: String,
        /// Command name, e.g. `reboot`; the device receives it on command/req/{id}/{name}.
        name: String,
        /// JSON payload sent to the device.
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
        /// Seconds before an unanswered command expires [default: commands.default_ttl_secs].
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
        /// Sending again with the same key returns the first command.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait up to this many seconds for the answer.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// List a device's commands, newest first.
    List {
        device: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one command, its state and history.
    Show {
        device: String,
        command: String,
        /// Wait up to this many seconds for it to end.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Cancel a command that has not ended.
    Cancel { device: String, command: String },
}

#[derive(Args)]
pub struct StoreArgs {
    /// Where the store keeps its data.
    #[arg(long, default_value = "data/store")]
    pub data_dir: PathBuf,
    /// Address and port to serve on.
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub listen: std::net::SocketAddr,
    /// File holding the token every caller must present (16 characters or more); clients
    /// name the same file in `store.token_file`.
    #[arg(long)]
    pub token_file: PathBuf,
    /// Serve over TLS with this certificate (PEM, the chain); with `--tls-key`.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// OTLP/gRPC collector (`http://host:4317`) for the spans of traced writes, which
    /// continue the callers' traces; unset: off.
    #[arg(long, env = "TERN_TRACING__OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Args, Default)]
pub struct UpArgs {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, env = "TERN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the event log, the store and the operator token live [default: ./data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// MQTT port [default: 1883].
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// MQTT over TLS port, when `mqtt.tls` has a certificate [default: 8883].
    #[arg(long)]
    pub mqtts_port: Option<u16>,
    /// MQTT over WebSocket over TLS port, when `mqtt.tls` has a certificate [default: 8084].
    #[arg(long)]
    pub wss_port: Option<u16>,
    /// CoAP port (UDP) [default: 5683].
    #[arg(long)]
    pub coap_port: Option<u16>,
    /// HTTP port: REST API, health and metrics [default: 8080].
    #[arg(long)]
    pub http_port: Option<u16>,
    /// gRPC port [default: 50051].
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// Address to listen on [default: 0.0.0.0].
    #[arg(long)]
    pub bind: Option<std::net::IpAddr>,
    /// Admit MQTT clients without credentials into this tenant (created if missing); for
    /// development and protocol test suites only [default: off].
    #[arg(long, value_name = "NAME")]
    pub anonymous_tenant: Option<String>,
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant; names are lowercase slugs such as `acme`.
    Create { name: String },
    /// List tenants.
    List,
    /// Show one tenant.
    Show { tenant: String },
    /// Delete a tenant that has no devices.
    Delete { tenant: String },
    /// Show how long the tenant keeps telemetry, or set it with any of the flags (a
    /// resolution without a flag is kept forever).
    Retention {
        tenant: String,
        /// Days of raw points.
        #[arg(long)]
        raw_days: Option<u32>,
        /// Days of per-minute rollups.
        #[arg(long = "1m-days")]
        minute_days: Option<u32>,
        /// Days of per-hour rollups.
        #[arg(long = "1h-days")]
        hour_days: Option<u32>,
        /// Days of per-day rollups.
        #[arg(long = "1d-days")]
        day_days: Option<u32>,
    },
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Register a device.
    Create {
        name: String,
        /// A label `key=value`; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Manufacturer identity (serial number, MAC, IMEI), unique within the tenant.
        #[arg(long)]
        hardware_id: Option<String>,
        /// The gateway device (id or name) that may publish for this one
        /// (`telemetry/{device}`, `event/{device}`).
        #[arg(long)]
        gateway: Option<String>,
        #[command(flatten)]
        management: DeviceManagement,
    },
    /// Change a device's management level, owner or groups.
    Set {
        device: String,
        #[command(flatten)]
        management: DeviceManagement,
        /// Remove the owner.
        #[arg(long, conflicts_with = "owner")]
        no_owner: bool,
    },
    /// List the tenant's devices.
    List {
        /// Only those whose labels this selects: `site=berlin,env!=prod,camera,tier in (a,b)`.
        #[arg(long, short = 'l')]
        selector: Option<String>,
    },
    /// Show one device (by id or name).
    Show { device: String },
    /// Delete a device and revoke its credentials.
    Delete { device: String },
    /// Disable a device: its connections close at once and it can neither connect nor get
    /// tokens until enabled again.
    Disable { device: String },
    /// Enable a disabled device.
    Enable { device: String },
    /// Whether the device is connected, since when and how, and when it was last heard from.
    Status { device: String },
    /// Where the device has been: positions it reported (`lat`, `lon`, `accuracy_m`),
    /// newest first.
    Locations {
        device: String,
        /// Milliseconds since the epoch [default: 24 hours ago].
        #[arg(long)]
        from: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send a typed management operation (reboot, locate, lock, unlock, wipe, feature,
    /// configure, rotate_credentials, update, decommission; see docs/devices.md).
    Operate {
        device: String,
        operation: String,
        /// The operation's parameters as a JSON object, e.g. '{"feature": "camera", "enabled": false}'.
        #[arg(long, value_name = "JSON")]
        params: Option<String>,
    },
    /// Send a typed operation to every device a selector selects. Each is checked as if sent
    /// alone (policies, management level, agent capabilities); those that fail are skipped
    /// and listed with the reason.
    Bulk {
        operation: String,
        /// Device selector (required): `site=berlin,@group=pilot`.
        #[arg(long, short = 'l')]
        selector: String,
        /// The operation's parameters as a JSON object.
        #[arg(long, value_name = "JSON")]
        params: Option<String>,
        /// Seconds before an unanswered operation expires.
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
        /// Retrying with the same key sends nothing twice.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// The device's twin: desired and reported state, versions, field times.
    Twin { device: String },
    /// Change the device's desired state with a JSON merge patch (null deletes a field); the
    /// device gets the whole new document on twin/desired.
    Desire {
        device: String,
        #[arg(value_name = "JSON")]
        patch: String,
        /// Apply only if the desired state is still at this version.
        #[arg(long)]
        version: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Issue an access token (the MQTT password) and a refresh token to a device.
    Device { device: String },
    /// Revoke every token of a device (refresh and access) and close its connections.
    Revoke { device: String },
    /// Create an API token for the tenant.
    Api {
        /// What the token is for.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// Approve (or deny) the code a device shows (OAuth device authorization grant).
    ///
    /// With --device, the code is an enrolment (`tern-agent enroll`): the device receives the
    /// credentials of the named registry device, which is created if absent. This uses your
    /// CLI credentials. With --user, the device acts for that user, who signs in with the
    /// password read from stdin or TERN_PASSWORD.
    Approve {
        /// The code the device shows, e.g. BCDF-GHJK.
        user_code: String,
        /// Enrol: the registry device (id or name) the credentials are for.
        #[arg(long, required_unless_present = "user", conflicts_with_all = ["user", "deny"])]
        device: Option<String>,
        /// A label `key=value` of a device created by --device; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE", requires = "device")]
        labels: Vec<String>,
        /// A group of a device created by --device; repeat for more.
        #[arg(long = "group", value_name = "GROUP", requires = "device")]
        groups: Vec<String>,
        /// The user who approves: the device acts for them.
        #[arg(long)]
        user: Option<String>,
        /// Deny instead of approve.
        #[arg(long, requires = "user")]
        deny: bool,
        #[arg(long, requires = "user")]
        password_stdin: bool,
    },
}
