//! A lean MQTT client shared by the fleet simulator and the device agent: one connection,
//! packets pushed into an outbox and flushed in batches, read back one at a time. It uses the
//! same codec as the bridge; MQTT 3.1.1, or MQTT 5 on the wire (`mqtt5.rs` translates).
//! Over TCP or TLS, either of them as a WebSocket.

mod mqtt5;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Publish, Subscribe};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

pub const MAX_PACKET: usize = 16 * 1024 * 1024;

pub struct Credentials {
    pub client_id: String,
    pub login: Option<(String, String)>,
}

pub struct Reader {
    half: Box<dyn AsyncRead + Send + Unpin>,
    inbox: BytesMut,
    mqtt5: bool,
}

pub struct Writer {
    half: Box<dyn AsyncWrite + Send + Unpin>,
    pub outbox: BytesMut,
    mqtt5: bool,
}

/// The broker's CONNACK refused the connection; `connect`'s error downcasts to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub ConnectReturnCode);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection refused: {:?}", self.0)
    }
}

impl std::error::Error for Refused {}

/// TLS towards the broker: a connector trusting the given CAs, and the name to verify.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl Tls {
    /// Trusts the operating system's certificate store (on Linux, the CA bundle).
    pub fn system(server_name: &str) -> anyhow::Result<Self> {
        use rustls_platform_verifier::BuilderVerifierExt;
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_platform_verifier()?
            .with_no_client_auth();
        Self::with_config(config, server_name)
    }

    fn with_config(config: ClientConfig, server_name: &str) -> anyhow::Result<Self> {
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: ServerName::try_from(server_name.to_string())
                .with_context(|| format!("bad TLS server name {server_name:?}"))?,
        })
    }

    /// Trusts the CAs in the PEM file `ca`.
    pub fn new(ca: &Path, server_name: &str) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("cannot read {}", ca.display()))?
        {
            roots.add(cert.with_context(|| format!("bad certificate in {}", ca.display()))?)?;
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self::with_config(config, server_name)
    }
}

type Halves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

/// Upgrades a connection to a WebSocket at `/mqtt` (subprotocol `mqtt`) and turns its binary
/// messages back into a byte stream, so the MQTT codec runs unchanged: two small tasks pump
/// between the WebSocket and an in-memory pipe.
async fn over_websocket<S>(stream: S, scheme: &str, broker: SocketAddr) -> anyhow::Result<Halves>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let mut request = format!("{scheme}://{broker}/mqtt").into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse()?);
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .with_context(|| format!("WebSocket upgrade with {broker}"))?;
    let (mut sink, mut source) = ws.split();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_codec, mut to_codec) = tokio::io::split(theirs);
    tokio::spawn(async move {
        while let Some(Ok(message)) = source.next().await {
            let written = match message {
                Message::Binary(bytes) => to_codec.write_all(&bytes).await,
                Message::Close(_) => break,
                _ => Ok(()),
            };
            if written.is_err() {
                break;
            }
        }
        let _ = to_codec.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let n = match from_codec.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if sink
                .send(Message::Binary(buffer[..n].to_vec().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let (r, w) = tokio::io::split(ours);
    Ok((Box::new(r), Box::new(w)))
}

/// Opens a TCP connection (from `source`, when given, so one machine can exceed the ephemeral
/// port range of a single address), sends CONNECT and waits for CONNACK.
pub async fn connect(
    broker: SocketAddr,
    source: Option<IpAddr>,
    credentials: &Credentials,
    keepalive_secs: u16,
    mqtt5: bool,
    tls: Option<&Tls>,
    websocket: bool,
) -> anyhow::Result<(Reader, Writer)> {
    let socket = if broker.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("bind {source}"))?;
    }
    let stream = socket
        .connect(broker)
        .await
        .with_context(|| format!("connect {broker}"))?;
    stream.set_nodelay(true)?;
    let (half_r, half_w): Halves = match (tls, websocket) {
        (None, false) => {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
        (None, true) => over_websocket(stream, "ws", broker).await?,
        (Some(tls), websocket) => {
            let stream = tls
                .connector
                .connect(tls.server_name.clone(), stream)
                .await
                .with_context(|| format!("TLS handshake with {broker}"))?;
            if websocket {
                over_websocket(stream, "wss", broker).await?
            } else {
                let (r, w) = tokio::io::split(stream);
                (Box::new(r), Box::new(w))
            }
        }
    };
    let mut reader = Reader {
        half: half_r,
        inbox: BytesMut::with_capacity(4096),
        mqtt5,
    };
    let mut writer = Writer {
        half: half_w,
        outbox: BytesMut::with_capacity(4096),
        mqtt5,
    };
    let mut connect = Connect::new(credentials.client_id.clone());
    connect.keep_alive = keepalive_secs;
    if let Some((user, pass)) = &credentials.login {
        connect.set_login(user.clone(), pass.clone());
    }
    writer.push(&Packet::Connect(connect))?;
    writer.flush().await?;
    match reader.next().await? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok((reader, writer)),
        Packet::ConnAck(ack) => Err(Refused(ack.code).into()),
        other => bail!("expected CONNACK, got {other:?}"),
    }
}

impl Reader {
    pub async fn next(&mut self) -> anyhow::Result<Packet> {
        loop {
            if self.mqtt5 {
                if let Some(packet) = mqtt5::read(&mut self.inbox, MAX_PACKET)? {
                    return Ok(packet);
                }
                if self.half.read_buf(&mut self.inbox).await? == 0 {
                    bail!("connection closed by the broker");
                }
                continue;
            }
            match Packet::read(&mut self.inbox, MAX_PACKET) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if self.half.read_buf(&mut self.inbox).await? == 0 {
                        bail!("connection closed by the broker");
                    }
                }
                Err(e) => bail!("bad packet from the broker: {e}"),
            }
        }
    }
}

impl Writer {
    /// Encodes a packet into the outbox; nothing is sent until [`Writer::flush`].
    pub fn push(&mut self, packet: &Packet) -> anyhow::Result<()> {
        if self.mqtt5 {
            return mqtt5::write(packet, &mut self.outbox, MAX_PACKET);
        }
        packet.write(&mut self.outbox, MAX_PACKET)?;
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.outbox.is_empty() {
            self.half.write_all(&self.outbox).await?;
            // TLS holds written bytes until flushed.
            self.half.flush().await?;
            self.outbox.clear();
        }
        Ok(())
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        let mut subscribe = Subscribe::new(filter, qos);
        subscribe.pkid = 1;
        self.push(&Packet::Subscribe(subscribe))?;
        self.flush().await
    }

    pub async fn disconnect(mut self) {
        let _ = self.push(&Packet::Disconnect);
        let _ = self.flush().await;
        let _ = self.half.shutdown().await;
    }
}

/// A PUBLISH with the given packet id.
pub fn publish(topic: &str, qos: QoS, pkid: u16, payload: Vec<u8>) -> Packet {
    let mut p = Publish::new(topic, qos, payload);
    p.pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
    Packet::Publish(p)
}

/// Microseconds since `start`, for histograms.
pub fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros().min(u128::from(u64::MAX)) as u64
}
