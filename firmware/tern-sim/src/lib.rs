//! The fleet simulator: many MQTT devices against Tern or any MQTT broker, reporting throughput
//! and latency (HDR histograms) as JSON. The `tern-sim` binary is a thin wrapper around [`run`].

mod commander;
mod provision;
mod stats;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, PubRel};
use serde_json::json;
use tokio::sync::watch;

use crate::stats::{DeviceStats, own_cpu_seconds, summary};
use tern_mqtt_client::{Credentials, micros_since, publish};

/// What to simulate (the `tern-sim` command line).
#[derive(Parser, Clone)]
#[command(
    name = "tern-sim",
    version,
    about = "Simulate a fleet of MQTT devices and measure the broker"
)]
pub struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker: SocketAddr,
    /// Publishing devices.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Subscribers (each subscribes to --sub-topic).
    #[arg(long, default_value_t = 0)]
    pub subscribers: usize,
    #[arg(long, default_value = "bench/#")]
    pub sub_topic: String,
    /// Publish QoS: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Messages per second per device; 0 = as fast as the in-flight window allows. Paced
    /// devices are spread evenly over one interval (not all in phase).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Unacknowledged publishes per device (QoS 1/2), or the write batch for QoS 0.
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_size: usize,
    #[arg(long, value_enum, default_value_t = PayloadShape::Json)]
    pub payload: PayloadShape,
    /// Topic; `{device}` is replaced by the device's index.
    #[arg(long, default_value = "telemetry")]
    pub topic: String,
    /// Seconds of measurement once every device is connected.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// New connections per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    /// Connect and hold the connections (pinging) without publishing.
    #[arg(long)]
    pub idle: bool,
    /// Speak MQTT 5 instead of 3.1.1.
    #[arg(long)]
    pub mqtt5: bool,
    /// Connect over TLS, trusting the CA certificates in this PEM file.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// The name the broker's certificate must carry (with --tls-ca).
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,
    /// Speak MQTT over WebSocket (`/mqtt`, subprotocol `mqtt`): point --broker at the HTTP
    /// port (with --tls-ca: WSS at the WSS port).
    #[arg(long)]
    pub websocket: bool,
    /// Built from --tls-ca once, shared by every connection.
    #[arg(skip)]
    pub tls: Option<tern_mqtt_client::Tls>,
    /// Spread connections over 127.0.0.1..=127.0.0.N to exceed one address's port range.
    #[arg(long, default_value_t = 1)]
    pub source_addrs: u8,
    /// Provision devices in Tern through this API URL (with --tern-token).
    #[arg(long)]
    pub tern_server: Option<String>,
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub tern_token: Option<String>,
    #[arg(long, default_value = "sim")]
    pub tern_tenant: String,
    /// Credentials for brokers without Tern provisioning.
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    /// Worker threads of the generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Name of the scenario in the report.
    #[arg(long, default_value = "custom")]
    pub label: String,
    /// Also write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Publishing devices also subscribe to `command/req/#` and answer every Tern command on
    /// `command/res/{id}/200` (QoS 0), echoing its payload.
    #[arg(long)]
    pub answer_commands: bool,
    /// Send this many Tern commands per second (REST, synchronous) to random devices while
    /// measuring, and report the round trip. Needs --tern-server and --answer-commands.
    #[arg(long, default_value_t = 0.0)]
    pub command_rate: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PayloadShape {
    /// `{"value": …, "pad": "…"}`: Tern stores `value` as a time series.
    Json,
    /// 8-byte send timestamp (ns since the epoch) then padding: lets subscribers measure latency.
    Binary,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Connecting,
    Running,
    Draining,
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn payload(shape: PayloadShape, size: usize, seq: u64) -> Vec<u8> {
    match shape {
        PayloadShape::Binary => {
            let mut p = now_ns().to_be_bytes().to_vec();
            p.resize(size.max(8), b'x');
            p
        }
        PayloadShape::Json => {
            let head = format!(r#"{{"value":{}.5,"pad":""#, seq % 1000);
            let pad = size.saturating_sub(head.len() + 2);
            format!("{head}{}\"}}", "x".repeat(pad)).into_bytes()
        }
    }
}

/// Connects device `index` the way the arguments say (version, TLS, WebSocket, source address).
async fn connect(
    args: &Args,
    index: usize,
    creds: &Credentials,
) -> anyhow::Result<(tern_mqtt_client::Reader, tern_mqtt_client::Writer)> {
    let source = source(args, index);
    tern_mqtt_client::connect(
        args.broker,
        source,
        creds,
        args.keepalive,
        args.mqtt5,
        args.tls.as_ref(),
        args.websocket,
    )
    .await
}

fn source(args: &Args, i: usize) -> Option<IpAddr> {
    (args.source_addrs > 1).then(|| {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % args.source_addrs as usize) as u8,
        ))
    })
}

/// Runs the simulation and returns the JSON report.
pub async fn run(mut args: Args) -> anyhow::Result<serde_json::Value> {
    if let Some(ca) = &args.tls_ca {
        args.tls = Some(tern_mqtt_client::Tls::new(ca, &args.tls_server_name)?);
    }
    let args = Arc::new(args);
    let provision_started = Instant::now();
    // Publishers first, then subscribers: in Tern every client is a provisioned device.
    let anonymous = |name: String| Credentials {
        client_id: name,
        login: args
            .username
            .clone()
            .map(|u| (u, args.password.clone().unwrap_or_default())),
    };
    if args.command_rate > 0.0 && (!args.answer_commands || args.tern_server.is_none()) {
        anyhow::bail!("--command-rate needs --answer-commands and --tern-server");
    }
    let mut api = None;
    let (credentials, mut subscriber_credentials): (Vec<Credentials>, Vec<Credentials>) =
        match (&args.tern_server, &args.tern_token) {
            (Some(server), Some(token)) => {
                let tern = Arc::new(provision::Api::new(server, token)?);
                api = Some(tern.clone());
                let api = tern;
                let mut devices: Vec<Credentials> = api
                    .provision(&args.tern_tenant, "sim", args.devices + args.subscribers)
                    .await?
                    .into_iter()
                    .map(|d| Credentials {
                        client_id: d.id.clone(),
                        login: Some((d.id, d.token)),
                    })
                    .collect();
                let subscribers = devices.split_off(args.devices);
                (devices, subscribers)
            }
            (Some(_), None) => anyhow::bail!("--tern-server needs --tern-token (or TERN_TOKEN)"),
            _ => (
                (0..args.devices)
                    .map(|i| anonymous(format!("sim-{i}")))
                    .collect(),
                (0..args.subscribers)
                    .map(|i| anonymous(format!("sim-sub-{i}")))
                    .collect(),
            ),
        };

    let provision_seconds = provision_started.elapsed().as_secs_f64();
    // A phase marker for whoever watches the run (the benchmark samples server memory here).
    eprintln!(
        "provisioned {} clients in {provision_seconds:.1} s",
        args.devices + args.subscribers
    );
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let mut subscribers = Vec::new();
    // Each subscriber reports whether it subscribed; failures are counted, not fatal.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(args.subscribers.max(1));
    let subscribe_started = Instant::now();
    for (i, creds) in subscriber_credentials.drain(..).enumerate() {
        ramp_wait(&args, subscribe_started, i).await;
        let (args, phase, ready) = (args.clone(), phase_rx.clone(), ready_tx.clone());
        subscribers.push(tokio::spawn(async move {
            subscriber(args, i, creds, phase, ready).await
        }));
    }
    drop(ready_tx);
    let mut subscribed = 0;
    for _ in 0..args.subscribers {
        if ready_rx.recv().await == Some(true) {
            subscribed += 1;
        }
    }
    if args.subscribers > 0 && subscribed == 0 {
        anyhow::bail!("no subscriber could subscribe");
    }

    let device_ids: Vec<String> = credentials.iter().map(|c| c.client_id.clone()).collect();
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel::<()>(args.devices.max(1));
    let mut publishers = Vec::with_capacity(args.devices);
    let connect_started = Instant::now();
    for (i, creds) in credentials.into_iter().enumerate() {
        ramp_wait(&args, connect_started, i).await;
        let (args, phase, connected) = (args.clone(), phase_rx.clone(), connected_tx.clone());
        publishers.push(tokio::spawn(async move {
            publisher(args, i, creds, phase, connected).await
        }));
    }
    drop(connected_tx);
    for _ in 0..args.devices {
        if connected_rx.recv().await.is_none() {
            break;
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();

    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    phase_tx.send_replace(Phase::Running);
    let measurement = Duration::from_secs_f64(args.duration);
    let commands = match &api {
        Some(api) if args.command_rate > 0.0 => Some(
            commander::run(
                api.clone(),
                &args.tern_tenant,
                &device_ids,
                args.command_rate,
                measurement,
            )
            .await,
        ),
        _ => {
            tokio::time::sleep(measurement).await;
            None
        }
    };
    phase_tx.send_replace(Phase::Draining);
    let measured = started.elapsed().as_secs_f64();
    let cpu_used = own_cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);

    let mut total = DeviceStats::new();
    let mut in_window = 0u64;
    for task in publishers {
        let (stats, acked_in_window) = task.await?;
        in_window += acked_in_window;
        total.merge(stats);
    }
    // Subscribers get a moment to receive what is still on its way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    phase_tx.send_replace(Phase::Draining);
    for task in subscribers {
        total.merge(task.await?);
    }
    let connected = args.devices as u64 - total.connect_failures;
    Ok(json!({
        "label": args.label,
        "broker": args.broker.to_string(),
        "devices": args.devices,
        "connected": connected,
        "subscribers": args.subscribers,
        "subscribed": subscribed,
        "qos": args.qos,
        "payload_size": args.payload_size,
        "rate_per_device": args.rate,
        "duration_s": measured,
        "provision_s": provision_seconds,
        "connect_phase_s": connect_seconds,
        "connects_per_s": if connect_seconds > 0.0 { connected as f64 / connect_seconds } else { 0.0 },
        "sent": total.sent,
        "acked": total.acked,
        "received": total.received,
        // QoS 0 has no acknowledgements: its rate is what was written.
        "throughput_msgs_per_s": if args.qos == 0 { total.sent as f64 / measured } else { in_window as f64 / measured },
        "receive_rate_msgs_per_s": total.received as f64 / measured,
        "ack_latency": summary(&total.ack_us),
        "end_to_end_latency": summary(&total.e2e_us),
        "connect_latency": summary(&total.connect_us),
        "commands": commands,
        "connect_failures": total.connect_failures,
        "errors": total.errors,
        "generator_cpu_s": cpu_used,
        "generator_cpu_percent_of_one_core": cpu_used.map(|c| 100.0 * c / measured),
    }))
}

/// With `--ramp`, connection `i` starts at `i / ramp` seconds after `start`. Timers tick in
/// milliseconds, so this sleeps until the connection is due and lets every due one start.
async fn ramp_wait(args: &Args, start: Instant, i: usize) {
    if args.ramp > 0.0 {
        let due = start + Duration::from_secs_f64(i as f64 / args.ramp);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// One publishing device. Returns its stats and how many acknowledgements arrived while the
/// measurement ran.
async fn publisher(
    args: Arc<Args>,
    index: usize,
    creds: Credentials,
    mut phase: watch::Receiver<Phase>,
    connected: tokio::sync::mpsc::Sender<()>,
) -> (DeviceStats, u64) {
    let mut stats = DeviceStats::new();
    let began = Instant::now();
    let connection = connect(&args, index, &creds).await;
    if let (Ok(_), Some(h)) = (&connection, stats.connect_us.as_mut()) {
        let _ = h.record(micros_since(began).max(1));
    }
    // A device that answers commands subscribes to them before the measurement starts, as a
    // device does right after connecting: commands sent meanwhile would wait for it.
    let connection = match connection {
        Ok((mut reader, mut writer)) if args.answer_commands => {
            subscribe(&mut reader, &mut writer, "command/req/#", QoS::AtLeastOnce)
                .await
                .map(|()| (reader, writer))
        }
        other => other,
    };
    let _ = connected.send(()).await;
    let (mut reader, mut writer) = match connection {
        Ok(c) => c,
        Err(e) => {
            stats.connect_failures += 1;
            stats.errors.push(format!("device {index}: {e:#}"));
            return (stats, 0);
        }
    };
    while *phase.borrow_and_update() == Phase::Connecting {
        if phase.changed().await.is_err() {
            return (stats, 0);
        }
    }
    let topic = args.topic.replace("{device}", &index.to_string());
    let qos = qos(args.qos);
    let window = args.inflight.max(1);
    // Send time per in-flight slot; packet ids cycle through the window (acks arrive in order).
    let mut sent_at: Vec<Instant> = vec![Instant::now(); window];
    let mut inflight = 0usize;
    let mut acked_in_window = 0u64;
    let mut seq = 0u64;
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let mut next_due = Instant::now()
        + interval.map_or(Duration::ZERO, |gap| phase_offset(gap, index, args.devices));
    let keepalive = Duration::from_secs(u64::from(args.keepalive.max(2)) / 2);
    let mut next_ping = Instant::now() + keepalive;
    let mut drain_deadline: Option<Instant> = None;

    loop {
        let running = *phase.borrow() == Phase::Running;
        if running && !args.idle {
            while inflight < window && interval.is_none_or(|_| Instant::now() >= next_due) {
                let slot = (seq % window as u64) as usize;
                let packet = publish(
                    &topic,
                    qos,
                    slot as u16 + 1,
                    payload(args.payload, args.payload_size, seq),
                );
                if writer.push(&packet).is_err() {
                    break;
                }
                sent_at[slot] = Instant::now();
                seq += 1;
                stats.sent += 1;
                if qos != QoS::AtMostOnce {
                    inflight += 1;
                }
                if let Some(gap) = interval {
                    next_due += gap;
                }
                if qos == QoS::AtMostOnce && writer.outbox.len() >= window * args.payload_size {
                    break;
                }
            }
        }
        if Instant::now() >= next_ping {
            let _ = writer.push(&Packet::PingReq);
            next_ping = Instant::now() + keepalive;
        }
        if let Err(e) = writer.flush().await {
            stats.errors.push(format!("device {index}: {e:#}"));
            break;
        }
        if *phase.borrow() == Phase::Draining {
            let deadline =
                *drain_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(10));
            if inflight == 0 || Instant::now() >= deadline {
                break;
            }
        }
        let wake = if qos == QoS::AtMostOnce && running && !args.idle && interval.is_none() {
            Instant::now()
        } else if running && interval.is_some() && inflight < window {
            next_due.min(next_ping)
        } else {
            next_ping
        };
        tokio::select! {
            packet = reader.next() => match packet {
                Ok(Packet::PubAck(PubAck { pkid })) | Ok(Packet::PubComp(rumqttc::mqttbytes::v4::PubComp { pkid })) => {
                    let slot = (usize::from(pkid) + window - 1) % window;
                    if let Some(h) = stats.ack_us.as_mut() {
                        let _ = h.record(micros_since(sent_at[slot]).max(1));
                    }
                    inflight = inflight.saturating_sub(1);
                    stats.acked += 1;
                    if *phase.borrow() == Phase::Running {
                        acked_in_window += 1;
                    }
                }
                Ok(Packet::PubRec(rec)) => {
                    let _ = writer.push(&Packet::PubRel(PubRel::new(rec.pkid)));
                }
                Ok(Packet::Publish(command)) => {
                    // A Tern command: acknowledge it and answer 200 with its payload.
                    if command.qos == QoS::AtLeastOnce {
                        let _ = writer.push(&Packet::PubAck(PubAck::new(command.pkid)));
                    }
                    if let Some(id) = command.topic.strip_prefix("command/req/").and_then(|r| r.split('/').next()) {
                        let response = format!("command/res/{id}/200");
                        let _ = writer.push(&publish(&response, QoS::AtMostOnce, 0, command.payload.to_vec()));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    stats.errors.push(format!("device {index}: {e:#}"));
                    break;
                }
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = phase.changed() => {}
        }
        if qos == QoS::AtMostOnce && running && interval.is_none() {
            tokio::task::yield_now().await;
        }
    }
    writer.disconnect().await;
    (stats, acked_in_window)
}

/// When paced device `index` of `devices` first publishes: spread evenly over one interval,
/// as a fleet that booted at different times is. All in phase, a thousand devices at 10 msg/s
/// arrive as a burst of a thousand every 100 ms, which measures the burst's queue rather than
/// the rate.
fn phase_offset(interval: Duration, index: usize, devices: usize) -> Duration {
    interval.mul_f64((index % devices.max(1)) as f64 / devices.max(1) as f64)
}

/// Subscribes and waits for the SUBACK.
async fn subscribe(
    reader: &mut tern_mqtt_client::Reader,
    writer: &mut tern_mqtt_client::Writer,
    filter: &str,
    qos: QoS,
) -> anyhow::Result<()> {
    writer.subscribe(filter, qos).await?;
    loop {
        if let Packet::SubAck(_) = reader.next().await? {
            return Ok(());
        }
    }
}

/// One subscriber: counts deliveries and, for binary payloads, the latency from the send
/// timestamp inside the payload.
async fn subscriber(
    args: Arc<Args>,
    index: usize,
    creds: Credentials,
    mut phase: watch::Receiver<Phase>,
    ready: tokio::sync::mpsc::Sender<bool>,
) -> DeviceStats {
    let mut stats = DeviceStats::new();
    let setup = async {
        let (mut reader, mut writer) = connect(&args, index, &creds).await?;
        subscribe(&mut reader, &mut writer, &args.sub_topic, qos(args.qos)).await?;
        anyhow::Ok((reader, writer))
    };
    let (mut reader, mut writer) = match setup.await {
        Ok(connection) => {
            let _ = ready.send(true).await;
            connection
        }
        Err(e) => {
            stats.errors.push(format!("subscriber {index}: {e:#}"));
            let _ = ready.send(false).await;
            return stats;
        }
    };
    loop {
        let grace = async {
            while *phase.borrow_and_update() != Phase::Draining {
                if phase.changed().await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        tokio::select! {
            packet = reader.next() => match packet {
                Ok(Packet::Publish(p)) => {
                    stats.received += 1;
                    if args.payload == PayloadShape::Binary && p.payload.len() >= 8 {
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&p.payload[..8]);
                        let latency_us = now_ns().saturating_sub(u64::from_be_bytes(ts)) / 1000;
                        if let Some(h) = stats.e2e_us.as_mut() {
                            let _ = h.record(latency_us.max(1));
                        }
                    }
                    if p.qos == QoS::AtLeastOnce {
                        let _ = writer.push(&Packet::PubAck(PubAck::new(p.pkid)));
                        let _ = writer.flush().await;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            },
            _ = grace => break,
        }
    }
    writer.disconnect().await;
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_devices_start_spread_over_one_interval() {
        let gap = Duration::from_millis(100);
        let offsets: Vec<_> = (0..4).map(|i| phase_offset(gap, i, 4)).collect();
        assert_eq!(
            offsets,
            [0, 25, 50, 75].map(Duration::from_millis).to_vec(),
            "a quarter of the interval apart"
        );
        assert_eq!(phase_offset(gap, 0, 0), Duration::ZERO);
    }

    #[test]
    fn payloads_have_the_requested_size_and_shape() {
        let json = payload(PayloadShape::Json, 100, 7);
        assert_eq!(json.len(), 100);
        let value: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
        assert_eq!(value["value"], 7.5);
        let binary = payload(PayloadShape::Binary, 100, 0);
        assert_eq!(binary.len(), 100);
        let ts = u64::from_be_bytes(binary[..8].try_into().expect("8 bytes"));
        assert!(ts > 0 && ts <= now_ns());
    }
}
