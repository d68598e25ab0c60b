//! Registry queries: label selectors and pagination over REST and the CLI, within a tenant.

use serde_json::Value;

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
