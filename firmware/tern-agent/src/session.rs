//! One MQTT connection to the platform: CONNECT with the device's access token, subscribe to
//! commands and the desired twin, then send the outbox in order (up to `MAX_INFLIGHT` QoS 1
//! publishes at a time; the platform acknowledges in order, so each PUBACK removes the oldest
//! in flight) and hand incoming commands and twin documents to their workers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, PubAck, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use serde_json::Value;
use tern_mqtt_client::{Credentials as Login, Reader, Tls, Writer};
use tokio::sync::mpsc;

use crate::Agent;
use crate::credentials::Credentials;

const MAX_INFLIGHT: usize = 32;
/// TCP, TLS and CONNACK together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// A command as the device received it.
#[derive(Debug)]
pub struct Command {
    pub id: String,
    pub name: String,
    pub payload: Vec<u8>,
}

/// How a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// CONNACK said the credentials are not good (expired, revoked, device disabled).
    #[error("the platform refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// Where incoming messages go.
pub struct Inbound {
    pub commands: mpsc::Sender<Command>,
    pub desired: mpsc::Sender<Value>,
}

async fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))
}

/// Runs one connection until it fails, or until `until` completes (then disconnects cleanly).
pub async fn run(
    agent: &Agent,
    credentials: &Credentials,
    inbound: &Inbound,
    until: impl Future<Output = ()>,
) -> Result<(), SessionError> {
    let config = agent.config();
    let endpoint = config.mqtt_endpoint()?;
    let broker = resolve(&endpoint.host, endpoint.port).await?;
    let tls = match (endpoint.tls, &config.ca_file) {
        (false, _) => None,
        (true, Some(ca)) => Some(Tls::new(ca, &endpoint.host)?),
        (true, None) => Some(Tls::system(&endpoint.host)?),
    };
    let login = Login {
        client_id: credentials.device_id.clone(),
        login: Some((
            credentials.device_id.clone(),
            credentials.access_token.clone(),
        )),
    };
    let connect = tern_mqtt_client::connect(
        broker,
        None,
        &login,
        config.keepalive_secs,
        false,
        tls.as_ref(),
        false,
    );
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no CONNACK within {CONNECT_TIMEOUT:?}")));
    let (reader, writer) = match connected {
        Ok(halves) => halves,
        Err(e) => {
            return Err(match e.downcast_ref::<tern_mqtt_client::Refused>() {
                Some(refused) => SessionError::Refused(refused.0),
                None => SessionError::Other(e),
            });
        }
    };
    tracing::info!(%broker, device = %credentials.device_id, "connected");
    serve(agent, inbound, reader, writer, until)
        .await
        .map_err(SessionError::Other)
}

async fn serve(
    agent: &Agent,
    inbound: &Inbound,
    mut reader: Reader,
    mut writer: Writer,
    until: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = agent.config();
    let mut next_pkid = PacketIds::default();
    let mut subscribe = Subscribe::new_many([
        SubscribeFilter::new("command/req/#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("twin/desired".into(), QoS::AtLeastOnce),
    ]);
    subscribe.pkid = next_pkid.next();
    writer.push(&Packet::Subscribe(subscribe))?;
    agent.report_state()?;

    let outbox = agent.outbox();
    let keepalive = Duration::from_secs(u64::from(config.keepalive_secs));
    let mut ping = tokio::time::interval(keepalive / 2);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    // (packet id, outbox sequence number), oldest first.
    let mut inflight: VecDeque<(u16, u64)> = VecDeque::new();
    let mut sent_up_to: Option<u64> = None;
    tokio::pin!(until);
    loop {
        // Registered before looking at the outbox, so no push in between is missed.
        let changed = outbox.changed();
        let room = MAX_INFLIGHT - inflight.len();
        if room > 0 {
            for message in outbox.after(sent_up_to, room) {
                let pkid = next_pkid.next();
                writer.push(&tern_mqtt_client::publish(
                    &message.topic,
                    QoS::AtLeastOnce,
                    pkid,
                    message.payload,
                ))?;
                inflight.push_back((pkid, message.seq));
                sent_up_to = Some(message.seq);
            }
        }
        writer.flush().await?;
        tokio::select! {
            packet = reader.next() => {
                last_heard = tokio::time::Instant::now();
                match packet? {
                    Packet::PubAck(ack) => {
                        match inflight.iter().position(|(pkid, _)| *pkid == ack.pkid) {
                            Some(at) => {
                                let (_, seq) = inflight.remove(at).expect("found");
                                outbox.remove(seq);
                            }
                            None => tracing::warn!(pkid = ack.pkid, "PUBACK for nothing in flight"),
                        }
                    }
                    Packet::Publish(publish) => {
                        if publish.qos != QoS::AtMostOnce {
                            writer.push(&Packet::PubAck(PubAck::new(publish.pkid)))?;
                        }
                        deliver(inbound, &publish.topic, publish.payload.to_vec()).await?;
                    }
                    Packet::SubAck(ack) => {
                        if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                            bail!("the platform refused the command or twin subscription");
                        }
                    }
                    Packet::PingResp => {}
                    Packet::Disconnect => bail!("the platform disconnected"),
                    other => tracing::debug!(?other, "ignored packet"),
                }
            }
            () = changed => {}
            _ = ping.tick() => {
                if last_heard.elapsed() > keepalive * 3 / 2 {
                    bail!("no answer from the platform within {keepalive:?}");
                }
                writer.push(&Packet::PingReq)?;
            }
            () = &mut until => {
                writer.disconnect().await;
                return Ok(());
            }
        }
    }
}

async fn deliver(inbound: &Inbound, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
    if topic == "twin/desired" {
        match serde_json::from_slice(&payload) {
            Ok(document) => inbound.desired.send(document).await?,
            Err(e) => tracing::warn!(error = %e, "desired twin is not JSON"),
        }
        return Ok(());
    }
    let Some((id, name)) = topic
        .strip_prefix("command/req/")
        .and_then(|rest| rest.split_once('/'))
    else {
        tracing::warn!(%topic, "unexpected publish");
        return Ok(());
    };
    inbound
        .commands
        .send(Command {
            id: id.to_string(),
            name: name.to_string(),
            payload,
        })
        .await?;
    Ok(())
}

/// MQTT packet ids: 1..=65535, then around again.
#[derive(Default)]
struct PacketIds(u16);

impl PacketIds {
    fn next(&mut self) -> u16 {
        self.0 = self.0.checked_add(1).unwrap_or(1);
        self.0
    }
}
