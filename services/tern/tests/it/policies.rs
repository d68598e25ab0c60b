//! Policies end to end: the CLI administers a tenant's Cedar policies, the gateway enforces
//! them on real requests (labels, source address), versions roll back, the XACML JSON Profile
//! endpoint answers external PEPs, and decisions are audited.

use std::io::Write;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::Tern;

/// The worked example of docs/policies.md, for a client and a network given by the test.
fn maintenance_policy(client_id: &str, network: &str) -> String {
    format!(
        r#"// The maintenance app may only send commands to Berlin's devices, in working hours, from its network.
forbid (principal == Client::"{client_id}", action, resource)
unless {{
  action == Action::"sendCommand" &&
  resource is Device && resource.hasTag("site") && resource.getTag("site") == "berlin" &&
  context.hour >= 8 && context.hour < 18 &&
  context has source_ip && context.source_ip.isInRange(ip("{network}"))
}};
"#
    )
}

fn write_temp(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("write");
    path.display().to_string()
}

fn xacml(subject: &str, action: &str, device: &str, at: &str, ip: &str) -> Value {
    json!({"Request": {
        "ReturnPolicyIdList": true,
        "AccessSubject": {"Attribute": [
            {"AttributeId": "urn:oasis:names:tc:xacml:1.0:subject:subject-id", "Value": subject},
            {"AttributeId": "urn:tern:subject:scope", "Value": ["tern:read", "tern:write"]},
            {"AttributeId": "urn:oasis:names:tc:xacml:3.0:subject:authn-locality:ip-address",
             "DataType": "urn:oasis:names:tc:xacml:2.0:data-type:ipAddress", "Value": ip}]},
        "Action": {"Attribute": {"AttributeId": "urn:oasis:names:tc:xacml:1.0:action:action-id", "Value": action}},
        "Resource": {"Attribute": {"AttributeId": "urn:oasis:names:tc:xacml:1.0:resource:resource-id", "Value": device}},
        "Environment": {"Attribute": {"AttributeId": "urn:oasis:names:tc:xacml:1.0:environment:current-dateTime",
            "DataType": "http://www.w3.org/2001/XMLSchema#dateTime", "Value": at}},
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_requests_roll_back_and_answer_xacml() {
    let tern = Tern::start();
    let acme = tern.provision("acme", "boiler-berlin");
    tern.cli_json(&[
        "device",
        "create",
        "boiler-hamburg",
        "--tenant",
        "acme",
        "--label",
        "site=hamburg",
    ]);
    let berlin_label = json!({"labels": {"site": "berlin"}});
    let (status, _) = tern
        .send_json(
            Method::PATCH,
            &acme.api_token,
            "/api/v1/tenants/acme/devices/boiler-berlin",
            &berlin_label,
        )
        .await;
    assert_eq!(status, 200);
    let maintenance = tern.cli_json(&[
        "client",
        "create",
        "--tenant",
        "acme",
        "--name",
        "maintenance",
        "--grant",
        "client_credentials",
        "--scope",
        "tern:read tern:write",
    ]);
    let client_id = maintenance["client_id"].as_str().expect("id").to_string();
    let token = tern
        .client_token("acme", &maintenance, "tern:read tern:write")
        .await;
    let command = |device: &'static str| {
        let (tern, token) = (&tern, token.clone());
        async move {
            tern.send_json(
                Method::POST,
                &token,
                &format!("/api/v1/tenants/acme/devices/{device}/commands"),
                &json!({"name": "inspect"}),
            )
            .await
        }
    };
    // The defaults let the client do what its scopes allow.
    assert!(command("boiler-hamburg").await.0 < 300);

    // Loopback stands in for the app's network; every hour counts as working hours here
    // (the hour condition is covered by the XACML requests below, which carry their time).
    let dir = tempfile::tempdir().expect("tempdir");
    let always = maintenance_policy(&client_id, "127.0.0.0/8").replace(
        "context.hour >= 8 && context.hour < 18",
        "context.hour >= 0",
    );
    let file = write_temp(dir.path(), "maintenance.cedar", &always);
    let v1 = tern.cli_json(&[
        "policy",
        "put",
        "maintenance-berlin",
        &file,
        "--tenant",
        "acme",
    ]);
    assert_eq!(v1["version"], 1);
    assert!(
        command("boiler-berlin").await.0 < 300,
        "berlin, from loopback: allowed"
    );
    let (status, body) = command("boiler-hamburg").await;
    assert_eq!(status, 403, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("sendCommand") && message.contains("maintenance-berlin"),
        "{message}"
    );
    assert_eq!(
        tern.get(&token, "/api/v1/tenants/acme/devices").await.0,
        403,
        "only commands"
    );
    assert_eq!(
        tern.get(&acme.api_token, "/api/v1/tenants/acme/devices")
            .await
            .0,
        200,
        "others unaffected"
    );

    // From another network: refused even for Berlin.
    let elsewhere = maintenance_policy(&client_id, "10.20.0.0/16");
    let file = write_temp(dir.path(), "elsewhere.cedar", &elsewhere);
    tern.cli_json(&[
        "policy",
        "put",
        "maintenance-berlin",
        &file,
        "--tenant",
        "acme",
    ]);
    assert_eq!(command("boiler-berlin").await.0, 403);

    // Versions and rollback to the defaults.
    let versions = tern.cli_json(&["policy", "versions", "--tenant", "acme"]);
    let numbers: Vec<u64> = versions
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v["version"].as_u64().expect("n"))
        .collect();
    assert_eq!(numbers, vec![2, 1, 0]);
    let v3 = tern.cli_json(&["policy", "rollback", "0", "--tenant", "acme"]);
    assert_eq!(
        (v3["version"].clone(), v3["change"].clone()),
        (json!(3), json!("rollback to 0"))
    );
    assert!(
        command("boiler-hamburg").await.0 < 300,
        "the rollback took effect at once"
    );

    // A broken policy is refused with its place; nothing changes.
    let broken = write_temp(
        dir.path(),
        "broken.cedar",
        "permit (principal, action, resource)\nwhen { context.hour > };",
    );
    let out = tern.cli(&["policy", "put", "broken", &broken, "--tenant", "acme"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("policies.broken") && stderr.contains("line 2"),
        "{stderr}"
    );

    // External PEPs: the XACML JSON Profile, with the real worked example in place.
    tern.cli_json(&[
        "policy",
        "put",
        "maintenance-berlin",
        &file,
        "--tenant",
        "acme",
    ]);
    let ask = |body: Value| {
        let tern = &tern;
        let api = acme.api_token.clone();
        async move {
            let (status, response) = tern
                .send_json(Method::POST, &api, "/pdp/authorize", &body)
                .await;
            assert_eq!(status, 200, "{response}");
            response["Response"][0].clone()
        }
    };
    let permit = ask(xacml(
        &client_id,
        "sendCommand",
        "boiler-berlin",
        "2026-11-25T14:30:00Z",
        "10.20.1.5",
    ))
    .await;
    assert_eq!(permit["Decision"], "Permit", "{permit}");
    assert_eq!(
        permit["Status"]["StatusCode"]["Value"],
        "urn:oasis:names:tc:xacml:1.0:status:ok"
    );
    for (device, at, ip) in [
        ("boiler-hamburg", "2026-11-25T14:30:00Z", "10.20.1.5"),
        ("boiler-berlin", "2026-11-25T21:00:00Z", "10.20.1.5"),
        ("boiler-berlin", "2026-11-25T14:30:00+01:00", "192.0.2.1"),
    ] {
        let deny = ask(xacml(&client_id, "sendCommand", device, at, ip)).await;
        assert_eq!(deny["Decision"], "Deny", "{device} {at} {ip}: {deny}");
        assert_eq!(
            deny["PolicyIdentifierList"]["PolicyIdReference"][0]["Id"],
            "maintenance-berlin"
        );
    }
    // Working hours in Berlin: 17:30 UTC is 18:30 there in November.
    let evening = || {
        xacml(
            &client_id,
            "sendCommand",
            "boiler-berlin",
            "2026-11-25T17:30:00Z",
            "10.20.1.5",
        )
    };
    assert_eq!(ask(evening()).await["Decision"], "Permit", "in UTC");
    let zoned = tern.cli_json(&["policy", "time-zone", "Europe/Berlin", "--tenant", "acme"]);
    assert_eq!(zoned["time_zone"], "Europe/Berlin", "{zoned}");
    assert_eq!(ask(evening()).await["Decision"], "Deny", "in Berlin time");
    let out = tern.cli(&["policy", "time-zone", "Mars/Olympus", "--tenant", "acme"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("time_zone"));

    // Shaped like the JSON Profile's own example: a subject and resource Tern has no policy for.
    let example = json!({"Request": {
        "AccessSubject": {"Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:1.0:subject:subject-id", "Value": "Andreas"}]},
        "Resource": {"Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:1.0:resource:resource-id", "Value": "Bart Simpson's medical record"}]},
        "Action": {"Attribute": [{"AttributeId": "urn:oasis:names:tc:xacml:1.0:action:action-id", "Value": "read"}]},
    }});
    assert_eq!(ask(example).await["Decision"], "NotApplicable");
    let malformed = ask(json!({"Request": {"Action": {"Attribute": {"AttributeId": "x"}}}})).await;
    assert_eq!(malformed["Decision"], "Indeterminate");
    assert_eq!(
        malformed["Status"]["StatusCode"]["Value"],
        "urn:oasis:names:tc:xacml:1.0:status:syntax-error"
    );

    // Audit in full: the gateway's decisions are recorded, newest first.
    tern.cli_json(&["policy", "audit", "full", "--tenant", "acme"]);
    assert_eq!(command("boiler-hamburg").await.0, 403);
    let mut decisions = Value::Null;
    for _ in 0..50 {
        decisions = tern.cli_json(&["policy", "decisions", "--tenant", "acme"]);
        if decisions.as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let newest = &decisions[0];
    assert_eq!(newest["decision"]["outcome"], "Deny", "{newest}");
    assert_eq!(newest["request"]["principal"]["id"], client_id.as_str());
    assert_eq!(newest["request"]["action"], "sendCommand");
}

/// The HTTP and CoAP device endpoints ask the PDP the same question as MQTT (publish or
/// subscribe on the topic the request stands for), so one policy governs every protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_policies_apply_over_http_and_coap_as_over_mqtt() {
    let tern = Tern::start();
    let sensor = tern.provision("acme", "sensor");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_temp(
        dir.path(),
        "quarantine.cedar",
        r#"// A quarantined device may not send telemetry (it may still take commands).
forbid (principal is Device, action == Action::"publish", resource is Topic)
when { resource.name == "telemetry" && principal.hasTag("quarantined") };
"#,
    );
    tern.cli_json(&["policy", "put", "quarantine", &file, "--tenant", "acme"]);
    let label = |labels: Value| {
        let tern = &tern;
        let api = sensor.api_token.clone();
        async move {
            let path = "/api/v1/tenants/acme/devices/sensor";
            let body = json!({ "labels": labels });
            assert_eq!(
                tern.send_json(Method::PATCH, &api, path, &body).await.0,
                200
            );
        }
    };
    let http = reqwest::Client::new();
    let post = || {
        http.post(format!("{}/device/v1/telemetry", tern.http()))
            .bearer_auth(&sensor.access_token)
            .body(r#"{"temp": 20}"#)
            .send()
    };
    assert_eq!(post().await.expect("POST").status(), 201);

    label(json!({"quarantined": "yes"})).await;
    let refused = post().await.expect("POST");
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.expect("JSON");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("publish on telemetry") && m.contains("quarantine")),
        "{body}"
    );
    let commands = http
        .get(format!("{}/device/v1/commands", tern.http()))
        .bearer_auth(&sensor.access_token)
        .send()
        .await
        .expect("GET");
    assert_eq!(commands.status(), 200, "commands are still allowed");
    let coap = std::process::Command::new("coap-client-notls")
        .args(["-B", "10", "-m", "post", "-e", r#"{"temp": 20}"#])
        .args(["-O", &format!("65003,{}", sensor.access_token)])
        .arg(format!("coap://127.0.0.1:{}/telemetry", tern.coap_port))
        .output()
        .expect("coap-client-notls runs");
    let said =
        String::from_utf8_lossy(&coap.stdout).to_string() + &String::from_utf8_lossy(&coap.stderr);
    assert!(said.contains("4.03"), "{said}");

    label(json!({})).await;
    assert_eq!(post().await.expect("POST").status(), 201, "released");
}
