//! Registry queries: label selectors and pagination over REST and the CLI, within a tenant.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::Tern;

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["name"].as_str().expect("name").to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_selected_by_labels_and_paged() {
    let tern = Tern::start();
    tern.cli_json(&["tenant", "create", "acme"]);
    for (name, site, tier) in [
        ("b1", "berlin", "a"),
        ("b2", "berlin", "b"),
        ("p1", "paris", "a"),
        ("p2", "paris", "c"),
    ] {
        tern.cli_json(&[
            "device",
            "create",
            name,
            "--tenant",
            "acme",
            "--label",
            &format!("site={site}"),
            "--label",
            &format!("tier={tier}"),
        ]);
    }
    tern.cli_json(&["device", "create", "bare", "--tenant", "acme"]);
    let list = |selector: &str| {
        tern.cli_json(&["device", "list", "--tenant", "acme", "--selector", selector])
    };
    assert_eq!(names(&list("site=berlin")), ["b1", "b2"]);
    assert_eq!(names(&list("site!=berlin")), ["bare", "p1", "p2"]);
    assert_eq!(names(&list("tier in (a,c),site")), ["b1", "p1", "p2"]);
    assert_eq!(names(&list("!site")), ["bare"]);

    // Groups, the owner and the management level are fields: `@group` and so on.
    for (device, group) in [("b1", "lab"), ("p1", "lab"), ("p2", "field")] {
        tern.cli_json(&[
            "device", "set", device, "--group", group, "--tenant", "acme",
        ]);
    }
    tern.cli_json(&[
        "device", "set", "p1", "--owner", "alice", "--tenant", "acme",
    ]);
    assert_eq!(names(&list("@group=lab")), ["b1", "p1"]);
    assert_eq!(
        names(&list("@group in (lab,field),site=paris")),
        ["p1", "p2"]
    );
    assert_eq!(names(&list("!@group")), ["b2", "bare"]);
    assert_eq!(names(&list("@group,!@owner")), ["b1", "p2"]);
    let unknown = tern.cli(&[
        "device",
        "list",
        "--tenant",
        "acme",
        "--selector",
        "@site=x",
    ]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("@group, @owner or @management"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );

    // Pages of two through REST, following x-next-after.
    let token = tern.provision("acme", "reader").api_token;
    let http = reqwest::Client::new();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!(
            "{}/api/v1/tenants/acme/devices?selector=tier&limit=2",
            tern.http()
        );
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let r = http.get(url).bearer_auth(&token).send().await.expect("GET");
        assert_eq!(r.status().as_u16(), 200);
        let next = r
            .headers()
            .get("x-next-after")
            .map(|v| v.to_str().expect("ascii").to_string());
        let page: Value = r.json().await.expect("JSON");
        assert!(page.as_array().expect("array").len() <= 2);
        seen.extend(names(&page));
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["b1", "b2", "p1", "p2"], "every selected device once");

    let r = http
        .get(format!(
            "{}/api/v1/tenants/acme/devices?selector=tier%20in%20a",
            tern.http()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.expect("JSON");
    assert!(body.to_string().contains("selector"), "{body}");

    let globex = tern.provision("globex", "g").api_token;
    let (status, _) = tern
        .get(&globex, "/api/v1/tenants/acme/devices?selector=site")
        .await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_goes_to_every_selected_device_once_even_when_retried() {
    let tern = Tern::start();
    tern.cli_json(&["tenant", "create", "acme"]);
    for (name, site) in [("b1", "berlin"), ("b2", "berlin"), ("p1", "paris")] {
        tern.cli_json(&[
            "device",
            "create",
            name,
            "--tenant",
            "acme",
            "--label",
            &format!("site={site}"),
        ]);
    }
    let bulk = || {
        tern.cli_json(&[
            "command",
            "bulk",
            "reboot",
            "--selector",
            "site=berlin",
            "--payload",
            r#"{"delay_s": 5}"#,
            "--idempotency-key",
            "maintenance-1",
            "--tenant",
            "acme",
        ])
    };
    let first = bulk();
    let ids = |sent: &Value| {
        let mut ids: Vec<String> = sent
            .as_array()
            .expect("array")
            .iter()
            .map(|c| c["id"].as_str().expect("id").to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(first.as_array().expect("array").len(), 2, "b1 and b2");
    assert_eq!(
        ids(&bulk()),
        ids(&first),
        "a retry with the same key sends nothing new"
    );
    for (device, expected) in [("b1", 1), ("b2", 1), ("p1", 0)] {
        let listed = tern.cli_json(&["command", "list", device, "--tenant", "acme"]);
        assert_eq!(
            listed.as_array().expect("array").len(),
            expected,
            "{device}"
        );
    }
    let bad = tern.cli(&[
        "command",
        "bulk",
        "reboot",
        "--selector",
        "tier in a",
        "--tenant",
        "acme",
    ]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("selector"),
        "{bad:?}"
    );
}

/// A typed operation to every selected device: each device is checked as if it were sent
/// alone (management level, the tenant's policies), so some are skipped with a reason while
/// the others get their command; retries with the same key send nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_goes_to_the_selected_devices_that_may_receive_it() {
    let tern = Tern::start();
    let token = tern.provision("acme", "reader").api_token;
    for (name, site, group, management) in [
        ("b1", "berlin", "lab", "fully_managed"),
        ("b2", "berlin", "lab", "semi_managed"),
        ("p1", "paris", "lab", "fully_managed"),
        ("p2", "paris", "field", "fully_managed"),
    ] {
        tern.cli_json(&[
            "device",
            "create",
            name,
            "--tenant",
            "acme",
            "--label",
            &format!("site={site}"),
            "--group",
            group,
            "--management",
            management,
        ]);
    }
    // Nobody may operate Paris's devices with an API token.
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("hands-off-paris.cedar");
    std::fs::write(
        &policy,
        "forbid (principal is ApiToken, action in [Action::\"operateDevice\", Action::\"sendCommand\"], resource)\n\
         when { resource.hasTag(\"site\") && resource.getTag(\"site\") == \"paris\" };\n",
    )
    .expect("policy");
    let policy = policy.display().to_string();
    tern.cli_json(&[
        "policy",
        "put",
        "hands-off-paris",
        &policy,
        "--tenant",
        "acme",
    ]);

    let lock = json!({"selector": "@group=lab", "idempotency_key": "stolen-van"});
    let path = "/api/v1/tenants/acme/operations/lock";
    let (status, sent) = tern.send_json(Method::POST, &token, path, &lock).await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["count"], 1, "{sent}");
    assert_eq!(sent["commands"][0]["name"], "tern.lock");
    let skipped: Vec<(String, String)> = sent["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .map(|s| {
            let name = s["device_name"].as_str().expect("name").to_string();
            (name, s["reason"].as_str().expect("reason").to_string())
        })
        .collect();
    let mut names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["b2", "p1"], "{sent}");
    for (name, reason) in &skipped {
        let expected = if name == "b2" {
            "semi_managed"
        } else {
            "policy"
        };
        assert!(reason.contains(expected), "{name}: {reason}");
    }
    // A retry sends nothing new.
    let (_, again) = tern.send_json(Method::POST, &token, path, &lock).await;
    assert_eq!(again["commands"][0]["id"], sent["commands"][0]["id"]);

    // The operator (through the CLI) is not bound by the tenant's policies.
    let rebooted = tern.cli_json(&[
        "device",
        "bulk",
        "reboot",
        "--selector",
        "site=paris",
        "--tenant",
        "acme",
    ]);
    assert_eq!(rebooted["count"], 2, "{rebooted}");

    for (body, field) in [
        (json!({"selector": ""}), "selector"),
        (
            json!({"selector": "@group=lab", "params": {"enabled": true}}),
            "feature",
        ),
    ] {
        let path = "/api/v1/tenants/acme/operations/feature";
        let (status, answer) = tern.send_json(Method::POST, &token, path, &body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.to_string().contains(field), "{answer}");
    }
    // Plain bulk commands are decided per device the same way.
    let body = json!({"selector": "@group=lab", "name": "blink"});
    let commands = "/api/v1/tenants/acme/commands";
    let (status, sent) = tern.send_json(Method::POST, &token, commands, &body).await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["count"], 2, "b1 and b2: {sent}");
    assert_eq!(sent["skipped"][0]["device_name"], "p1", "{sent}");

    let globex = tern.provision("globex", "g").api_token;
    let (status, _) = tern.send_json(Method::POST, &globex, path, &lock).await;
    assert_eq!(status, 403);
}
