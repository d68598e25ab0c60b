//! The Cedar schema every tenant's policies are validated against, Tern's actions, and the
//! default policies a new tenant starts with.

/// Entity types, the request context and the actions. Device labels are entity tags:
/// `resource.hasTag("site") && resource.getTag("site") == "berlin"`; a device as a resource
/// also has its `owner` (when it has one), `management` level and `groups`.
pub const SCHEMA: &str = r#"
entity Group in [Group];
entity User in [Group] { name: String, roles: Set<String> };
entity Client { name: String };
entity ApiToken;
entity Device { name: String, owner?: String, management?: String, groups?: Set<String> } tags String;
entity Tenant { name: String };
entity Topic { name: String };

type ApiContext = {
  hour: Long,
  weekday: Long,
  now: Long,
  scopes: Set<String>,
  source_ip?: ipaddr,
};

type MqttContext = {
  hour: Long,
  weekday: Long,
  now: Long,
  source_ip?: ipaddr,
  protocol: String,
};

action read, write, admin, mqtt;

action getTenant, listDevices, readRules, readAlerts, readJobs, readRetention, queryPdp, readOta
  in [read] appliesTo { principal: [User, Client, ApiToken], resource: [Tenant], context: ApiContext };
action createDevice, sendBulkCommand, writeRules, testRule, writeAlerts, writeJobs, writeRetention,
  writeOta, operateDevices
  in [write] appliesTo { principal: [User, Client, ApiToken], resource: [Tenant], context: ApiContext };
action readCredentials, manageCredentials, readPolicies, managePolicies, enrolDevice
  in [admin] appliesTo { principal: [User, Client, ApiToken], resource: [Tenant], context: ApiContext };

action getDevice, readTelemetry, readCommands
  in [read] appliesTo { principal: [User, Client, ApiToken], resource: [Device], context: ApiContext };
action updateDevice, deleteDevice, updateTwin, sendCommand, cancelCommand, operateDevice
  in [write] appliesTo { principal: [User, Client, ApiToken], resource: [Device], context: ApiContext };
action manageDeviceTokens
  in [admin] appliesTo { principal: [User, Client, ApiToken], resource: [Device], context: ApiContext };

action publish, subscribe
  in [mqtt] appliesTo { principal: [Device], resource: [Topic], context: MqttContext };
"#;

/// Every action a request may name, with the group it belongs to.
pub const ACTIONS: &[(&str, &str)] = &[
    ("getTenant", "read"),
    ("listDevices", "read"),
    ("readRules", "read"),
    ("readAlerts", "read"),
    ("readJobs", "read"),
    ("readRetention", "read"),
    ("queryPdp", "read"),
    ("readOta", "read"),
    ("createDevice", "write"),
    ("sendBulkCommand", "write"),
    ("writeRules", "write"),
    ("testRule", "write"),
    ("writeAlerts", "write"),
    ("writeJobs", "write"),
    ("writeRetention", "write"),
    ("writeOta", "write"),
    ("operateDevices", "write"),
    ("readCredentials", "admin"),
    ("manageCredentials", "admin"),
    ("readPolicies", "admin"),
    ("managePolicies", "admin"),
    ("getDevice", "read"),
    ("readTelemetry", "read"),
    ("readCommands", "read"),
    ("updateDevice", "write"),
    ("deleteDevice", "write"),
    ("updateTwin", "write"),
    ("sendCommand", "write"),
    ("cancelCommand", "write"),
    ("operateDevice", "write"),
    ("manageDeviceTokens", "admin"),
    ("enrolDevice", "admin"),
    ("publish", "mqtt"),
    ("subscribe", "mqtt"),
];

/// Whether an action acts on a device (else on the tenant, or a topic for MQTT).
pub fn on_device(action: &str) -> bool {
    matches!(
        action,
        "getDevice"
            | "readTelemetry"
            | "readCommands"
            | "updateDevice"
            | "deleteDevice"
            | "updateTwin"
            | "sendCommand"
            | "cancelCommand"
            | "operateDevice"
            | "manageDeviceTokens"
    )
}

/// What a new tenant allows: every API principal what its token's scopes allow (the gateway
/// checks scopes before asking), and every device to publish and subscribe (the bridge keeps a
/// device to its own telemetry, events and commands). Tenants edit or replace them.
pub const DEFAULT_POLICIES: &[(&str, &str)] = &[
    (
        "api-access-by-scope",
        "// API tokens, users and services may do what their token's scopes allow.\n\
         permit (principal, action in Action::\"read\", resource)\n\
         when { context.scopes.contains(\"tern:read\") };\n",
    ),
    (
        "api-write-by-scope",
        "permit (principal, action in Action::\"write\", resource)\n\
         when { context.scopes.contains(\"tern:write\") };\n",
    ),
    (
        "api-admin-by-scope",
        "permit (principal, action in Action::\"admin\", resource)\n\
         when { context.scopes.contains(\"tern:admin\") };\n",
    ),
    (
        "devices-publish-and-subscribe",
        "// Devices publish their data and subscribe within their tenant.\n\
         permit (principal is Device, action in Action::\"mqtt\", resource);\n",
    ),
];
