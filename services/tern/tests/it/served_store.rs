//! The distributed mode's shared store: `tern store` serves it, and two `tern up` processes
//! that name it in `store.url` (and route commands over one nats-server) see the same
//! tenants, devices, keys and telemetry, and complete each other's commands.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::QoS;
use tern_eventlog::testing::{free_port, wait_listening};
use tern_registry::testing::NatsServer;

use crate::harness::{Mqtt, PATIENCE, TERN, Tern, ping_round_trip};
use crate::rules::create_rule;
use crate::tls::{client_cert, pki};

/// `tern store` on a free port, stopped on drop.
pub struct StoreServer {
    child: Child,
    pub url: String,
    pub token_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl StoreServer {
    pub fn start() -> Self {
        Self::start_with(&[], &[])
    }

    /// With extra environment (`TERN_TRACING__OTLP_ENDPOINT`, say).
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        Self::start_with(&[], env)
    }

    /// With extra flags and environment.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("store.token");
        std::fs::write(&token_file, "a-store-token-for-the-tests\n").expect("token");
        let address = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(TERN)
            .args(["store", "--listen", &address])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--token-file")
            .arg(&token_file)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tern store");
        wait_listening(&mut child, &address, "tern store");
        Self {
            child,
            url: format!("http://{address}"),
            token_file,
            _dir: dir,
        }
    }

    fn tern(&self, nats: &NatsServer) -> Tern {
        let token_file = self.token_file.to_str().expect("utf-8 path");
        Tern::start_with_env(&[
            ("TERN_STORE__URL", &self.url),
            ("TERN_STORE__TOKEN_FILE", token_file),
            ("TERN_ROUTING__BACKEND", "nats"),
            ("TERN_ROUTING__NATS__URL", &nats.url),
        ])
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_served_store() {
    let store = StoreServer::start();
    let nats = NatsServer::start();
    let first = store.tern(&nats);
    let p = first.provision("acme", "boiler");
    let mut device = Mqtt::device(&first, &p).await;
    device
        .publish_acked("telemetry", vec![br#"{"temp": 21.5}"#.to_vec()])
        .await;
    first.wait_points(&p, "temp", 1).await;

    // Another process, another data directory, the same store.
    let second = store.tern(&nats);
    let operator = first.operator_token();
    let (status, devices) = second.get(&operator, "/api/v1/tenants/acme/devices").await;
    assert_eq!(status, 200, "{devices}");
    assert_eq!(devices[0]["name"], "boiler", "{devices}");
    let points = second.wait_points(&p, "temp", 1).await;
    assert_eq!(
        points[0]["value"], 21.5,
        "telemetry the first process stored"
    );
    // A synchronous command sent through the second process reaches the device on the first
    // (over NATS), and the second sees its answer, which the first stored.
    device.subscribe("command/req/#", QoS::AtLeastOnce).await;
    let command = ping_round_trip(second.http(), &operator, "boiler", &mut device).await;
    assert_eq!(command["state"], "succeeded", "{command}");
    assert_eq!(command["result"]["payload"]["pong"], true);

    // Plain publish/subscribe crosses the processes' bridges: a subscriber on the first gets
    // what a client of the second publishes, and a retained message set through the second is
    // there for a new subscription on the first.
    let (watcher, talker, latecomer) = (
        first.provision("acme", "watcher"),
        first.provision("acme", "talker"),
        first.provision("acme", "latecomer"),
    );
    let mut watching = Mqtt::device(&first, &watcher).await;
    watching.subscribe("plant/#", QoS::AtLeastOnce).await;
    let mut talking = Mqtt::device(&second, &talker).await;
    talking.publish("plant/boiler/state", "on").await;
    let got = tokio::time::timeout(PATIENCE, watching.received())
        .await
        .expect("delivered across bridges");
    assert_eq!(
        (got.topic.as_str(), got.payload.as_str()),
        ("plant/boiler/state", "on")
    );
    talking
        .publish_retained("plant/boiler/mode", "eco", true)
        .await;
    let got = tokio::time::timeout(PATIENCE, watching.received())
        .await
        .expect("delivered across bridges");
    assert_eq!(got.payload, "eco");
    let mut late = Mqtt::device(&first, &latecomer).await;
    late.subscribe("plant/boiler/mode", QoS::AtLeastOnce).await;
    let got = tokio::time::timeout(PATIENCE, late.received())
        .await
        .expect("the retained message");
    assert_eq!((got.payload.as_str(), got.retain), ("eco", true));
    // Each bridge delivers a publish once: the first's subscriber got nothing more.
    watching
        .expect_only_marker(&mut talking, "plant/marker")
        .await;

    // Each process runs the rules on its own (embedded) log, with checkpoints of its own in
    // the shared store: a rule fires for devices on either, and goes on doing so after both
    // have saved their checkpoints.
    create_rule(
        &first,
        "acme",
        "hot",
        "SELECT device, temp FROM telemetry WHERE temp > 50",
        &["alert"],
    );
    for round in ["before", "after"] {
        for (process, name) in [(&first, "one"), (&second, "two")] {
            let hot = first.provision("acme", &format!("{round}-{name}"));
            let mut device = Mqtt::device(process, &hot).await;
            alerted(&first, &operator, &mut device, &hot.device_id).await;
        }
        // Past the engine's once-a-second checkpoint.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    // The signing keys are shared too: the first process's device token opens the second's
    // MQTT port (and takes the device's session over from the first, as MQTT wants).
    let options = Mqtt::options(second.mqtt_port, &p.device_id, &p.access_token);
    Mqtt::connect(options)
        .await
        .expect("the device connects to the second process");

    // A wrong store token stops start-up, with the store named.
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-store-token-at-all").expect("token");
    let wrong = wrong.to_str().expect("utf-8");
    let stderr = refused_start(&[
        ("TERN_STORE__URL", &store.url),
        ("TERN_STORE__TOKEN_FILE", wrong),
    ]);
    assert!(stderr.contains("`store.url`"), "{stderr}");
}

/// Publishes a hot reading every half second until the tenant has an alert for `device_id`
/// (a process picks a rule saved through another up within a second).
async fn alerted(tern: &Tern, token: &str, device: &mut Mqtt, device_id: &str) {
    let deadline = std::time::Instant::now() + PATIENCE;
    let path = format!("/api/v1/tenants/acme/alerts?device={device_id}");
    loop {
        device
            .publish_acked("telemetry", vec![br#"{"temp": 60}"#.to_vec()])
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, alerts) = tern.get(token, &path).await;
        if alerts.as_array().is_some_and(|a| !a.is_empty()) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no alert for {device_id}: {alerts}"
        );
    }
}

/// Runs `tern up` with `env`, expecting it to stop at start-up; returns its stderr.
pub(crate) fn refused_start(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(TERN)
        .args(["up", "--bind", "127.0.0.1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--mqtt-port", &free_port().to_string()])
        .args(["--http-port", &free_port().to_string()])
        .args(["--grpc-port", &free_port().to_string()])
        .args(["--coap-port", &free_port().to_string()])
        .envs(env.iter().copied())
        .output()
        .expect("tern up");
    assert!(!out.status.success(), "tern up started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path(), "store");
    let (cert, key) = client_cert(dir.path(), &pki, "tern-up");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let store = StoreServer::start_with(
        &[
            "--tls-cert",
            &path(&pki.cert),
            "--tls-key",
            &path(&pki.key),
            "--client-ca",
            &path(&pki.ca),
        ],
        &[],
    );
    let url = store.url.replace("http://127.0.0.1", "https://localhost");
    let token_file = path(&store.token_file);
    let (ca, cert, key) = (path(&pki.ca), path(&cert), path(&key));
    let tls = [
        ("TERN_STORE__URL", url.as_str()),
        ("TERN_STORE__TOKEN_FILE", token_file.as_str()),
        ("TERN_STORE__CA_FILE", ca.as_str()),
    ];

    // With its client certificate, tern up works on the store: telemetry in, read back.
    let mut env = tls.to_vec();
    env.extend([
        ("TERN_STORE__CERT_FILE", cert.as_str()),
        ("TERN_STORE__KEY_FILE", key.as_str()),
    ]);
    let tern = Tern::start_with_env(&env);
    let p = tern.provision("acme", "boiler");
    let mut device = Mqtt::device(&tern, &p).await;
    device
        .publish_acked("telemetry", vec![br#"{"temp": 21.5}"#.to_vec()])
        .await;
    assert_eq!(tern.wait_points(&p, "temp", 1).await[0]["value"], 21.5);

    // Without one, or in plain text, the store refuses it at start-up, which names the key.
    let stderr = refused_start(&tls);
    assert!(stderr.contains("`store.url`"), "{stderr}");
    let stderr = refused_start(&[
        ("TERN_STORE__URL", store.url.as_str()),
        ("TERN_STORE__TOKEN_FILE", token_file.as_str()),
    ]);
    assert!(stderr.contains("`store.url`"), "{stderr}");
    // An https:// store without the CA to check it by is a configuration error.
    let stderr = refused_start(&[
        ("TERN_STORE__URL", url.as_str()),
        ("TERN_STORE__TOKEN_FILE", token_file.as_str()),
    ]);
    assert!(stderr.contains("`store.ca_file`"), "{stderr}");
}
