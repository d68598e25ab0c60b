//! The REST API's policy enforcement point: which PDP action each route is, on what.
//!
//! Every route under `/api/v1/tenants/{tenant}` has an action of the policy schema; a route
//! missing here is refused to everyone but the operator (fail closed), so a new route cannot
//! slip past the policies.

use axum::http::Method;
use tern_identity::policy::ACTIONS;
use tern_identity::scopes::ApiAccess;

/// A route as the PDP sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Operation {
    pub action: &'static str,
    /// The resource is the device in the path (else the tenant).
    pub on_device: bool,
    pub access: ApiAccess,
}

const TENANT: &str = "/api/v1/tenants/{tenant}";
const DEVICE: &str = "/api/v1/tenants/{tenant}/devices/{device}";

/// The operation of a request, by method and matched route template.
pub(crate) fn operation(method: &Method, template: &str) -> Option<Operation> {
    let m = method.as_str();
    let (on_device, rest) = if let Some(rest) = template.strip_prefix(DEVICE) {
        (true, rest)
    } else {
        (false, template.strip_prefix(TENANT)?)
    };
    let action = if on_device {
        match (m, rest) {
            ("GET", "" | "/status" | "/twin") => "getDevice",
            ("PATCH", "") => "updateDevice",
            ("DELETE", "") => "deleteDevice",
            ("POST" | "DELETE", "/tokens") => "manageDeviceTokens",
            ("GET", "/telemetry" | "/telemetry/latest" | "/events" | "/locations") => {
                "readTelemetry"
            }
            ("PATCH", "/twin/desired") => "updateTwin",
            ("POST", "/commands") => "sendCommand",
            ("GET", "/commands" | "/commands/{command}") => "readCommands",
            ("POST", "/commands/{command}/cancel") => "cancelCommand",
            ("POST", "/operations/{operation}") => "operateDevice",
            _ => return None,
        }
    } else {
        match (m, rest) {
            ("GET", "") => "getTenant",
            ("GET", "/devices") => "listDevices",
            ("POST", "/devices") => "createDevice",
            ("POST", "/enrolments") => "enrolDevice",
            ("POST", "/commands") => "sendBulkCommand",
            ("POST", "/operations/{operation}") => "operateDevices",
            ("GET", "/rules" | "/rules/{rule}" | "/rules/{rule}/dead-letters") => "readRules",
            // A re-run acts as the rule does: whoever may write rules may run one.
            ("POST", "/rules" | "/jobs/rerun-rule") | ("PATCH" | "DELETE", "/rules/{rule}") => {
                "writeRules"
            }
            ("POST", "/rule-tests") => "testRule",
            ("GET", "/alerts" | "/alerts/{alert}") => "readAlerts",
            ("POST", "/alerts/{alert}/ack" | "/alerts/{alert}/clear") => "writeAlerts",
            ("GET", "/jobs" | "/jobs/{job}") => "readJobs",
            ("POST", "/jobs/rebuild-rollups") => "writeJobs",
            ("GET", "/retention") => "readRetention",
            (
                "GET",
                "/artifacts"
                | "/artifacts/{artifact}"
                | "/ota/signing-key"
                | "/campaigns"
                | "/campaigns/{campaign}",
            ) => "readOta",
            ("POST", "/artifacts" | "/campaigns" | "/campaigns/{campaign}/{action}") => "writeOta",
            ("PUT", "/retention") => "writeRetention",
            (
                "GET",
                "/cas" | "/oauth-clients" | "/oauth-clients/{client}" | "/users" | "/users/{user}",
            ) => "readCredentials",
            (
                "POST",
                "/api-tokens" | "/cas" | "/oauth-clients" | "/users" | "/users/{user}/unlock",
            )
            | ("DELETE", "/cas/{ca}" | "/oauth-clients/{client}" | "/users/{user}")
            | ("PUT", "/users/{user}/password") => "manageCredentials",
            (
                "GET",
                "/policies"
                | "/policies/{policy}"
                | "/policy-versions"
                | "/policy-versions/{version}",
            )
            | ("GET", "/policy-decisions" | "/policy-audit") => "readPolicies",
            ("PUT" | "DELETE", "/policies/{policy}")
            | ("POST", "/policy-rollback" | "/policy-validation" | "/policy-what-if")
            | ("PUT", "/policy-audit" | "/policy-time-zone") => "managePolicies",
            ("POST", "/pdp/authorize") => "queryPdp",
            _ => return None,
        }
    };
    let group = ACTIONS
        .iter()
        .find(|(a, _)| *a == action)
        .map(|(_, g)| *g)
        .unwrap_or("admin");
    let access = match group {
        "read" => ApiAccess::Read,
        "write" => ApiAccess::Write,
        _ => ApiAccess::Admin,
    };
    Some(Operation {
        action,
        on_device,
        access,
    })
}

/// What a device API route is, as the MQTT topic it stands for: `Some(Some((action, topic)))`
/// is a publish or subscribe the policies decide as they do for MQTT; `Some(None)` needs no
/// topic decision (an artifact download, checked against the device's tenant); `None` is a
/// route missing here, refused (fail closed).
pub(crate) fn device_topic(
    method: &Method,
    template: &str,
) -> Option<Option<(&'static str, &'static str)>> {
    let rest = template.strip_prefix("/device/v1")?;
    Some(Some(match (method.as_str(), rest) {
        ("POST", "/telemetry") => ("publish", "telemetry"),
        ("POST", "/event") => ("publish", "event"),
        ("GET", "/commands") => ("subscribe", "command/req/#"),
        ("POST", "/commands/{command}/response") => ("publish", "command/res"),
        ("GET", "/twin") => ("subscribe", "twin/desired"),
        ("PATCH", "/twin/reported") => ("publish", "twin/reported"),
        ("GET", "/artifacts/{artifact}") => return Some(None),
        _ => return None,
    }))
}

/// The scope a request outside the tenant routes needs (`/api/v1/tenants`, `/pdp/authorize`).
pub(crate) fn access_by_method(method: &Method, template: &str) -> ApiAccess {
    if method == Method::GET || method == Method::HEAD || template == "/pdp/authorize" {
        ApiAccess::Read
    } else {
        ApiAccess::Write
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_actions_of_the_schema_with_the_scope_of_their_group() {
        let t = TENANT;
        let d = DEVICE;
        let cases = [
            (
                Method::GET,
                format!("{t}/devices"),
                "listDevices",
                ApiAccess::Read,
            ),
            (
                Method::POST,
                format!("{t}/devices"),
                "createDevice",
                ApiAccess::Write,
            ),
            (
                Method::GET,
                format!("{t}/users"),
                "readCredentials",
                ApiAccess::Admin,
            ),
            (
                Method::POST,
                format!("{t}/oauth-clients"),
                "manageCredentials",
                ApiAccess::Admin,
            ),
            (
                Method::POST,
                format!("{t}/api-tokens"),
                "manageCredentials",
                ApiAccess::Admin,
            ),
            (
                Method::POST,
                format!("{d}/tokens"),
                "manageDeviceTokens",
                ApiAccess::Admin,
            ),
            (
                Method::GET,
                format!("{d}/telemetry"),
                "readTelemetry",
                ApiAccess::Read,
            ),
            (
                Method::POST,
                format!("{d}/commands"),
                "sendCommand",
                ApiAccess::Write,
            ),
            (
                Method::DELETE,
                format!("{t}/cas/{{ca}}"),
                "manageCredentials",
                ApiAccess::Admin,
            ),
            (
                Method::PUT,
                format!("{t}/policies/{{policy}}"),
                "managePolicies",
                ApiAccess::Admin,
            ),
        ];
        for (method, path, action, access) in cases {
            let op = operation(&method, &path).expect(&path);
            assert_eq!((op.action, op.access), (action, access), "{method} {path}");
            assert_eq!(op.on_device, path.starts_with(d));
        }
        assert_eq!(operation(&Method::POST, &format!("{d}/nothing")), None);
        assert_eq!(operation(&Method::DELETE, t), None, "operator only");
        assert_eq!(operation(&Method::GET, "/api/v1/tenants"), None);
    }
}
