//! `tern up` with command routing over a real nats-server: the bridge subscribes to the subjects
//! of the devices it holds, and commands, offline delivery and revocation take the NATS path
//! between the registry and the bridge, as they do between separate processes.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rumqttc::QoS;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use serde_json::{Value, json};
use tern_registry::testing::NatsServer;

use crate::harness::{Mqtt, PATIENCE, Tern};
use crate::revocation::{cli_ok, connect, ended, options};
use crate::served_store::refused_start;
use crate::tls::{client_cert, pki};

/// The subjects subscribed on the server, from its monitoring endpoint.
async fn subscribed(nats: &NatsServer) -> Vec<String> {
    let body: Value = reqwest::get(format!("{}/subsz?subs=1", nats.monitor_url))
        .await
        .expect("GET /subsz")
        .json()
        .await
        .expect("JSON");
    body["subscriptions_list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["subject"].as_str().map(str::to_string))
        .collect()
}

/// Waits until the device's subjects are subscribed (`true`) or not (`false`).
async fn held(nats: &NatsServer, device_id: &str, expected: bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = subscribed(nats).await.iter().any(|s| s.contains(device_id));
        if found == expected || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn command(tern: &Tern, token: &str, device: &str, body: Value) -> Value {
    let (status, sent) = tern
        .send_json(
            reqwest::Method::POST,
            token,
            &format!("/api/v1/tenants/acme/devices/{device}/commands"),
            &body,
        )
        .await;
    assert_eq!(status, 201, "{sent}");
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_revocations_go_over_nats() {
    let nats = NatsServer::start();
    let tern = Tern::start_with_env(&[
        ("TERN_ROUTING__BACKEND", "nats"),
        ("TERN_ROUTING__NATS__URL", nats.url.as_str()),
    ]);
    let (online, offline) = (tern.provision("acme", "a"), tern.provision("acme", "b"));

    // Online: the bridge holds the device's subjects, and the command comes through them.
    let mut device = Mqtt::device(&tern, &online).await;
    device.subscribe("command/req/#", QoS::AtLeastOnce).await;
    assert!(held(&nats, &online.device_id, true).await);
    assert!(!held(&nats, &offline.device_id, false).await);
    let sent = command(&tern, &online.api_token, "a", json!({"name": "reboot"})).await;
    let got = device.received().await;
    assert_eq!(
        got.topic,
        format!("command/req/{}/reboot", sent["id"].as_str().unwrap())
    );

    // Offline: nobody answers on NATS; the command waits for the device's next subscription.
    let queued = command(
        &tern,
        &offline.api_token,
        "b",
        json!({"name": "update", "ttl_secs": 300}),
    )
    .await;
    assert_eq!(queued["state"], "pending", "{queued}");
    let mut late = Mqtt::device(&tern, &offline).await;
    late.subscribe("command/req/#", QoS::AtLeastOnce).await;
    let got = late.received().await;
    assert_eq!(
        got.topic,
        format!("command/req/{}/update", queued["id"].as_str().unwrap())
    );

    // Revocation: the notice is published on the device's subject, the bridge closes the
    // connection, and with it gone the bridge lets go of the device's subjects.
    drop(device);
    assert!(!held(&nats, &online.device_id, false).await);
    let watcher = async_nats::connect(nats.url.as_str()).await.expect("NATS");
    let mut revocations = watcher
        .subscribe("tern.device.*.*.revoked")
        .await
        .expect("subscribe");
    watcher.flush().await.expect("flush");
    let (_client, mut events) = connect(options(&tern, &online.device_id, &online.access_token))
        .await
        .expect("connect");
    assert!(held(&nats, &online.device_id, true).await);
    let asked = Instant::now();
    cli_ok(&tern, &["device", "disable", "a", "--tenant", "acme"]);
    let (reason, _) = ended(&mut events, asked).await;
    assert_eq!(reason, DisconnectReasonCode::AdministrativeAction);
    let notice = tokio::time::timeout(PATIENCE, revocations.next())
        .await
        .expect("a revocation notice in time")
        .expect("subscription open");
    assert!(
        notice
            .subject
            .ends_with(&format!(".{}.revoked", online.device_id)),
        "{}",
        notice.subject
    );
    assert!(!held(&nats, &online.device_id, false).await);
}

/// A nats-server that requires TLS with a client certificate and a token: `tern up` signs in
/// with `routing.nats.ca_file`, `cert_file`, `key_file` and `token_file`, and commands go
/// through. Without the token, or without the certificate, it does not start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_signs_in_to_a_nats_server_that_requires_tls_and_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path(), "nats");
    let (cert, key) = client_cert(dir.path(), &pki, "tern");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let token = "nats-token-0123456789abcdef";
    let token_file = dir.path().join("nats.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let nats = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n\
         authorization {{ token: {token:?} }}\n",
        path(&pki.cert),
        path(&pki.key),
        path(&pki.ca),
    ));
    let (ca, cert, key, token_file) = (path(&pki.ca), path(&cert), path(&key), path(&token_file));
    let tls = [
        ("TERN_ROUTING__BACKEND", "nats"),
        ("TERN_ROUTING__NATS__URL", nats.url.as_str()),
        ("TERN_ROUTING__NATS__CA_FILE", ca.as_str()),
        ("TERN_ROUTING__NATS__CERT_FILE", cert.as_str()),
        ("TERN_ROUTING__NATS__KEY_FILE", key.as_str()),
    ];
    let mut env = tls.to_vec();
    env.push(("TERN_ROUTING__NATS__TOKEN_FILE", token_file.as_str()));
    let tern = Tern::start_with_env(&env);
    let p = tern.provision("acme", "a");
    let mut device = Mqtt::device(&tern, &p).await;
    device.subscribe("command/req/#", QoS::AtLeastOnce).await;
    let sent = command(&tern, &p.api_token, "a", json!({"name": "reboot"})).await;
    let got = device.received().await;
    assert_eq!(
        got.topic,
        format!("command/req/{}/reboot", sent["id"].as_str().unwrap())
    );

    let stderr = refused_start(&tls);
    assert!(
        stderr.contains("routing.nats") && stderr.contains("uthorization"),
        "{stderr}"
    );
    let without_cert: Vec<_> = env
        .iter()
        .copied()
        .filter(|(k, _)| !k.ends_with("CERT_FILE") && !k.ends_with("KEY_FILE"))
        .collect();
    let stderr = refused_start(&without_cert);
    assert!(stderr.contains("routing.nats"), "{stderr}");
}
