//! Starting and stopping `tern up` (or one service, `tern bridge`, ...), running the CLI, and
//! MQTT helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde_json::Value;

pub const TERN: &str = env!("CARGO_BIN_EXE_tern");
/// Upper bound for anything the tests wait on (start-up, ingest); a bound, not a measurement.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub use tern_eventlog::testing::{free_port, free_ports};

pub fn free_udp_port() -> u16 {
    free_port()
}

/// Sends a synchronous `ping` command to `device_name` of tenant `acme` through the REST API
/// at `api` with `token`, answers it `{"pong": true}` from `device` (already subscribed to
/// `command/req/#`), and returns the command as the REST call answered it. The answer must end
/// the call's wait well before the call's own 120 s deadline.
pub async fn ping_round_trip(
    api: String,
    token: &str,
    device_name: &str,
    device: &mut Mqtt,
) -> Value {
    let url = format!("{api}/api/v1/tenants/acme/devices/{device_name}/commands");
    let request = {
        let token = token.to_string();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&serde_json::json!({"name": "ping", "wait_secs": 120}))
                .send()
                .await
                .expect("POST")
                .json::<Value>()
                .await
                .expect("JSON")
        })
    };
    let got = tokio::time::timeout(PATIENCE, device.received())
        .await
        .expect("the command reaches the device");
    let id = got.topic.split('/').nth(2).expect("command id").to_string();
    device
        .publish(&format!("command/res/{id}/200"), r#"{"pong": true}"#)
        .await;
    tokio::time::timeout(PATIENCE, request)
        .await
        .expect("the answer ends the wait")
        .expect("request")
}

/// A running `tern up` (or `tern {service}`) in its own data directory.
pub struct Tern {
    pub dir: tempfile::TempDir,
    /// `up`, or the service this process runs.
    command: &'static str,
    data_dir: PathBuf,
    pub mqtt_port: u16,
    /// UDP.
    pub coap_port: u16,
    pub http_port: u16,
    pub grpc_port: u16,
    /// Where MQTT over TLS and over WSS listen once a certificate is configured.
    pub mqtts_port: u16,
    pub wss_port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Tern {
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// Starts with extra `TERN_...` environment (configuration overrides).
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        Self::start_command("up", None, env)
    }

    /// Starts `tern {service}` alone. The services of one test share `data_dir` (the identity
    /// service writes the operator token there), as pods would share a mounted secret.
    pub fn start_service(service: &'static str, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_command(service, Some(data_dir), env)
    }

    fn start_command(command: &'static str, data_dir: Option<&Path>, env: &[(&str, &str)]) -> Self {
        let [mqtt_port, http_port, grpc_port, mqtts_port, wss_port] = free_ports();
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // The TLS listeners start only with a certificate; then they must not collide either.
        // Tests read them from `mqtts_port` / `wss_port` (picked with the others, all distinct).
        for (key, port) in [("TERN_MQTTS_PORT", mqtts_port), ("TERN_WSS_PORT", wss_port)] {
            assert!(
                !env.iter().any(|(k, _)| k == key),
                "use Tern::{} instead of setting {key}",
                key.trim_start_matches("TERN_").to_lowercase()
            );
            env.push((key.to_string(), port.to_string()));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = data_dir.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let mut tern = Self {
            dir,
            command,
            data_dir,
            mqtt_port,
            coap_port: free_udp_port(),
            http_port,
            grpc_port,
            mqtts_port,
            wss_port,
            env,
            child: None,
        };
        tern.spawn();
        tern
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tern.log"))
            .expect("log file");
        let child = Command::new(TERN)
            .args([self.command, "--bind", "127.0.0.1"])
            .args(["--data-dir", self.data_dir().to_str().expect("utf-8 path")])
            .args(["--mqtt-port", &self.mqtt_port.to_string()])
            .args(["--coap-port", &self.coap_port.to_string()])
            .args(["--http-port", &self.http_port.to_string()])
            .args(["--grpc-port", &self.grpc_port.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn tern {}: {e}", self.command));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        let url = format!("{}/readyz", self.http());
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "tern {} exited during start-up with {status}; log:\n{}",
                    self.command,
                    self.log()
                );
            }
            if probe_status(&url).ok() == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "tern {} did not become ready; log:\n{}",
            self.command,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tern.log")).unwrap_or_default()
    }

    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Sends SIGTERM and waits for the process; returns whether it exited with 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the process gets no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        assert!(self.stop(), "clean exit expected; log:\n{}", self.log());
        self.start_again();
    }

    /// Starts the server again on the same ports and data after [`Tern::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Runs the CLI against this server with the operator token file.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(TERN)
            .args(args)
            .env("TERN_SERVER", self.http())
            .env("TERN_TOKEN_FILE", self.data_dir().join("admin.token"))
            .env_remove("TERN_TOKEN")
            .env_remove("TERN_TENANT")
            .output()
            .expect("run the CLI")
    }

    /// Runs the CLI with `--output json` and parses the result; panics with stderr on failure.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "tern {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    pub fn operator_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin.token"))
            .expect("operator token")
            .trim()
            .to_string()
    }

    /// Creates tenant `tenant` with device `device`; returns (device id, access token, API token).
    pub fn provision(&self, tenant: &str, device: &str) -> Provisioned {
        if !self.cli(&["tenant", "show", tenant]).status.success() {
            self.cli_json(&["tenant", "create", tenant]);
        }
        let d = self.cli_json(&[
            "device",
            "create",
            device,
            "--tenant",
            tenant,
            "--label",
            "site=test",
        ]);
        let tokens = self.cli_json(&["token", "device", device, "--tenant", tenant]);
        let api = self.cli_json(&["token", "api", "--tenant", tenant, "--name", "tests"]);
        Provisioned {
            tenant: tenant.to_string(),
            device_id: d["id"].as_str().expect("id").to_string(),
            access_token: tokens["access_token"]
                .as_str()
                .expect("access token")
                .to_string(),
            api_token: api["token"].as_str().expect("api token").to_string(),
        }
    }

    /// An access token of an OAuth client (`{"client_id", "client_secret"}`, as `tern client
    /// create` prints it) by the client credentials grant.
    pub async fn client_token(&self, tenant: &str, client: &Value, scope: &str) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/oauth2/{tenant}/token", self.http()))
            .basic_auth(
                client["client_id"].as_str().expect("id"),
                client["client_secret"].as_str(),
            )
            .form(&[("grant_type", "client_credentials"), ("scope", scope)])
            .send()
            .await
            .expect("token request");
        assert_eq!(r.headers()["cache-control"], "no-store");
        let body: Value = r.json().await.expect("json");
        body["access_token"]
            .as_str()
            .expect("access token")
            .to_string()
    }

    /// `/metrics`, as Prometheus's text format.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http()))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("text")
    }

    /// A sample from `/metrics`: the value on the line that starts with `series` (name and
    /// labels, as Prometheus's text format writes them).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// GET a REST path with a bearer token; returns status and JSON body.
    pub async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.http()))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A REST call with a JSON body and a bearer token; returns status and JSON body (null
    /// when the answer has none).
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: &Value,
    ) -> (u16, Value) {
        let r = reqwest::Client::new()
            .request(method, format!("{}{path}", self.http()))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the device has at least `n` points of `metric`; returns them.
    pub async fn wait_points(&self, p: &Provisioned, metric: &str, n: usize) -> Vec<Value> {
        let path = format!(
            "/api/v1/tenants/{}/devices/{}/telemetry?metric={metric}&from=0&limit=10000",
            p.tenant, p.device_id
        );
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, body) = self.get(&p.api_token, &path).await;
            assert_eq!(status, 200, "{body}");
            let points = body["points"].as_array().cloned().unwrap_or_default();
            if points.len() >= n || Instant::now() > deadline {
                return points;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the rollups hold `n` points in all (they trail raw points by about a
    /// second); returns how many they hold.
    pub async fn wait_rollup_points(&self, n: u64) -> u64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let merged = self
                .metric("tern_analytics_rollup_points_total")
                .await
                .unwrap_or(0.0) as u64;
            if merged >= n || Instant::now() > deadline {
                return merged;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A PUBLISH as a subscriber saw it.
#[derive(Debug, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: String,
    pub qos: QoS,
    pub retain: bool,
}

impl Received {
    pub fn triple(&self) -> (&str, &str, QoS) {
        (&self.topic, &self.payload, self.qos)
    }
}

#[derive(Clone)]
pub struct Provisioned {
    pub tenant: String,
    pub device_id: String,
    pub access_token: String,
    pub api_token: String,
}

/// A connected rumqttc client; the event loop is driven by [`Mqtt::poll`] or a spawned task.
pub struct Mqtt {
    pub client: AsyncClient,
    pub events: EventLoop,
}

impl Mqtt {
    pub fn options(port: u16, device_id: &str, token: &str) -> MqttOptions {
        let mut options = MqttOptions::new(device_id, "127.0.0.1", port);
        options.set_credentials(device_id, token);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        options
    }

    /// Connects and waits for CONNACK; the error is the refusal.
    pub async fn connect(options: MqttOptions) -> Result<Self, rumqttc::ConnectionError> {
        let (client, mut events) = AsyncClient::new(options, 100);
        loop {
            match tokio::time::timeout(PATIENCE, events.poll())
                .await
                .expect("CONNACK in time")?
            {
                Event::Incoming(Packet::ConnAck(_)) => return Ok(Self { client, events }),
                _ => continue,
            }
        }
    }

    /// Connects as a provisioned device.
    pub async fn device(tern: &Tern, p: &Provisioned) -> Self {
        Self::connect(Self::options(tern.mqtt_port, &p.device_id, &p.access_token))
            .await
            .expect("connect")
    }

    /// The next event; panics if the connection fails or nothing comes in time.
    pub async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(15), self.events.poll())
            .await
            .expect("an event in time")
            .expect("connection alive")
    }

    /// Subscribes and waits for the SUBACK; returns its return codes. Publishes that arrive
    /// meanwhile are a failure: the server sends retained messages after the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue subscribe");
        loop {
            match self.next().await {
                Event::Incoming(Packet::SubAck(ack)) => return ack.return_codes,
                Event::Incoming(Packet::Publish(p)) => {
                    panic!("PUBLISH on {} before the SUBACK", p.topic)
                }
                _ => {}
            }
        }
    }

    /// The next PUBLISH received.
    pub async fn received(&mut self) -> Received {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = self.next().await {
                return Received {
                    topic: p.topic,
                    payload: String::from_utf8_lossy(&p.payload).into_owned(),
                    qos: p.qos,
                    retain: p.retain,
                };
            }
        }
    }

    /// Publishes QoS 1 and drives the connection until its PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: &str) {
        self.publish_retained(topic, payload, false).await;
    }

    /// Publishes QoS 1 with the given retain flag and waits for its PUBACK.
    pub async fn publish_retained(&mut self, topic: &str, payload: &str, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_string())
            .await
            .expect("queue publish");
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = self.next().await {
                return;
            }
        }
    }

    /// Asserts that the next PUBLISH is `marker` on `topic`: publishes `marker` from `from` and
    /// reads until it arrives, failing on anything else first. Proves that nothing else was
    /// delivered in between, without sleeping.
    pub async fn expect_only_marker(&mut self, from: &mut Mqtt, topic: &str) {
        from.publish(topic, "marker").await;
        let got = self.received().await;
        assert_eq!(
            (got.topic.as_str(), got.payload.as_str()),
            (topic, "marker"),
            "expected nothing before the marker"
        );
    }

    /// Publishes QoS 1 and expects the server to refuse it the MQTT 3.1.1 way: by closing the
    /// connection, never with a PUBACK.
    pub async fn publish_expecting_close(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .expect("queue publish");
        loop {
            match tokio::time::timeout(PATIENCE, self.events.poll())
                .await
                .expect("closed in time")
            {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    panic!("the publish to {topic} was acknowledged, not refused")
                }
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    }

    /// Publishes `n` QoS 1 messages and waits for all their PUBACKs.
    pub async fn publish_acked(&mut self, topic: &str, payloads: Vec<Vec<u8>>) {
        let n = payloads.len();
        let client = self.client.clone();
        let topic = topic.to_string();
        let sender = tokio::spawn(async move {
            for p in payloads {
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, p)
                    .await
                    .expect("queue publish");
            }
        });
        let mut acked = 0;
        while acked < n {
            match tokio::time::timeout(PATIENCE, self.events.poll())
                .await
                .expect("PUBACK in time")
            {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("connection failed after {acked} of {n} acks: {e}"),
            }
        }
        sender.await.expect("sender");
    }
}

/// Runs Debian's mosquitto_pub; the Makefile installs it.
pub fn mosquitto_pub(
    port: u16,
    device_id: &str,
    token: &str,
    topic: &str,
    message: &str,
) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-i", device_id, "-u", device_id, "-P", token])
        .args(["-q", "1", "-t", topic, "-m", message])
        .output()
        .expect("mosquitto_pub must be installed (make deps)")
}

/// The status code of a GET, by hand over TCP: readiness is polled from synchronous code, and
/// this avoids pulling in reqwest's blocking client for it.
fn probe_status(url: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))
}

/// The values of points returned by [`Tern::wait_points`], in order.
pub fn values(points: &[Value]) -> Vec<f64> {
    points
        .iter()
        .map(|p| p["value"].as_f64().expect("value"))
        .collect()
}

/// Runs `interop/paho_websocket.py` (Eclipse Paho from Debian's python3-paho-mqtt) as device
/// `p` against `port` over WebSocket, or over WSS trusting `ca`; panics with its output if it
/// fails.
pub fn paho_websocket(port: u16, p: &Provisioned, ca: Option<&std::path::Path>) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/interop/paho_websocket.py"
    );
    let out = tokio::task::block_in_place(|| {
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script)
            .arg(port.to_string())
            .args([&p.device_id, &p.access_token]);
        if let Some(ca) = ca {
            cmd.arg(ca);
        }
        cmd.output()
            .expect("run /usr/bin/python3 (make deps installs python3-paho-mqtt)")
    });
    assert!(
        out.status.success(),
        "paho: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// tern-sim's arguments against the broker on `port` (the plain MQTT port or the TLS one),
/// provisioning in tenant `sim` with the operator token, and `extra`.
pub fn sim_args(tern: &Tern, port: u16, extra: &[&str]) -> tern_sim::Args {
    use clap::Parser;
    let (token, server) = (tern.operator_token(), tern.http());
    let broker = format!("127.0.0.1:{port}");
    let mut args = vec!["tern-sim", "--broker", &broker, "--tern-server", &server];
    args.extend(["--tern-token", &token, "--tern-tenant", "sim"]);
    args.extend_from_slice(extra);
    tern_sim::Args::parse_from(args)
}

/// Runs tern-sim and checks that it reported no errors and that every publish (at least one)
/// was acknowledged; returns the report and the number acknowledged.
pub async fn run_sim_all_acked(args: tern_sim::Args) -> (Value, u64) {
    let report = tern_sim::run(args).await.expect("simulation");
    assert_eq!(
        report["errors"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    let acked = report["acked"].as_u64().expect("acked");
    assert!(
        acked > 0 && acked == report["sent"].as_u64().expect("sent"),
        "{report}"
    );
    (report, acked)
}
