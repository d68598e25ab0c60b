//! The device agent (`firmware/tern-agent`) as a real process against `tern up`: enrolment
//! (pre-issued token, or a code a person approves), telemetry, the twin, every management
//! operation through real hooks (shell scripts), signed updates with rollback, OTA campaigns
//! from Tern's artifact store (one download cut by a relay and resumed), commands queued
//! while it was offline, and being cut off. The single-device update tests serve artifacts
//! from a small axum server in the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tern_eventlog::testing::eventually;

use crate::harness::{Provisioned, TERN, Tern};

/// Built beside `tern` by `cargo test --workspace` (tern-agent's own tests need it).
fn agent_binary() -> PathBuf {
    let path = Path::new(TERN).with_file_name("tern-agent");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p tern-agent` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

struct Agent {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Agent {
    /// Writes a configuration whose hooks record what they are asked to do in `dir`.
    fn configure(tern: &Tern, public_key: &str) -> Self {
        let mqtt = format!("mqtt://127.0.0.1:{}", tern.mqtt_port);
        Self::configure_with(tern, public_key, &mqtt, "")
    }

    /// As [`Agent::configure`], to the MQTT endpoint `mqtt`, with `extra` top-level keys.
    fn configure_with(tern: &Tern, public_key: &str, mqtt: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        let script = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("hook");
            format!("sh {}", path.display())
        };
        let feature = script("feature.sh", &format!("echo \"$1=$2\" >> {d}/features.log"));
        let command = script(
            "command.sh",
            &format!("echo \"$1\" >> {d}/commands.log; echo \"{{\\\"done\\\": \\\"$1\\\"}}\""),
        );
        let config = format!(
            // `localhost`, as in Tern's default `identity.public_url`: artifact URLs on that
            // origin get the device's token.
            r#"server = "http://localhost:{http}"
mqtt = "{mqtt}"
root_dir = "{d}/root"
{extra}
keepalive_secs = 10

[telemetry]
interval_secs = 1
system = false
scripts = ["echo '{{\"temp\": 21.5}}'"]

[hooks]
feature = "{feature}"
command = "{command}"
network = "cat > {d}/network.json"
location = "echo '{{\"lat\": 52.52, \"lon\": 13.405, \"accuracy_m\": 8}}'"
twin = "cat > {d}/desired.json"
lock = "touch {d}/locked"
unlock = "rm -f {d}/locked"
health_check = "grep -q healthy \"$TERN_UPDATE_ARTIFACT\""
timeout_secs = 20

[update]
public_key = "{public_key}"
"#,
            http = tern.http_port,
        );
        std::fs::write(dir.path().join("agent.toml"), config).expect("config");
        Self { dir, child: None }
    }

    /// Points the agent's HTTP traffic at `url` instead of Tern's port.
    fn set_server(&self, url: &str) {
        let path = self.dir.path().join("agent.toml");
        let config = std::fs::read_to_string(&path).expect("config");
        let (first, rest) = config.split_once('\n').expect("lines");
        assert!(first.starts_with("server = "), "{first}");
        std::fs::write(&path, format!("server = \"{url}\"\n{rest}")).expect("config");
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(agent_binary());
        command
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .env("RUST_LOG", "info");
        command
    }

    fn enroll(&self, refresh_token: &str) -> Value {
        let out = self
            .command(&["enroll"])
            .env("TERN_AGENT_REFRESH_TOKEN", refresh_token)
            .output()
            .expect("tern-agent enroll");
        assert!(
            out.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).expect("log");
        let child = self
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tern-agent run");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the agent to exit on its own; returns whether it exited with success.
    async fn exited(&mut self) -> bool {
        let child = self.child.as_mut().expect("running");
        for _ in 0..100 {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the agent did not exit; log:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn device_path(p: &Provisioned) -> String {
    format!("/api/v1/tenants/{}/devices/{}", p.tenant, p.device_id)
}

/// Sends a typed operation and waits for the device's answer; returns the finished command.
async fn operate(tern: &Tern, p: &Provisioned, operation: &str, params: Value) -> Value {
    let path = format!("{}/operations/{operation}", device_path(p));
    let (status, command) = tern
        .send_json(reqwest::Method::POST, &p.api_token, &path, &params)
        .await;
    assert_eq!(status, 201, "{operation}: {command}");
    finished(tern, p, &command).await
}

async fn finished(tern: &Tern, p: &Provisioned, command: &Value) -> Value {
    let id = command["id"].as_str().expect("command id");
    let path = format!("{}/commands/{id}?wait=30", device_path(p));
    let (status, command) = tern.get(&p.api_token, &path).await;
    assert_eq!(status, 200, "{command}");
    command
}

async fn reported(tern: &Tern, p: &Provisioned) -> Value {
    let (_, twin) = tern
        .get(&p.api_token, &format!("{}/twin", device_path(p)))
        .await;
    twin["reported"].clone()
}

fn device_refresh_token(tern: &Tern, p: &Provisioned) -> String {
    let tokens = tern.cli_json(&["token", "device", &p.device_id, "--tenant", &p.tenant]);
    tokens["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_string()
}

/// Serves `artifacts` (path → bytes) over HTTP on loopback; returns the base URL.
async fn artifact_server(artifacts: Vec<(&'static str, Vec<u8>)>) -> String {
    let mut app = axum::Router::new();
    for (path, bytes) in artifacts {
        app = app.route(path, axum::routing::get(move || async move { bytes }));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

struct Signer(Ed25519KeyPair);

impl Signer {
    fn new() -> Self {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        Self(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair"))
    }

    fn public_key(&self) -> String {
        STANDARD.encode(self.0.public_key().as_ref())
    }

    /// The update operation's parameters for `bytes` at `url`, signed when `sign`.
    fn update(&self, version: &str, url: &str, bytes: &[u8], sign: bool) -> Value {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let sha256: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut params = json!({"version": version, "url": url, "sha256": sha256});
        if sign {
            params["signature"] = STANDARD
                .encode(self.0.sign(digest.as_ref()).as_ref())
                .into();
        }
        params
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_enrolls_reports_and_carries_out_every_operation() {
    let tern = Tern::start();
    let p = tern.provision("agents", "pi-1");
    let signer = Signer::new();
    let mut agent = Agent::configure(&tern, &signer.public_key());
    let enrolled = agent.enroll(&device_refresh_token(&tern, &p));
    assert_eq!(enrolled["device_id"], p.device_id.as_str());
    agent.start();

    // Telemetry from the script.
    let points = tern.wait_points(&p, "temp", 2).await;
    assert_eq!(points[0]["value"], 21.5);

    // The twin: a desired change reaches the hook and is reported applied.
    tern.cli_json(&[
        "device",
        "desire",
        "pi-1",
        r#"{"fan": 2}"#,
        "--tenant",
        "agents",
    ]);
    assert!(
        eventually(async || reported(&tern, &p).await["desired_version"].as_u64() >= Some(1)).await,
        "desired version reported; log:\n{}",
        agent.log()
    );
    assert_eq!(
        serde_json::from_str::<Value>(&agent.file("desired.json")).expect("desired"),
        json!({"fan": 2})
    );

    // Operations, each through its hook.
    let done = operate(
        &tern,
        &p,
        "feature",
        json!({"feature": "camera", "enabled": false}),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(agent.file("features.log"), "camera=off\n");

    let done = operate(
        &tern,
        &p,
        "configure",
        json!({"wifi": {"ssid": "plant-3", "psk": "correct horse"}, "settings": {"rate": 5}}),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let network: Value = serde_json::from_str(&agent.file("network.json")).expect("network");
    assert_eq!(network["wifi"]["ssid"], "plant-3");
    let settings =
        std::fs::read_to_string(agent.root().join("state/settings.json")).expect("settings");
    assert_eq!(
        serde_json::from_str::<Value>(&settings).expect("json"),
        json!({"rate": 5})
    );

    let done = operate(&tern, &p, "locate", json!({})).await;
    assert_eq!(done["result"]["payload"]["lat"], 52.52, "{done}");
    tern.wait_points(&p, "lat", 1).await;
    tern.wait_points(&p, "lon", 1).await;
    let positions = tern.cli_json(&["device", "locations", "pi-1", "--tenant", "agents"]);
    let fix = &positions[0];
    assert_eq!(
        (&fix["lat"], &fix["lon"], &fix["accuracy_m"]),
        (&json!(52.52), &json!(13.405), &json!(8.0)),
        "{positions}"
    );
    let (_, status) = tern
        .get(&p.api_token, &format!("{}/status", device_path(&p)))
        .await;
    assert_eq!(status["location"], *fix, "{status}");

    let done = operate(&tern, &p, "lock", json!({})).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(agent.dir.path().join("locked").exists());
    operate(&tern, &p, "unlock", json!({})).await;
    assert!(!agent.dir.path().join("locked").exists());

    let state = reported(&tern, &p).await;
    assert_eq!(state["features"]["camera"], false, "{state}");
    assert_eq!(state["network"]["wifi_ssid"], "plant-3");
    assert!(
        !state.to_string().contains("correct horse"),
        "no secrets in the twin"
    );
    assert_eq!(state["locked"], false);

    // A plain command goes to the command hook, and its output is the answer.
    let (_, sent) = tern
        .send_json(
            reqwest::Method::POST,
            &p.api_token,
            &format!("{}/commands", device_path(&p)),
            &json!({"name": "calibrate", "payload": {}, "wait_secs": 20}),
        )
        .await;
    assert_eq!(sent["result"]["payload"]["done"], "calibrate", "{sent}");

    // Updates: a signed healthy one is installed; an unhealthy one rolls back; an unsigned
    // or altered one is refused before installing.
    let healthy = b"healthy firmware 2.0".to_vec();
    let unhealthy = b"firmware 3.0 that crashes".to_vec();
    let base = artifact_server(vec![("/v2", healthy.clone()), ("/v3", unhealthy.clone())]).await;
    let v2 = signer.update("2.0", &format!("{base}/v2"), &healthy, true);
    let done = operate(&tern, &p, "update", v2.clone()).await;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", agent.log());
    assert_eq!(
        std::fs::read(agent.root().join("current/artifact")).expect("installed"),
        healthy
    );
    let done = operate(
        &tern,
        &p,
        "update",
        signer.update("3.0", &format!("{base}/v3"), &unhealthy, true),
    )
    .await;
    assert_eq!(done["result"]["status"], 500, "{done}");
    assert_eq!(done["result"]["payload"]["state"], "rolled_back");
    assert_eq!(
        std::fs::read(agent.root().join("current/artifact")).expect("still installed"),
        healthy,
        "rolled back to 2.0"
    );
    let state = reported(&tern, &p).await;
    assert_eq!(state["firmware"]["version"], "2.0", "{state}");
    assert_eq!(state["update"]["state"], "rolled_back");
    let unsigned = signer.update("3.1", &format!("{base}/v2"), &healthy, false);
    let done = operate(&tern, &p, "update", unsigned).await;
    assert_eq!(done["result"]["status"], 422, "{done}");
    let mut altered = v2;
    altered["version"] = "2.1".into();
    altered["url"] = format!("{base}/v3").into();
    let done = operate(&tern, &p, "update", altered).await;
    assert_eq!(done["result"]["status"], 422, "{done}");

    // Credential rotation: new tokens on disk, and the agent carries on with them.
    let before =
        std::fs::read_to_string(agent.root().join("secure/credentials.json")).expect("creds");
    let done = operate(&tern, &p, "rotate_credentials", json!({})).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let after =
        std::fs::read_to_string(agent.root().join("secure/credentials.json")).expect("creds");
    assert_ne!(before, after);
    let done = operate(
        &tern,
        &p,
        "feature",
        json!({"feature": "gps", "enabled": true}),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");

    // Wipe: answered, then the secure store is gone and the agent stops.
    let done = operate(&tern, &p, "wipe", json!({})).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(agent.exited().await, "exits cleanly after a wipe");
    assert!(!agent.root().join("secure").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_arrive_in_order_and_a_disabled_agent_is_cut_off() {
    let tern = Tern::start();
    let p = tern.provision("agents", "pi-2");
    let mut agent = Agent::configure(&tern, &Signer::new().public_key());
    agent.enroll(&device_refresh_token(&tern, &p));

    // Commands sent while the agent is not running are carried out in order once it is.
    let mut sent = Vec::new();
    for name in ["first", "second", "third"] {
        let (status, command) = tern
            .send_json(
                reqwest::Method::POST,
                &p.api_token,
                &format!("{}/commands", device_path(&p)),
                &json!({"name": name, "payload": {}}),
            )
            .await;
        assert_eq!(status, 201, "{command}");
        sent.push(command);
    }
    agent.start();
    for command in &sent {
        assert_eq!(finished(&tern, &p, command).await["state"], "succeeded");
    }
    assert_eq!(agent.file("commands.log"), "first\nsecond\nthird\n");

    // Telemetry made while the platform is away is kept and sent later, in order.
    tern.wait_points(&p, "temp", 1).await;
    let status_path = format!("{}/status", device_path(&p));
    let online = async || tern.get(&p.api_token, &status_path).await.1["online"] == true;
    assert!(eventually(online).await, "online once connected");
    tern.cli_json(&["device", "disable", "pi-2", "--tenant", "agents"]);
    assert!(eventually(async || !online().await).await, "cut off");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, status) = tern.get(&p.api_token, &status_path).await;
    assert_eq!(status["online"], false, "and kept out: {status}");
    let held = std::fs::read_dir(agent.root().join("outbox"))
        .expect("outbox")
        .count();
    assert!(held >= 2, "telemetry buffered while refused: {held}");

    tern.cli_json(&["device", "enable", "pi-2", "--tenant", "agents"]);
    // The agent retries with backoff (up to a minute); it was refused for a few seconds.
    let mut drained = false;
    for _ in 0..300 {
        let outbox = std::fs::read_dir(agent.root().join("outbox")).expect("outbox");
        if outbox.count() == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        drained,
        "the buffer drains once the device is enabled; log:\n{}",
        agent.log()
    );

    // What may be sent depends on the device's management level and its agent's capabilities.
    let refused = async |operation: &str| {
        let path = format!("{}/operations/{operation}", device_path(&p));
        tern.send_json(reqwest::Method::POST, &p.api_token, &path, &json!({}))
            .await
    };
    let (status, body) = refused("reboot").await;
    assert_eq!(
        status, 409,
        "no reboot hook, so no reboot capability: {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("does not offer")
    );
    let set = tern.cli_json(&[
        "device",
        "set",
        "pi-2",
        "--management",
        "semi_managed",
        "--owner",
        "alice",
        "--group",
        "line-1",
        "--tenant",
        "agents",
    ]);
    assert_eq!(set["management"], "semi_managed", "{set}");
    assert_eq!(set["owner"], "alice");
    assert_eq!(set["groups"], json!(["line-1"]));
    let (status, body) = refused("decommission").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("semi_managed")
    );
    tern.cli_json(&[
        "device",
        "set",
        "pi-2",
        "--management",
        "fully_managed",
        "--tenant",
        "agents",
    ]);

    // Decommission: the agent stops and refuses to run again until enrolled anew.
    let done = operate(&tern, &p, "decommission", json!({})).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(agent.exited().await);
    agent.start();
    assert!(
        !agent.exited().await,
        "refuses to run after decommissioning"
    );
    assert!(agent.log().contains("decommissioned"), "{}", agent.log());
}

/// Polls a campaign until it is no longer running; returns it with its devices.
async fn campaign_outcome(tern: &Tern, p: &Provisioned, id: &str) -> Value {
    let path = format!("/api/v1/tenants/{}/campaigns/{id}", p.tenant);
    for _ in 0..600 {
        let (status, campaign) = tern.get(&p.api_token, &path).await;
        assert_eq!(status, 200, "{campaign}");
        if campaign["state"] != "running" {
            return campaign;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("campaign {id} still running after 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ota_campaigns_roll_out_in_waves_and_abort_when_the_canary_fails() {
    let tern = Tern::start_with_env(&[("TERN_OTA__CAMPAIGN_INTERVAL_MS", "200")]);
    let fleet: Vec<Provisioned> = (1..=4)
        .map(|n| tern.provision("fleet", &format!("ota-{n}")))
        .collect();
    let p = &fleet[0];
    let key = tern.cli_json(&["ota", "key", "--tenant", "fleet"]);
    let key = key["public_key"].as_str().expect("public key");
    let mut agents = Vec::new();
    for device in &fleet {
        let mut agent = Agent::configure(&tern, key);
        agent.enroll(&device_refresh_token(&tern, device));
        agent.start();
        agents.push(agent);
    }

    let files = tempfile::tempdir().expect("tempdir");
    let upload = |name: &str, version: &str, bytes: &[u8]| {
        let file = files.path().join(name);
        std::fs::write(&file, bytes).expect("artifact");
        let path = file.to_str().expect("utf-8");
        tern.cli_json(&[
            "ota",
            "upload",
            path,
            "--name",
            "fw",
            "--version",
            version,
            "--tenant",
            "fleet",
        ])
    };
    let healthy = b"healthy firmware 2.0".to_vec();
    let good = upload("good.bin", "2.0", &healthy);
    let good_id = good["id"].as_str().expect("artifact id");

    // The platform serves its artifacts to its own tenant's devices, with ranges.
    let download = format!("{}/device/v1/artifacts/{good_id}", tern.http());
    let http = reqwest::Client::new();
    let rest = http
        .get(&download)
        .bearer_auth(&p.access_token)
        .header("range", "bytes=8-")
        .send()
        .await
        .expect("download");
    assert_eq!(rest.status(), 206);
    assert_eq!(rest.bytes().await.expect("body"), healthy[8..]);
    let stranger = tern.provision("elsewhere", "spy");
    let refused = http
        .get(&download)
        .bearer_auth(&stranger.access_token)
        .send()
        .await
        .expect("download");
    assert_eq!(
        refused.status(),
        404,
        "another tenant's artifact does not exist for it"
    );

    // A healthy update: the canary (1 of 4), then waves of 2, all succeed.
    let campaign = tern.cli_json(&[
        "ota",
        "campaign",
        "create",
        "--artifact",
        good_id,
        "--selector",
        "site=test",
        "--canary",
        "25",
        "--wave-size",
        "2",
        "--tenant",
        "fleet",
    ]);
    assert_eq!(campaign["waves"], 3, "{campaign}");
    let done = campaign_outcome(&tern, p, campaign["id"].as_str().expect("id")).await;
    let logs: Vec<String> = agents.iter().map(Agent::log).collect();
    assert_eq!(done["state"], "completed", "{done}\n{logs:#?}");
    assert_eq!(done["counts"]["succeeded"], 4, "{done}");
    let waves: Vec<u64> = done["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["wave"].as_u64().expect("wave"))
        .collect();
    assert_eq!(waves, [0, 1, 1, 2]);
    for agent in &agents {
        let installed = std::fs::read(agent.root().join("current/artifact")).expect("installed");
        assert_eq!(installed, healthy);
    }

    // A broken update fails its health check on the canary: the campaign aborts by itself
    // and no other device is touched.
    let broken = upload("broken.bin", "3.0", b"firmware 3.0 that crashes");
    let campaign = tern.cli_json(&[
        "ota",
        "campaign",
        "create",
        "--artifact",
        broken["id"].as_str().expect("id"),
        "--selector",
        "site=test",
        "--canary",
        "25",
        "--failure-threshold",
        "20",
        "--tenant",
        "fleet",
    ]);
    let done = campaign_outcome(&tern, p, campaign["id"].as_str().expect("id")).await;
    assert_eq!(done["state"], "aborted", "{done}");
    assert_eq!(done["counts"]["failed"], 1, "{done}");
    assert_eq!(done["counts"]["skipped"], 3, "{done}");
    assert!(
        done["reason"]
            .as_str()
            .expect("reason")
            .contains("threshold"),
        "{done}"
    );
    let canary = &done["devices"][0];
    assert_eq!(canary["progress"], "rolled_back", "{canary}");
    for agent in &agents {
        let installed = std::fs::read(agent.root().join("current/artifact")).expect("installed");
        assert_eq!(installed, healthy, "every device still runs 2.0");
    }
    let list = tern.cli_json(&["ota", "campaign", "list", "--tenant", "fleet"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_connects_over_tls_trusting_its_ca_file() {
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = crate::tls::pki(certs.path(), "agent");
    let tern = Tern::start_with_env(&[
        (
            "TERN_MQTT__TLS__CERT_FILE",
            pki.cert.to_str().expect("utf-8"),
        ),
        ("TERN_MQTT__TLS__KEY_FILE", pki.key.to_str().expect("utf-8")),
    ]);
    let p = tern.provision("agents", "tls-1");
    let mqtts = format!("mqtts://localhost:{}", tern.mqtts_port);
    let ca = format!("ca_file = \"{}\"", pki.ca.display());
    let mut agent = Agent::configure_with(&tern, &Signer::new().public_key(), &mqtts, &ca);
    agent.enroll(&device_refresh_token(&tern, &p));
    agent.start();
    let points = tern.wait_points(&p, "temp", 1).await;
    assert_eq!(points[0]["value"], 21.5);
    let status_path = format!("{}/status", device_path(&p));
    let over_tls = async || {
        tern.get(&p.api_token, &status_path).await.1["last_lifecycle"]["transport"] == "tls"
    };
    assert!(eventually(over_tls).await, "connected over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_access_token_before_it_expires() {
    let tern = Tern::start_with_env(&[("TERN_IDENTITY__DEVICE_ACCESS_TOKEN_TTL_SECS", "3")]);
    let p = tern.provision("agents", "short-lived");
    let mut agent = Agent::configure(&tern, &Signer::new().public_key());
    agent.enroll(&device_refresh_token(&tern, &p));
    agent.start();
    tern.wait_points(&p, "temp", 1).await;
    // Three token lifetimes later it is still connected and sending, on renewed tokens.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let before = tern.wait_points(&p, "temp", 1).await.len();
    let after = tern.wait_points(&p, "temp", before + 2).await.len();
    assert!(after >= before + 2);
    let renewals = agent.log().matches("credentials renewed").count();
    assert!(renewals >= 3, "renewed {renewals} times:\n{}", agent.log());
    assert!(!agent.log().contains("refused"), "{}", agent.log());
}

/// Runs `tern-agent enroll` without a token (the device authorization grant); returns the
/// process and the code it shows.
fn enroll_by_code(agent: &Agent) -> (Child, String) {
    let mut child = agent
        .command(&["enroll"])
        .env_remove("TERN_AGENT_REFRESH_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern-agent enroll");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if let Some(code) = line.strip_prefix("Enrolment code: ") {
                let _ = tx.send(code.to_string());
            }
        }
    });
    let code = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent shows an enrolment code");
    (child, code)
}

/// Enrolment by the device authorization grant: the agent shows a code, a person approves it
/// with `tern token approve CODE --device NAME`, which registers the device, and the agent
/// receives that device's own credentials and runs on them. Approving needs the admin scope,
/// and for a device that already exists, `manageDeviceTokens` on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_enrolls_by_a_code_a_person_approves() {
    let tern = Tern::start();
    let p = tern.provision("fleet", "existing-pi");
    let client = tern.cli_json(&[
        "client",
        "create",
        "--tenant",
        "fleet",
        "--name",
        "enrolment",
        "--grant",
        "device_code",
        "--public",
        "--scope",
        "tern:device",
    ]);
    let client_id = client["client_id"].as_str().expect("client id");
    let mqtt = format!("mqtt://127.0.0.1:{}", tern.mqtt_port);
    let extra = format!(r#"enrolment = {{ tenant = "fleet", client_id = "{client_id}" }}"#);
    let mut agent = Agent::configure_with(&tern, &Signer::new().public_key(), &mqtt, &extra);
    let (enrolling, code) = enroll_by_code(&agent);
    let enrolments = "/api/v1/tenants/fleet/enrolments";

    // Without the admin scope: refused.
    let writer = tern.cli_json(&[
        "client",
        "create",
        "--tenant",
        "fleet",
        "--name",
        "writer",
        "--grant",
        "client_credentials",
        "--scope",
        "tern:read tern:write",
    ]);
    let token = tern
        .client_token("fleet", &writer, "tern:read tern:write")
        .await;
    let body = json!({"user_code": code, "device": "kitchen-pi"});
    let (status, answer) = tern
        .send_json(reqwest::Method::POST, &token, enrolments, &body)
        .await;
    assert_eq!(status, 403, "{answer}");

    // An existing device's credentials also need manageDeviceTokens on it.
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("keep-test-devices.cedar");
    std::fs::write(
        &policy,
        "forbid (principal, action == Action::\"manageDeviceTokens\", resource)\n\
         when { resource.hasTag(\"site\") && resource.getTag(\"site\") == \"test\" };\n",
    )
    .expect("policy");
    let policy = policy.display().to_string();
    tern.cli_json(&[
        "policy",
        "put",
        "keep-test-devices",
        &policy,
        "--tenant",
        "fleet",
    ]);
    let body = json!({"user_code": code, "device": "existing-pi"});
    let (status, answer) = tern
        .send_json(reqwest::Method::POST, &p.api_token, enrolments, &body)
        .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.to_string().contains("manageDeviceTokens"),
        "{answer}"
    );

    // A mistyped code creates nothing.
    let body = json!({"user_code": "BCDF-GHJK", "device": "typo-pi"});
    let (status, _) = tern
        .send_json(reqwest::Method::POST, &p.api_token, enrolments, &body)
        .await;
    assert_eq!(status, 404);
    let (status, _) = tern
        .get(&p.api_token, "/api/v1/tenants/fleet/devices/typo-pi")
        .await;
    assert_eq!(status, 404, "no device for a mistyped code");

    // The person approves from the CLI; the device is created with its label.
    let approved = tern.cli_json(&[
        "token",
        "approve",
        &code,
        "--device",
        "kitchen-pi",
        "--label",
        "site=berlin",
        "--tenant",
        "fleet",
    ]);
    assert_eq!(approved["created"], true, "{approved}");
    assert_eq!(approved["client"], "enrolment");
    let out = enrolling.wait_with_output().expect("enroll exits");
    assert!(out.status.success(), "enroll failed");
    let enrolled: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(enrolled["device_id"], approved["device_id"], "{enrolled}");
    let (_, device) = tern
        .get(&p.api_token, "/api/v1/tenants/fleet/devices/kitchen-pi")
        .await;
    assert_eq!(device["labels"]["site"], "berlin", "{device}");

    // The code is spent.
    let again = tern.cli(&[
        "token", "approve", &code, "--device", "other-pi", "--tenant", "fleet",
    ]);
    assert!(!again.status.success());

    // The agent runs on the credentials it received.
    agent.start();
    let kitchen = Provisioned {
        tenant: "fleet".into(),
        device_id: enrolled["device_id"].as_str().expect("id").to_string(),
        access_token: String::new(),
        api_token: p.api_token.clone(),
    };
    let points = tern.wait_points(&kitchen, "temp", 1).await;
    assert_eq!(points[0]["value"], 21.5, "log:\n{}", agent.log());
}

/// A TCP relay to `target` that cuts the first connection to carry more than `cut_after`
/// bytes back to the client, and notes whether a later request asked for a range.
struct CuttingRelay {
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ranged: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CuttingRelay {
    fn start(listener: tokio::net::TcpListener, target: u16, cut_after: usize) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let relay = Self {
            cut: Default::default(),
            ranged: Default::default(),
        };
        let (cut, ranged) = (relay.cut.clone(), relay.ranged.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (cut, ranged) = (cut.clone(), ranged.clone());
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                            let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                            if text.contains("range: bytes=") {
                                ranged.store(true, SeqCst);
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    let mut sent = 0;
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                        let n = if sent + n > cut_after && !cut.swap(true, SeqCst) {
                            // Part of it, then the connection is gone mid-body.
                            let _ = client_write.write_all(&buf[..cut_after - sent]).await;
                            break;
                        } else {
                            n
                        };
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        sent += n;
                    }
                    upstream.abort();
                });
            }
        });
        relay
    }
}

/// An update from Tern's own artifact store whose download is cut mid-way: the agent
/// resumes it with a range request and installs the whole artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_artifact_download_resumes_where_it_stopped() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let relay_url = format!(
        "http://localhost:{}",
        listener.local_addr().expect("addr").port()
    );
    // Devices reach the platform (and its artifact URLs) through the relay.
    let tern = Tern::start_with_env(&[
        ("TERN_OTA__CAMPAIGN_INTERVAL_MS", "200"),
        ("TERN_IDENTITY__PUBLIC_URL", &relay_url),
    ]);
    let relay = CuttingRelay::start(listener, tern.http_port, 100_000);
    let p = tern.provision("fleet", "resumer");
    let key = tern.cli_json(&["ota", "key", "--tenant", "fleet"]);
    let mut agent = Agent::configure(&tern, key["public_key"].as_str().expect("key"));
    agent.set_server(&relay_url);
    agent.enroll(&device_refresh_token(&tern, &p));
    agent.start();

    let mut firmware = b"healthy firmware 4.0\n".to_vec();
    firmware.extend((0..400_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("fw.bin");
    std::fs::write(&file, &firmware).expect("artifact");
    let artifact = tern.cli_json(&[
        "ota",
        "upload",
        file.to_str().expect("utf-8"),
        "--name",
        "fw",
        "--version",
        "4.0",
        "--tenant",
        "fleet",
    ]);
    let campaign = tern.cli_json(&[
        "ota",
        "campaign",
        "create",
        "--artifact",
        artifact["id"].as_str().expect("id"),
        "--selector",
        "site=test",
        "--tenant",
        "fleet",
    ]);
    let done = campaign_outcome(&tern, &p, campaign["id"].as_str().expect("id")).await;
    assert_eq!(done["state"], "completed", "{done}\n{}", agent.log());
    use std::sync::atomic::Ordering::SeqCst;
    assert!(relay.cut.load(SeqCst), "the download was cut");
    assert!(
        relay.ranged.load(SeqCst),
        "and resumed with a range request"
    );
    assert!(
        agent.log().contains("download interrupted"),
        "{}",
        agent.log()
    );
    let installed = std::fs::read(agent.root().join("current/artifact")).expect("installed");
    assert!(installed == firmware, "the whole artifact, byte for byte");
}
