//! One MQTT connection (3.1.1 or 5): the handshake (`handshake.rs`), then the packet loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    Disconnect, DisconnectProperties, DisconnectReasonCode, LastWill, Packet, PingResp, PubAck,
    PubAckProperties, PubAckReason, PubComp, PubRec, PubRecProperties, PubRecReason, PubRel,
    Publish, PublishProperties, RetainForwardRule, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck, UnsubAckReason, Unsubscribe,
};
use tern_core::{CommandId, DeviceId, TenantId};
use tern_eventlog::{EventLog, LogError, Position, Record};
use tern_proto::v1::EventKind;
use tern_registry::RegistryError;
use tern_runtime::{Shutdown, otel};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tracing::Instrument;

use crate::Bridge;
use crate::codec::{self, Incoming, ReadError, Version};
use crate::commands::{
    self, TWIN_DESIRED_TOPIC, TWIN_REPORTED_TOPIC, is_command_topic, is_device_topic,
    is_twin_topic, parse_response_topic,
};
use crate::fanout::{ToRetain, hand_over, publish_will, retain_message, store_for_away};
use crate::handshake::{Admitted, TOKEN_AUTH_METHOD, TOPIC_ALIAS_MAX};
use crate::lifecycle;
use crate::metrics::ReasonLabel;
use crate::peers::ToPeers;
use crate::persistent::{Away, Leftovers, SavedSubscription};
use crate::policy;
use crate::quota::TokenBucket;
use crate::reauth::{self, AuthRequest};
use crate::router::{Delivery, Mailbox, Message, SubscriptionOptions, lower_qos};
use crate::topics::{InvalidTopic, parse_filter, validate_name};
use crate::traces;
use tern_eventlog::{EVENT_TOPIC, TELEMETRY_TOPIC, device_record as record};
use tern_identity::DeviceAuthError;

/// QoS 1 deliveries a client may have unacknowledged before the bridge waits for PUBACKs
/// (lower if the client's MQTT 5 Receive Maximum says so).
const OUTBOUND_WINDOW: usize = 64;

/// Bytes reserved for a read when the buffer runs low.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes reserved for the first read after the buffer was released.
const FIRST_READ: usize = 1024;

/// Publishes appended together (or a reply that must keep its place in the order of
/// acknowledgements), waiting for the durable append.
struct Pending {
    append: Option<JoinHandle<Result<Vec<Position>, LogError>>>,
    replies: Vec<Packet>,
    /// Retained messages or pending commands for a subscription, sent after its SUBACK.
    then_deliver: Vec<Delivery>,
    publishes: usize,
    received: Instant,
    /// The traced messages of the batch, ended when their acknowledgement is sent.
    _spans: Vec<tracing::Span>,
}

/// The packet loop's state between reads.
struct Flow {
    tenant: TenantId,
    device: DeviceId,
    inflight: VecDeque<Pending>,
    /// QoS 2 packet ids received and not yet released (PUBREL), for exactly-once.
    qos2: HashSet<u16>,
    /// Publishes parsed from the current read, appended as one batch.
    batch: Vec<Record>,
    batch_replies: Vec<Packet>,
    /// Spans of the traced messages in `batch` (only while traces are exported).
    batch_spans: Vec<tracing::Span>,
    /// Publishes received and not yet acknowledged (including the open batch).
    unacked: usize,
    /// This connection's id in the router.
    connection: u64,
    /// The queue of deliveries, created by the first SUBSCRIBE: a connection that never
    /// subscribes (most devices) allocates none.
    queue: Option<mpsc::Sender<Delivery>>,
    deliveries: Option<mpsc::Receiver<Delivery>>,
    /// Deliveries owed to new subscriptions (after their SUBACK), sent ahead of the queue.
    backlog: VecDeque<Delivery>,
    /// QoS 1 and 2 deliveries sent and not yet completed, by packet id.
    awaiting_ack: HashMap<u16, InFlight>,
    next_pkid: u16,
    /// At most this many QoS 1 deliveries unacknowledged.
    window: usize,
    /// Deliveries larger than this are dropped (the client's MQTT 5 Maximum Packet Size).
    client_max_packet: usize,
    /// MQTT 5 topic aliases the client set.
    aliases: HashMap<u16, Bytes>,
    /// `mqtt.max_publish_rate_per_device`, if set.
    bucket: Option<TokenBucket>,
    /// Not reading until then: the device is over its publish rate.
    paused_until: Option<Instant>,
    /// Seconds the session outlives the connection (0: it ends with it).
    session_expiry: u32,
    /// A persistent session's subscriptions, saved whenever they change; `None` for a clean
    /// session.
    saved: Option<Vec<SavedSubscription>>,
    /// With the `token` authentication method: the connection ends when its token expires,
    /// unless an AUTH brings a newer one first.
    token_expiry: Option<Instant>,
    /// The tenant's policy decisions for this device's topics, made on first use.
    policy: Option<Box<policy::Decisions>>,
}

impl Flow {
    /// The connection's delivery queue, created on first use.
    fn queue(&mut self, capacity: usize) -> mpsc::Sender<Delivery> {
        self.queue
            .get_or_insert_with(|| {
                let (queue, deliveries) = mpsc::channel(capacity);
                self.deliveries = Some(deliveries);
                queue
            })
            .clone()
    }

    /// Records a subscription in a persistent session (replacing one with the same filter).
    fn save_subscription(&mut self, subscription: SavedSubscription) {
        if let Some(saved) = &mut self.saved {
            saved.retain(|s| s.filter != subscription.filter);
            saved.push(subscription);
        }
    }

    /// What a persistent session keeps when the connection ends: its subscriptions, and
    /// every delivery not completed (those in flight first, oldest first, to be resent).
    fn leftovers(&mut self) -> Leftovers {
        let mut in_flight: Vec<(u16, InFlight)> = self.awaiting_ack.drain().collect();
        let oldest = self.next_pkid.wrapping_add(1);
        in_flight.sort_by_key(|(pkid, _)| pkid.wrapping_sub(oldest));
        let mut leftovers = Leftovers {
            expiry_secs: self.session_expiry,
            subscriptions: self.saved.take().unwrap_or_default(),
            qos2_received: std::mem::take(&mut self.qos2),
            ..Leftovers::default()
        };
        for (pkid, in_flight) in in_flight {
            if in_flight.released {
                leftovers.released.push(pkid);
            } else if let Some(mut delivery) = in_flight.delivery {
                delivery.resend = Some(pkid);
                leftovers.deliveries.push(delivery);
            }
        }
        leftovers.deliveries.extend(self.backlog.drain(..));
        leftovers
    }

    /// Starts the durable append of the open batch, if any.
    fn seal(&mut self, log: &Arc<dyn EventLog>) {
        if self.batch.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.batch);
        let publishes = records.len();
        let spans = std::mem::take(&mut self.batch_spans);
        let log = log.clone();
        let append = async move { log.append(records).await };
        let append = match traces::append_span(&spans, publishes) {
            Some(span) => tokio::spawn(append.instrument(span)),
            None => tokio::spawn(append),
        };
        self.inflight.push_back(Pending {
            append: Some(append),
            replies: std::mem::take(&mut self.batch_replies),
            then_deliver: Vec::new(),
            publishes,
            received: Instant::now(),
            _spans: spans,
        });
    }

    /// The next delivery that is ready without waiting: the backlog first, then the queue.
    fn next_ready(&mut self) -> Option<Delivery> {
        self.backlog
            .pop_front()
            .or_else(|| self.deliveries.as_mut().and_then(|rx| rx.try_recv().ok()))
    }

    /// Queues a reply behind everything received before it.
    fn reply_in_order(&mut self, log: &Arc<dyn EventLog>, reply: Packet) {
        self.reply_then_deliver(log, reply, Vec::new());
    }

    /// Queues a reply in order, and deliveries to follow it once it is sent.
    fn reply_then_deliver(&mut self, log: &Arc<dyn EventLog>, reply: Packet, then: Vec<Delivery>) {
        self.seal(log);
        self.inflight.push_back(Pending {
            append: None,
            replies: vec![reply],
            then_deliver: then,
            publishes: 0,
            received: Instant::now(),
            _spans: Vec::new(),
        });
    }
}

/// Why a connection ended; becomes a metric label, a log field and, in MQTT 5, the reason
/// code of the server's DISCONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    ClientDisconnect,
    /// MQTT 5 DISCONNECT with reason 0x04: the client asks for its will.
    ClientDisconnectWithWill,
    ClientClosed,
    KeepaliveExpired,
    /// The access token of a `token`-authenticated connection expired without a refresh.
    TokenExpired,
    TakenOver,
    /// The device was disabled or deleted, or its tokens revoked.
    Revoked,
    ServerShutdown,
    ProtocolError,
    Malformed,
    PacketTooLarge,
    TopicAliasInvalid,
    NotAuthorized,
    AppendFailed,
    WriteFailed,
}

impl Close {
    fn label(self) -> &'static str {
        match self {
            Self::ClientDisconnect => "client_disconnect",
            Self::ClientDisconnectWithWill => "client_disconnect_with_will",
            Self::ClientClosed => "client_closed",
            Self::KeepaliveExpired => "keepalive_expired",
            Self::TokenExpired => "token_expired",
            Self::TakenOver => "session_taken_over",
            Self::Revoked => "access_revoked",
            Self::ServerShutdown => "server_shutdown",
            Self::ProtocolError => "protocol_error",
            Self::Malformed => "malformed_packet",
            Self::PacketTooLarge => "packet_too_large",
            Self::TopicAliasInvalid => "topic_alias_invalid",
            Self::NotAuthorized => "not_authorized",
            Self::AppendFailed => "append_failed",
            Self::WriteFailed => "write_failed",
        }
    }

    fn is_error(self) -> bool {
        matches!(
            self,
            Self::ProtocolError
                | Self::Malformed
                | Self::PacketTooLarge
                | Self::TopicAliasInvalid
                | Self::NotAuthorized
                | Self::AppendFailed
                | Self::WriteFailed
        )
    }

    /// 3.1.2.5 (3.1.1) and 3.1.2.5 (5.0): the will is published unless the client ended with a
    /// normal DISCONNECT. A server shutdown is not the device's failure, so it does not publish
    /// wills either.
    fn publishes_will(self) -> bool {
        !matches!(self, Self::ClientDisconnect | Self::ServerShutdown)
    }

    /// The reason code of the DISCONNECT an MQTT 5 client gets; `None` when the client ended.
    fn reason_code(self) -> Option<DisconnectReasonCode> {
        use DisconnectReasonCode as R;
        Some(match self {
            Self::ClientDisconnect
            | Self::ClientDisconnectWithWill
            | Self::ClientClosed
            | Self::WriteFailed => return None,
            Self::KeepaliveExpired => R::KeepAliveTimeout,
            Self::TokenExpired => R::MaximumConnectTime,
            Self::TakenOver => R::SessionTakenOver,
            Self::Revoked => R::AdministrativeAction,
            Self::ServerShutdown => R::ServerShuttingDown,
            Self::ProtocolError => R::ProtocolError,
            Self::Malformed => R::MalformedPacket,
            Self::PacketTooLarge => R::PacketTooLarge,
            Self::TopicAliasInvalid => R::TopicAliasInvalid,
            Self::NotAuthorized => R::NotAuthorized,
            Self::AppendFailed => R::UnspecifiedError,
        })
    }

    fn from_read_error(e: &ReadError) -> Self {
        match e {
            ReadError::TooLarge(_) => Self::PacketTooLarge,
            ReadError::Unexpected(_) => Self::ProtocolError,
            _ => Self::Malformed,
        }
    }
}

/// The byte stream under a connection: plain TCP, or anything else (TLS, WebSocket).
pub(crate) struct Io {
    reader: Reader,
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// The client certificate chain a TLS client presented (verified by the TLS layer).
    client_certificates: Option<Vec<CertificateDer<'static>>>,
}

/// Plain TCP is read by readiness, so an idle connection holds no read buffer; other streams
/// are read into a buffer (their own layers buffer anyway).
enum Reader {
    Tcp(OwnedReadHalf),
    Stream(ReadHalf<Box<dyn AsyncStream>>),
}

/// A duplex byte stream a connection can run on.
pub(crate) trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

impl Io {
    pub(crate) fn tcp(stream: TcpStream) -> Self {
        let (reader, writer) = stream.into_split();
        Self {
            reader: Reader::Tcp(reader),
            writer: Box::new(writer),
            client_certificates: None,
        }
    }

    /// A TLS connection, with the client certificate chain it presented, if any.
    pub(crate) fn tls(stream: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        let certificates = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect());
        Self {
            client_certificates: certificates,
            ..Self::stream(stream)
        }
    }

    pub(crate) fn stream(stream: impl AsyncStream + 'static) -> Self {
        let (reader, writer) = tokio::io::split(Box::new(stream) as Box<dyn AsyncStream>);
        Self {
            reader: Reader::Stream(reader),
            writer: Box::new(writer),
            client_certificates: None,
        }
    }
}

pub(crate) struct Connection {
    pub(crate) bridge: Arc<Bridge>,
    reader: Reader,
    pub(crate) writer: Box<dyn AsyncWrite + Send + Unpin>,
    inbox: BytesMut,
    outbox: BytesMut,
    /// Decided by CONNECT; 3.1.1 until then.
    pub(crate) version: Version,
    /// A TLS client certificate chain: the device's identity (taken by the handshake).
    pub(crate) client_certificates: Option<Vec<CertificateDer<'static>>>,
    /// The device's address, for policies on the source network.
    peer_ip: IpAddr,
}

/// A connection's whole life. Not an `async fn` itself: one future (the instrumented block)
/// rather than two nested ones that would both hold the arguments.
pub(crate) fn run(
    bridge: Arc<Bridge>,
    io: Io,
    peer: SocketAddr,
    transport: &'static str,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = ()> + Send {
    let span = tracing::info_span!("mqtt", %peer, transport, tenant = tracing::field::Empty, device = tracing::field::Empty);
    async move {
        let mut conn = Connection {
            bridge,
            reader: io.reader,
            writer: io.writer,
            inbox: BytesMut::new(),
            outbox: BytesMut::new(),
            version: Version::V311,
            client_certificates: io.client_certificates,
            peer_ip: peer.ip(),
        };
        // Boxed, so the CONNECT's state does not stay in the connection's task.
        let Some(mut admitted) = Box::pin(conn.handshake()).await else {
            return;
        };
        let (tenant, device) = (admitted.tenant, admitted.device);
        let span = tracing::Span::current();
        span.record("tenant", tracing::field::display(tenant));
        span.record("device", tracing::field::display(device));
        let bridge = conn.bridge.clone();
        bridge.metrics.connections_total.inc();
        bridge.metrics.connections.inc();
        tracing::info!(
            keepalive = admitted.keepalive,
            protocol = conn.version.label(),
            "device connected"
        );
        let log = bridge.log.clone();
        let connected = lifecycle::connected(tenant, device, peer, conn.version.label(), transport);
        let connected = tokio::spawn(async move { log.append(vec![connected]).await });
        let (close, session_expiry) = conn.serve(&admitted, &shutdown).await;
        let will = admitted.will.take();
        bridge.metrics.connections.dec();
        if close.is_error() {
            bridge
                .metrics
                .closed_on_error
                .get_or_create(&ReasonLabel {
                    reason: close.label(),
                })
                .inc();
        }
        tracing::info!(reason = close.label(), "device disconnected");
        let mut records = Vec::with_capacity(2);
        if let Some(will) = will.filter(|_| close.publishes_will()) {
            // 3.1.3.2.2 (5.0): after the will delay, or when the session ends if sooner; a
            // device that took its own session over is back before any delay ran out.
            match admitted.will_delay.min(session_expiry) {
                // Boxed, like the other once-per-connection steps: their state would otherwise
                // sit in every idle connection's task.
                0 => records.extend(Box::pin(publish_will(&bridge, tenant, device, *will)).await),
                _ if close == Close::TakenOver => {}
                delay => delay_will(&bridge, tenant, device, *will, delay),
            }
        }
        records.push(lifecycle::disconnected(tenant, device, close.label()));
        // After the connected event, so that a device's lifecycle stays in order in the log.
        let _ = connected.await;
        if let Err(e) = bridge.log.append(records).await {
            tracing::error!(error = %e, "cannot append the disconnect to the event log");
        }
    }
    .instrument(span)
}

impl Connection {
    /// Reads until `parse` gets a whole packet out of the buffer; `None` when the client
    /// closed. Cancel-safe: bytes read so far stay in `inbox`.
    ///
    /// The read buffer is allocated only when the socket is readable and released whenever it
    /// is empty, so an idle connection holds no buffer at all.
    pub(crate) async fn read_with<T>(
        &mut self,
        mut parse: impl FnMut(&mut BytesMut) -> Result<T, ReadError>,
    ) -> Result<Option<T>, ReadError> {
        loop {
            // The parse result is dropped before any await: kept in scope, it would take its
            // full size (a whole packet) in every idle connection's task.
            match parse(&mut self.inbox) {
                Err(ReadError::Incomplete) => {}
                other => return other.map(Some),
            }
            if !self.fill_inbox().await? {
                return Ok(None);
            }
        }
    }

    /// Waits until the inbox holds a whole packet (`false`: the client closed). Cancel-safe.
    async fn packet_ready(&mut self) -> Result<bool, ReadError> {
        loop {
            if codec::frame_ready(&self.inbox)? {
                return Ok(true);
            }
            if !self.fill_inbox().await? {
                return Ok(false);
            }
        }
    }

    /// Reads what the socket has into the inbox; `false` once the client closed. Cancel-safe:
    /// bytes read stay in the inbox.
    async fn fill_inbox(&mut self) -> Result<bool, ReadError> {
        if self.inbox.is_empty() {
            self.inbox = BytesMut::new();
        }
        // A connection waking from idle starts small (most wake for one small packet: a
        // CONNECT, a PINGREQ); one that keeps reading gets full chunks.
        let reserve = |inbox: &mut BytesMut| {
            let chunk = if inbox.capacity() == 0 {
                FIRST_READ
            } else {
                READ_CHUNK
            };
            if inbox.capacity() - inbox.len() < chunk / 4 {
                inbox.reserve(chunk);
            }
        };
        match &mut self.reader {
            Reader::Tcp(reader) => {
                reader.readable().await?;
                reserve(&mut self.inbox);
                match reader.try_read_buf(&mut self.inbox) {
                    Ok(0) => Ok(false),
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
                    Err(e) => Err(e.into()),
                }
            }
            Reader::Stream(reader) => {
                reserve(&mut self.inbox);
                // Cancel-safe: no data is lost if another branch wins.
                Ok(reader.read_buf(&mut self.inbox).await? > 0)
            }
        }
    }

    /// Writes the outbox and flushes: TLS and WebSocket streams hold written bytes until then
    /// (for plain TCP the flush does nothing).
    async fn flush_outbox(&mut self) -> Result<(), Close> {
        self.writer
            .write_all(&self.outbox)
            .await
            .map_err(|_| Close::WriteFailed)?;
        self.writer.flush().await.map_err(|_| Close::WriteFailed)
    }

    /// Sends one packet in the connection's version (nothing if 3.1.1 lacks it).
    pub(crate) async fn send(&mut self, packet: &Packet) -> Result<(), Close> {
        let wrote = self.encode(packet)?;
        self.flush_encoded(wrote).await
    }

    /// Encodes one packet into the outbox; returns whether the version has it. Callers that
    /// build the packet in place encode, then flush: the packet is gone before the await.
    fn encode(&mut self, packet: &Packet) -> Result<bool, Close> {
        self.outbox.clear();
        codec::write(packet, self.version, &mut self.outbox).map_err(|e| {
            tracing::error!(error = %e, "cannot encode a packet");
            Close::WriteFailed
        })
    }

    async fn flush_encoded(&mut self, wrote: bool) -> Result<(), Close> {
        if wrote {
            self.flush_outbox().await?;
            self.bridge.metrics.packets_out.inc();
        }
        Ok(())
    }

    /// The packet loop of an authenticated connection; returns why it ended and how long its
    /// session outlives it.
    async fn serve(&mut self, admitted: &Admitted, shutdown: &Shutdown) -> (Close, u32) {
        let session = &admitted.session;
        let connection = session.id;
        // 3.1.2.10 (3.1.1), 3.1.2.10 (5.0): the server disconnects after 1.5 keepalive periods
        // of silence.
        let keepalive = admitted.keepalive;
        let grace = (keepalive > 0).then(|| Duration::from_millis(u64::from(keepalive) * 1500));
        let far_future = Duration::from_secs(365 * 24 * 3600);
        let mut deadline = Instant::now() + grace.unwrap_or(far_future);
        let max_inflight = self.bridge.config.max_inflight.max(1);
        let mut flow = Flow {
            tenant: admitted.tenant,
            device: admitted.device,
            inflight: VecDeque::new(),
            qos2: HashSet::new(),
            batch: Vec::new(),
            batch_replies: Vec::new(),
            batch_spans: Vec::new(),
            unacked: 0,
            connection,
            queue: None,
            deliveries: None,
            backlog: VecDeque::new(),
            awaiting_ack: HashMap::new(),
            next_pkid: 0,
            window: OUTBOUND_WINDOW.min(usize::from(admitted.receive_maximum)),
            client_max_packet: admitted.max_packet_size.map_or(usize::MAX, |m| m as usize),
            aliases: HashMap::new(),
            bucket: match self.bridge.config.max_publish_rate_per_device {
                0 => None,
                rate => Some(TokenBucket::new(rate, Instant::now())),
            },
            paused_until: None,
            session_expiry: admitted.session_expiry,
            saved: (admitted.session_expiry > 0).then(Vec::new),
            token_expiry: admitted.token_expires_at_ms.map(instant_of),
            policy: None,
        };
        if let Err(close) = Box::pin(self.begin_session(admitted, &mut flow)).await {
            return (close, 0);
        }

        let close = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Close::ServerShutdown,
                _ = session.closed.cancelled() => break Close::TakenOver,
                _ = session.revoked.cancelled() => break Close::Revoked,
                delivery = next_delivery(&mut flow.backlog, &mut flow.deliveries),
                    if flow.deliveries.is_some() && flow.awaiting_ack.len() < flow.window =>
                {
                    let Some(delivery) = delivery else { continue };
                    if let Err(close) = self.deliver(delivery, &mut flow).await {
                        break close;
                    }
                }
                mut done = next_done(&mut flow.inflight), if !flow.inflight.is_empty() => {
                    flow.unacked -= done.0.publishes;
                    flow.backlog.extend(std::mem::take(&mut done.0.then_deliver));
                    if let Err(close) = self.acknowledge(done).await {
                        break close;
                    }
                }
                _ = sleep_until_some(flow.token_expiry), if flow.token_expiry.is_some() => {
                    break Close::TokenExpired;
                }
                _ = sleep_until_some(flow.paused_until), if flow.paused_until.is_some() => {
                    flow.paused_until = None;
                    // The device was not silent: this side was not reading.
                    deadline = Instant::now() + grace.unwrap_or(far_future);
                }
                // Waits for a whole packet without parsing it: the parsed packet never sits in
                // this loop's state (it would take a packet's size in every idle connection).
                ready = timeout_at(deadline, self.packet_ready()),
                    if flow.unacked < max_inflight && flow.paused_until.is_none() =>
                {
                    match ready {
                        Err(_) => break Close::KeepaliveExpired,
                        Ok(Ok(false)) => break Close::ClientClosed,
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "bad packet; closing");
                            break Close::from_read_error(&e);
                        }
                        Ok(Ok(true)) => {}
                    }
                    deadline = Instant::now() + grace.unwrap_or(far_future);
                    // Boxed: the burst's state (packets, deferred publish work) would otherwise sit
                    // inline in every idle connection's task for its whole life.
                    if let Err(close) = Box::pin(self.handle_burst(&mut flow, max_inflight)).await {
                        break close;
                    }
                }
            }
        };
        if flow.session_expiry == 0 {
            self.bridge.router.drop_connection(flow.tenant, connection);
        }
        self.bridge
            .command_targets
            .drop_connection(flow.tenant, flow.device, connection);
        // Whatever was received is acknowledged once durable, even when closing.
        flow.seal(&self.bridge.log);
        while !flow.inflight.is_empty() {
            let done = next_done(&mut flow.inflight).await;
            if self.acknowledge(done).await.is_err() {
                break;
            }
        }
        if let Some(reason_code) = close.reason_code() {
            // Always with a reason string: it tells the client why, and rumqttc's encoder
            // miscounts a DISCONNECT that has a reason code but no properties.
            let disconnect = Disconnect {
                reason_code,
                properties: Some(DisconnectProperties {
                    session_expiry_interval: None,
                    reason_string: Some(close.label().replace('_', " ")),
                    user_properties: Vec::new(),
                    server_reference: None,
                }),
            };
            if let Ok(wrote) = self.encode(&Packet::Disconnect(disconnect)) {
                let _ = self.flush_encoded(wrote).await;
            }
        }
        let _ = self.writer.shutdown().await;
        Box::pin(self.end_session(admitted, &mut flow)).await;
        (close, flow.session_expiry)
    }

    /// Resumes the device's persistent session, if it has one: its subscriptions move to this
    /// connection, QoS 2 exchanges continue, and what it was owed is sent (in flight ones
    /// again, with DUP), then its pending commands. A new persistent session is saved.
    async fn begin_session(&mut self, admitted: &Admitted, flow: &mut Flow) -> Result<(), Close> {
        let bridge = self.bridge.clone();
        if !admitted.session_present {
            if flow.saved.is_some() {
                bridge
                    .persistent
                    .save(flow.tenant, flow.device, flow.session_expiry, Vec::new())
                    .await
                    .map_err(session_store_failed)?;
            }
            return Ok(());
        }
        let queue = flow.queue(bridge.config.max_queued_messages.max(1));
        let Some(resumed) = bridge.persistent.resume(
            &bridge.router,
            flow.tenant,
            flow.device,
            flow.connection,
            &queue,
        ) else {
            return Ok(());
        };
        flow.qos2 = resumed.qos2_received;
        flow.backlog.extend(resumed.deliveries);
        for subscription in &resumed.subscriptions {
            if is_device_topic(&subscription.filter) {
                let owed = self
                    .subscribe_device_topic(
                        flow,
                        &subscription.filter,
                        subscription.options().qos,
                        &queue,
                    )
                    .await?;
                flow.backlog.extend(owed);
            }
        }
        if let Some(saved) = &mut flow.saved {
            *saved = resumed.subscriptions;
        }
        for pkid in resumed.released {
            flow.awaiting_ack.insert(
                pkid,
                InFlight {
                    command: None,
                    released: true,
                    delivery: None,
                },
            );
            self.send(&Packet::PubRel(PubRel::new(pkid, None))).await?;
        }
        Ok(())
    }

    /// Parks a persistent session for the client's return, or deletes what a session that
    /// ends now had stored.
    async fn end_session(&mut self, admitted: &Admitted, flow: &mut Flow) {
        let bridge = &self.bridge;
        let (tenant, device) = (flow.tenant, flow.device);
        let ended = if flow.session_expiry > 0 {
            let leftovers = flow.leftovers();
            bridge
                .persistent
                .park(
                    &bridge.router,
                    tenant,
                    device,
                    flow.connection,
                    leftovers,
                    flow.deliveries.take(),
                )
                .await
        } else if admitted.session_present || flow.saved.is_some() {
            bridge
                .persistent
                .discard(&bridge.router, tenant, device)
                .await
        } else {
            Ok(())
        };
        if let Err(e) = ended {
            tracing::error!(error = %e, "cannot store the persistent session");
        }
    }

    /// Handles every whole packet buffered (a pipelining client sends many per read; there is
    /// at least one), so that their publishes are appended as one batch.
    async fn handle_burst(&mut self, flow: &mut Flow, max_inflight: usize) -> Result<(), Close> {
        // Once per burst rather than per publish: the clock is not free at millions a second.
        policy::expire(&mut flow.policy);
        loop {
            let packet = match codec::read(
                &mut self.inbox,
                self.version,
                self.bridge.config.max_packet_size,
            ) {
                Ok(next) => next,
                Err(ReadError::Incomplete) => break,
                Err(e) => {
                    tracing::info!(error = %e, "bad packet; closing");
                    flow.seal(&self.bridge.log);
                    return Err(Close::from_read_error(&e));
                }
            };
            // Publishes take the synchronous path; only other packets and deferred publish
            // work build a future.
            let is_publish = matches!(packet, Incoming::Packet(Packet::Publish(_)));
            let handled = match packet {
                Incoming::Packet(Packet::Publish(publish)) => match self.publish(publish, flow) {
                    Ok(Some(deferred)) => self.finish(*deferred, flow).await,
                    Ok(None) => Ok(()),
                    Err(close) => Err(close),
                },
                Incoming::Packet(other) => self.handle(other, flow).await,
                Incoming::Auth(request) => self.reauthenticate(request, flow).await,
            };
            if let Err(close) = handled {
                flow.seal(&self.bridge.log);
                return Err(close);
            }
            if is_publish && let Some(wait) = self.publish_wait(flow) {
                self.bridge.metrics.rate_limited.inc();
                flow.paused_until = Some(Instant::now() + wait);
                break;
            }
            if flow.unacked >= max_inflight {
                break;
            }
        }
        flow.seal(&self.bridge.log);
        Ok(())
    }

    /// How long to stop reading after a publish that took the device or its tenant over its
    /// rate (`mqtt.max_publish_rate_per_device`, `..._per_tenant`).
    fn publish_wait(&self, flow: &mut Flow) -> Option<Duration> {
        let tenant_rate = self.bridge.config.max_publish_rate_per_tenant;
        if flow.bucket.is_none() && tenant_rate == 0 {
            // No limits: no need to read the clock (3% of the CPU in S1).
            return None;
        }
        let now = Instant::now();
        let device = flow.bucket.as_mut().and_then(|b| b.take(now));
        let tenant = match tenant_rate {
            0 => None,
            rate => self.bridge.tenant_rates.take(flow.tenant, rate, now),
        };
        device.max(tenant)
    }

    /// Handles one packet; `Err` ends the connection (a DISCONNECT included).
    async fn handle(&mut self, packet: Packet, flow: &mut Flow) -> Result<(), Close> {
        let log = &self.bridge.log;
        match packet {
            Packet::Publish(publish) => {
                if let Some(deferred) = self.publish(publish, flow)? {
                    self.finish(*deferred, flow).await?;
                }
            }
            Packet::PubRel(rel) => {
                flow.qos2.remove(&rel.pkid);
                flow.reply_in_order(log, Packet::PubComp(PubComp::new(rel.pkid, None)));
            }
            Packet::Subscribe(subscribe) => self.subscribe(subscribe, flow).await?,
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(unsubscribe, flow).await?,
            Packet::PubAck(ack) => {
                if let Some(mut in_flight) = flow.awaiting_ack.remove(&ack.pkid) {
                    self.completed(flow.tenant, flow.device, &mut in_flight);
                }
            }
            // QoS 2 towards the client (4.3.3): PUBREC -> PUBREL -> PUBCOMP.
            Packet::PubRec(rec) => {
                let accepted = matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                );
                let (tenant, device) = (flow.tenant, flow.device);
                match flow.awaiting_ack.get_mut(&rec.pkid) {
                    Some(in_flight) if accepted => {
                        self.completed(tenant, device, in_flight);
                        in_flight.released = true;
                        self.send(&Packet::PubRel(PubRel::new(rec.pkid, None)))
                            .await?;
                    }
                    // Refused by the client (5.0 reason >= 0x80): the exchange ends here.
                    Some(_) => {
                        if let Some(mut in_flight) = flow.awaiting_ack.remove(&rec.pkid) {
                            self.completed(tenant, device, &mut in_flight);
                        }
                    }
                    // A PUBREC for an unknown id is still answered, so the client can finish.
                    None => {
                        self.send(&Packet::PubRel(PubRel::new(rec.pkid, None)))
                            .await?;
                    }
                }
            }
            Packet::PubComp(comp) => {
                if flow
                    .awaiting_ack
                    .get(&comp.pkid)
                    .is_some_and(|f| f.released)
                {
                    flow.awaiting_ack.remove(&comp.pkid);
                }
            }
            Packet::PingReq(_) => self.send(&Packet::PingResp(PingResp)).await?,
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.and_then(|p| p.session_expiry_interval) {
                    // 3.14.2.2.2: a session that was to end with the connection cannot be
                    // made to outlive it now.
                    if flow.session_expiry == 0 && expiry != 0 {
                        tracing::info!("DISCONNECT sets a session expiry on a clean session");
                        return Err(Close::ProtocolError);
                    }
                    flow.session_expiry = expiry.min(self.bridge.config.max_session_expiry_secs);
                }
                return Err(
                    if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                        Close::ClientDisconnectWithWill
                    } else {
                        Close::ClientDisconnect
                    },
                );
            }
            other => {
                tracing::info!(
                    packet = packet_name(&other),
                    "unexpected packet from a client; closing"
                );
                return Err(Close::ProtocolError);
            }
        }
        Ok(())
    }

    /// MQTT 5 re-authentication (4.12.1): a fresh access token for the same device extends the
    /// connection's life; anything else ends it.
    async fn reauthenticate(&mut self, request: AuthRequest, flow: &mut Flow) -> Result<(), Close> {
        if flow.token_expiry.is_none()
            || request.reason != reauth::REAUTHENTICATE
            || request.method.as_deref() != Some(TOKEN_AUTH_METHOD)
        {
            // 4.12.0-7 and 4.12.1-1: only with the CONNECT's method, to re-authenticate.
            tracing::info!("AUTH without the connection's authentication method; closing");
            return Err(Close::ProtocolError);
        }
        let token = request
            .data
            .as_ref()
            .and_then(|d| std::str::from_utf8(d).ok())
            .unwrap_or_default();
        let identity = self.bridge.identity.clone();
        match identity.authenticate_device_token(token).await {
            Ok((device, principal))
                if device.id == flow.device && device.tenant_id == flow.tenant =>
            {
                flow.token_expiry = Some(instant_of(principal.expires_at_ms));
                tracing::info!("access token refreshed");
                self.outbox.clear();
                self.outbox
                    .extend_from_slice(&reauth::success(TOKEN_AUTH_METHOD));
                self.flush_outbox().await
            }
            Ok(_) => {
                tracing::info!("AUTH with another device's token; closing");
                Err(Close::NotAuthorized)
            }
            Err(DeviceAuthError::Registry(e)) => {
                tracing::error!(error = %e, "cannot check a refreshed token");
                Err(Close::AppendFailed)
            }
            Err(e) => {
                tracing::info!(error = %e, "re-authentication failed; closing");
                Err(Close::NotAuthorized)
            }
        }
    }

    /// An inbound PUBLISH: telemetry and events go to the log (acknowledged once durable),
    /// command responses complete their command, anything else is routed to the tenant.
    ///
    /// Synchronous on purpose: the common cases (telemetry, QoS 0 and uncontended QoS 1
    /// routing) finish here without building an async state machine per message; what must
    /// wait comes back as [`Deferred`] for [`Connection::finish`].
    fn publish(
        &mut self,
        mut publish: Publish,
        flow: &mut Flow,
    ) -> Result<Option<Box<Deferred>>, Close> {
        if publish.qos == QoS::ExactlyOnce && flow.qos2.contains(&publish.pkid) {
            // A resent QoS 2 publish: already stored (or being stored); answer again in order
            // without storing twice.
            flow.reply_in_order(
                &self.bridge.log,
                Packet::PubRec(PubRec::new(publish.pkid, None)),
            );
            return Ok(None);
        }
        resolve_topic_alias(&mut publish, &mut flow.aliases)?;
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            tracing::info!("topic name is not UTF-8; closing");
            return Err(Close::Malformed);
        };
        let generation = self.bridge.identity.pdp().generation();
        let resource = policy::topic_resource(topic);
        match policy::cached(&flow.policy, generation, policy::Action::Publish, resource) {
            Some(true) => {}
            Some(false) => {
                let why = "the tenant's policies do not allow this publish";
                return self.refuse_publish(&publish, why, flow).map(|()| None);
            }
            None => return Ok(Some(Box::new(Deferred::Authorize { publish }))),
        }
        let metrics = &self.bridge.metrics;
        metrics.bytes_in.inc_by(publish.payload.len() as u64);
        let kind = match topic {
            TELEMETRY_TOPIC => EventKind::Telemetry,
            EVENT_TOPIC => EventKind::Event,
            t if is_command_topic(t) => return self.command_response(&publish, t, flow),
            TWIN_REPORTED_TOPIC => {
                return Ok(Some(Box::new(Deferred::TwinReported { publish })));
            }
            t if is_twin_topic(t) => {
                let why = "devices may publish only twin/reported under twin/";
                tracing::info!(topic = t, why, "publish refused");
                return self.refuse_publish(&publish, why, flow).map(|()| None);
            }
            t if let Some((kind, child)) = child_topic(t) => {
                let child_at = t.len() - child.len();
                return Ok(Some(Box::new(Deferred::ForChild {
                    publish,
                    kind,
                    child_at,
                })));
            }
            t => {
                if let Err(InvalidTopic(why)) = validate_name(t) {
                    tracing::info!(topic = t, why, "invalid topic name; closing");
                    return Err(Close::ProtocolError);
                }
                return Ok(self.route(&publish, t, flow));
            }
        };
        let counter = if kind == EventKind::Event {
            &metrics.events_in
        } else {
            &metrics.telemetry_in
        };
        counter.inc();
        let reply = success_reply(&publish, flow);
        let span = traces::publish_span(&publish, flow.tenant, flow.device, topic);
        let trace_context = span.as_ref().map(otel::inject).unwrap_or_default();
        flow.batch.push(record(
            flow.tenant,
            flow.device,
            kind,
            topic,
            publish.payload.clone(),
            trace_context,
        ));
        flow.batch_spans.extend(span);
        flow.batch_replies.extend(reply);
        flow.unacked += 1;
        Ok(None)
    }

    /// Plain publish/subscribe: hand to the tenant's subscribers; the reply goes out in order
    /// at once unless deliveries must wait for room or a retained message be stored.
    fn route(&mut self, publish: &Publish, topic: &str, flow: &mut Flow) -> Option<Box<Deferred>> {
        let metrics = &self.bridge.metrics;
        metrics.pubsub_in.inc();
        let properties = publish.properties.clone().map(|mut p| {
            p.topic_alias = None;
            p.subscription_identifiers.clear();
            Arc::new(p)
        });
        let routed = self.bridge.router.route(
            flow.tenant,
            &Message {
                topic,
                payload: &publish.payload,
                qos: publish.qos,
                retain: publish.retain,
                properties: properties.clone(),
                from: Some(flow.connection),
            },
        );
        metrics.deliveries.inc_by(routed.delivered as u64);
        metrics.deliveries_dropped.inc_by(routed.dropped as u64);
        self.bridge.forward_to_peers(
            flow.tenant,
            ToPeers {
                topic,
                payload: &publish.payload,
                qos: publish.qos,
                retain: publish.retain,
                properties: properties.as_ref(),
            },
        );
        let reply = success_reply(publish, flow);
        if routed.waiting.is_empty() && routed.away.is_empty() && !publish.retain {
            if let Some(reply) = reply {
                flow.reply_in_order(&self.bridge.log, reply);
            }
            return None;
        }
        Some(Box::new(Deferred::Routed {
            waiting: routed.waiting,
            away: routed.away,
            retain: publish.retain.then(|| ToRetain {
                topic: topic.to_string(),
                payload: publish.payload.clone(),
                qos: publish.qos,
                properties,
            }),
            reply,
        }))
    }

    /// A publish under `command/`: only `command/res/{id}/{status}` is for devices. Anything
    /// else is refused: with a reason code in MQTT 5, by closing in 3.1.1 (3.3.5).
    fn command_response(
        &mut self,
        publish: &Publish,
        topic: &str,
        flow: &mut Flow,
    ) -> Result<Option<Box<Deferred>>, Close> {
        let (command, status) = match parse_response_topic(topic) {
            Ok(parsed) => parsed,
            Err(why) => {
                tracing::info!(topic, why, "publish under command/ refused");
                return self.refuse_publish(publish, why, flow).map(|()| None);
            }
        };
        self.bridge.metrics.command_responses_in.inc();
        Ok(Some(Box::new(Deferred::CommandResponse {
            command,
            status,
            payload: publish.payload.clone(),
            reply: success_reply(publish, flow),
        })))
    }

    /// Refuses a publish the device may not make: with a reason code in MQTT 5 (QoS 1 and 2),
    /// by closing otherwise (3.3.5).
    fn refuse_publish(
        &mut self,
        publish: &Publish,
        why: &str,
        flow: &mut Flow,
    ) -> Result<(), Close> {
        match (self.version, refusal(publish, why)) {
            (Version::V5, Some(reply)) => {
                flow.reply_in_order(&self.bridge.log, reply);
                Ok(())
            }
            _ => Err(Close::NotAuthorized),
        }
    }

    /// A gateway's publish for a child device (`telemetry/{child}`, `event/{child}`): appended
    /// as the child's, in order with the gateway's other publishes, if the child names this
    /// device as its gateway.
    async fn publish_for_child(
        &mut self,
        publish: Publish,
        kind: EventKind,
        child: &str,
        flow: &mut Flow,
    ) -> Result<(), Close> {
        let registry = self.bridge.registry.clone();
        let child = match registry.child_of(flow.tenant, flow.device, child).await {
            Ok(child) => child,
            Err(
                e @ (RegistryError::NotFound(_)
                | RegistryError::Forbidden(_)
                | RegistryError::Invalid(_)),
            ) => {
                tracing::info!(child, error = %e, "publish for a child device refused");
                let why = format!("not a gateway of {child:?}");
                return self.refuse_publish(&publish, &why, flow);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot look up a child device");
                return Err(Close::AppendFailed);
            }
        };
        let counter = match kind {
            EventKind::Event => &self.bridge.metrics.events_in,
            _ => &self.bridge.metrics.telemetry_in,
        };
        counter.inc();
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let reply = success_reply(&publish, flow);
        let span = traces::publish_span(&publish, flow.tenant, child.id, &topic);
        let trace_context = span.as_ref().map(otel::inject).unwrap_or_default();
        flow.batch.push(record(
            flow.tenant,
            child.id,
            kind,
            &topic,
            publish.payload,
            trace_context,
        ));
        flow.batch_spans.extend(span);
        flow.batch_replies.extend(reply);
        flow.unacked += 1;
        Ok(())
    }

    /// A `twin/reported` publish: merged into the device's reported state, then acknowledged
    /// in order; a payload that is not a JSON object (or too large) is refused.
    async fn twin_reported(&mut self, publish: Publish, flow: &mut Flow) -> Result<(), Close> {
        let patch: serde_json::Value = match serde_json::from_slice(&publish.payload) {
            Ok(patch) => patch,
            Err(_) => {
                let why = "twin/reported takes a JSON object (a merge patch)";
                return self.refuse_publish(&publish, why, flow);
            }
        };
        let twins = self.bridge.twins.clone();
        match twins
            .update_reported(flow.tenant, flow.device, &patch)
            .await
        {
            Ok(_) => {
                if let Some(reply) = success_reply(&publish, flow) {
                    flow.reply_in_order(&self.bridge.log, reply);
                }
                Ok(())
            }
            Err(RegistryError::Invalid(e)) => self.refuse_publish(&publish, &e.to_string(), flow),
            Err(e) => {
                tracing::error!(error = %e, "cannot store a reported state");
                Err(Close::AppendFailed)
            }
        }
    }

    /// The waiting part of a publish; its reply goes out in order afterwards.
    async fn finish(&mut self, deferred: Deferred, flow: &mut Flow) -> Result<(), Close> {
        let reply = match deferred {
            Deferred::Authorize { publish } => {
                let topic = String::from_utf8_lossy(&publish.topic);
                let topic = policy::topic_resource(&topic).to_string();
                let who = (flow.tenant, flow.device);
                let (action, peer) = (policy::Action::Publish, Some(self.peer_ip));
                policy::decide(&self.bridge, &mut flow.policy, who, peer, action, &topic).await;
                // Decided (and cached) now: take the publish's usual path.
                return match self.publish(publish, flow)? {
                    Some(next) => Box::pin(self.finish(*next, flow)).await,
                    None => Ok(()),
                };
            }
            Deferred::TwinReported { publish } => {
                return self.twin_reported(publish, flow).await;
            }
            Deferred::ForChild {
                publish,
                kind,
                child_at,
            } => {
                let topic = String::from_utf8_lossy(&publish.topic[child_at..]).into_owned();
                return self.publish_for_child(publish, kind, &topic, flow).await;
            }
            Deferred::Routed {
                waiting,
                away,
                retain,
                reply,
            } => {
                hand_over(&self.bridge, waiting, flow.queue.as_ref()).await;
                store_for_away(&self.bridge, away)
                    .await
                    .map_err(|()| Close::AppendFailed)?;
                if let Some(retain) = retain {
                    retain_message(&self.bridge, flow.tenant, retain)
                        .await
                        .map_err(|()| Close::AppendFailed)?;
                }
                reply
            }
            Deferred::CommandResponse {
                command,
                status,
                payload,
                reply,
            } => {
                let answered = self
                    .bridge
                    .commands
                    .respond(flow.tenant, flow.device, command, status, &payload)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, %command, "cannot store a command response");
                        Close::AppendFailed
                    })?;
                if answered.is_none() {
                    tracing::info!(%command, "response to a command this device does not have");
                }
                reply
            }
        };
        if let Some(reply) = reply {
            flow.reply_in_order(&self.bridge.log, reply);
        }
        Ok(())
    }

    /// Handles a SUBSCRIBE: plain filters go to the tenant's router (and get the matching
    /// retained messages), filters under `command/` to the device's own command route (and get
    /// its pending commands). Both follow the SUBACK.
    async fn subscribe(&mut self, subscribe: Subscribe, flow: &mut Flow) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut owed = Vec::new();
        let queue = flow.queue(self.bridge.config.max_queued_messages.max(1));
        let id = subscribe.properties.as_ref().and_then(|p| p.id);
        for filter in &subscribe.filters {
            let parsed = match parse_filter(&filter.path) {
                Ok(parsed) => parsed,
                Err(InvalidTopic(why)) => {
                    tracing::info!(filter = %filter.path, why, "invalid topic filter; closing");
                    return Err(Close::ProtocolError);
                }
            };
            let shared = parsed.group.is_some();
            if shared && filter.nolocal {
                // 3.8.3-4 (5.0): No Local on a shared subscription is a protocol error.
                tracing::info!(filter = %filter.path, "No Local on a shared subscription; closing");
                return Err(Close::ProtocolError);
            }
            if shared && is_device_topic(parsed.filter) {
                // Commands and twins belong to one device: there is nothing to share.
                codes.push(SubscribeReasonCode::NotAuthorized);
                continue;
            }
            let who = (flow.tenant, flow.device);
            let (action, peer) = (policy::Action::Subscribe, Some(self.peer_ip));
            if !policy::decide(
                &self.bridge,
                &mut flow.policy,
                who,
                peer,
                action,
                &filter.path,
            )
            .await
            {
                codes.push(SubscribeReasonCode::NotAuthorized);
                continue;
            }
            let granted = filter.qos;
            let options = SubscriptionOptions {
                qos: granted,
                no_local: filter.nolocal,
                retain_as_published: filter.preserve_retain,
                id,
            };
            flow.save_subscription(SavedSubscription::new(&filter.path, options));
            if is_device_topic(&filter.path) {
                owed.extend(
                    self.subscribe_device_topic(flow, &filter.path, granted, &queue)
                        .await?,
                );
            } else {
                let new = self.bridge.router.subscribe(
                    flow.tenant,
                    flow.connection,
                    &filter.path,
                    options,
                    Mailbox::Live(queue.clone()),
                );
                // 3.3.1-6 and 3.8.4-3 (3.1.1), retain handling 3.3.1.3 (5.0): matching
                // retained messages go to the subscription, flagged as retained.
                // 4.8.2 (5.0): none for shared subscriptions.
                let send_retained = !shared
                    && match filter.retain_forward_rule {
                        RetainForwardRule::OnEverySubscribe => true,
                        RetainForwardRule::OnNewSubscribe => new,
                        RetainForwardRule::Never => false,
                    };
                if send_retained {
                    for message in self.bridge.retained.matching(flow.tenant, &filter.path) {
                        owed.push(Delivery {
                            subscription_ids: id.into_iter().collect(),
                            properties: message.properties,
                            ..Delivery::new(
                                message.topic,
                                message.payload,
                                lower_qos(message.qos, granted),
                                true,
                            )
                        });
                    }
                }
            }
            codes.push(SubscribeReasonCode::Success(granted));
        }
        self.save_session(flow).await?;
        let suback = Packet::SubAck(SubAck {
            pkid: subscribe.pkid,
            return_codes: codes,
            properties: None,
        });
        flow.reply_then_deliver(&self.bridge.log, suback, owed);
        Ok(())
    }

    /// Subscribes the device's connection to its own commands; returns the pending commands
    /// the filter matches, owed after the SUBACK.
    async fn subscribe_device_topic(
        &mut self,
        flow: &Flow,
        filter: &str,
        granted: QoS,
        queue: &mpsc::Sender<Delivery>,
    ) -> Result<Vec<Delivery>, Close> {
        self.bridge.command_targets.subscribe(
            flow.tenant,
            flow.device,
            flow.connection,
            filter,
            granted,
            queue.clone(),
        );
        let pending = self
            .bridge
            .commands
            .pending(flow.tenant, flow.device)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read pending commands");
                Close::AppendFailed
            })?;
        let mut owed: Vec<Delivery> = pending
            .iter()
            .filter_map(|c| commands::owed(c, filter, granted))
            .collect();
        if crate::topics::matches(filter, TWIN_DESIRED_TOPIC) {
            // The current desired state, like a retained message.
            let twins = self.bridge.twins.clone();
            let state = twins.desired(flow.tenant, flow.device).await.map_err(|e| {
                tracing::error!(error = %e, "cannot read the desired state");
                Close::AppendFailed
            })?;
            owed.push(commands::desired_delivery(&state, granted));
        }
        Ok(owed)
    }

    /// Saves a persistent session's subscriptions, durably (before the SUBACK or UNSUBACK).
    async fn save_session(&mut self, flow: &Flow) -> Result<(), Close> {
        let Some(saved) = &flow.saved else {
            return Ok(());
        };
        self.bridge
            .persistent
            .save(flow.tenant, flow.device, flow.session_expiry, saved.clone())
            .await
            .map_err(session_store_failed)
    }

    async fn unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        flow: &mut Flow,
    ) -> Result<(), Close> {
        let reasons = unsubscribe
            .filters
            .iter()
            .map(|filter| {
                let routed = self
                    .bridge
                    .router
                    .unsubscribe(flow.tenant, flow.connection, filter);
                let commanded = self.bridge.command_targets.unsubscribe(
                    flow.tenant,
                    flow.device,
                    flow.connection,
                    filter,
                );
                if let Some(saved) = &mut flow.saved {
                    saved.retain(|s| &s.filter != filter);
                }
                if routed || commanded {
                    UnsubAckReason::Success
                } else {
                    UnsubAckReason::NoSubscriptionExisted
                }
            })
            .collect();
        self.save_session(flow).await?;
        let unsuback = Packet::UnsubAck(UnsubAck {
            pkid: unsubscribe.pkid,
            reasons,
            properties: None,
        });
        flow.reply_in_order(&self.bridge.log, unsuback);
        Ok(())
    }

    /// A QoS 1 or 2 delivery the client has received: its command is delivered and its stored
    /// copy (persistent sessions) deleted.
    fn completed(&self, tenant: TenantId, device: DeviceId, in_flight: &mut InFlight) {
        if let Some(command) = in_flight.command.take() {
            self.command_delivered(tenant, device, command);
        }
        if let Some(seq) = in_flight.delivery.take().and_then(|d| d.stored) {
            self.bridge.persistent.completed(tenant, device, seq);
        }
    }

    /// Records (in the background) that the device received a command.
    fn command_delivered(&self, tenant: TenantId, device: DeviceId, command: CommandId) {
        let commands = self.bridge.commands.clone();
        tokio::spawn(async move {
            if let Err(e) = commands.delivered(tenant, device, command).await {
                tracing::error!(error = %e, %command, "cannot record a command delivery");
            }
        });
    }

    /// Writes `first` and whatever else is queued (up to the outbound window) in one write.
    async fn deliver(&mut self, first: Delivery, flow: &mut Flow) -> Result<(), Close> {
        self.outbox.clear();
        let mut next = Some(first);
        let mut sent = 0u64;
        while let Some(delivery) = next {
            next = if flow.awaiting_ack.len() < flow.window {
                flow.next_ready()
            } else {
                None
            };
            let command = delivery.command;
            let resend = delivery.resend;
            // Kept to be resent after a reconnect, or to delete its stored copy once completed.
            let kept = (delivery.qos != QoS::AtMostOnce
                && (flow.saved.is_some() || delivery.stored.is_some()))
            .then(|| delivery.clone());
            let mut publish = to_publish(delivery, self.version);
            if publish.size() > flow.client_max_packet {
                // 3.1.2.11.4 (5.0): never send a client more than it said it accepts.
                self.bridge.metrics.deliveries_dropped.inc();
                continue;
            }
            if publish.qos != QoS::AtMostOnce {
                publish.pkid = match resend.filter(|p| !flow.awaiting_ack.contains_key(p)) {
                    // 4.4.0-1 (3.1.1), 4.4.0-1 (5.0): resent with its packet id and DUP.
                    Some(pkid) => {
                        publish.dup = true;
                        pkid
                    }
                    None => loop {
                        flow.next_pkid = flow.next_pkid % u16::MAX + 1;
                        if !flow.awaiting_ack.contains_key(&flow.next_pkid) {
                            break flow.next_pkid;
                        }
                    },
                };
                flow.awaiting_ack.insert(
                    publish.pkid,
                    InFlight {
                        command,
                        released: false,
                        delivery: kept,
                    },
                );
            } else if let Some(command) = command {
                // At most once: written is as delivered as it gets.
                self.command_delivered(flow.tenant, flow.device, command);
            }
            codec::write(&Packet::Publish(publish), self.version, &mut self.outbox)
                .map_err(|_| Close::WriteFailed)?;
            sent += 1;
        }
        if sent > 0 {
            self.flush_outbox().await?;
            self.bridge.metrics.packets_out.inc_by(sent);
        }
        Ok(())
    }

    /// Sends the replies of a finished pending entry; a failed append closes the connection
    /// without an acknowledgement, so the device sends the messages again.
    async fn acknowledge(&mut self, done: (Pending, Result<(), String>)) -> Result<(), Close> {
        let (pending, result) = done;
        if let Err(e) = result {
            tracing::error!(error = %e, "event log append failed; closing so the device retries");
            return Err(Close::AppendFailed);
        }
        if pending.append.is_some() {
            self.bridge
                .metrics
                .append_seconds
                .observe(pending.received.elapsed().as_secs_f64());
        }
        self.outbox.clear();
        for reply in &pending.replies {
            codec::write(reply, self.version, &mut self.outbox).map_err(|_| Close::WriteFailed)?;
        }
        if !self.outbox.is_empty() {
            self.flush_outbox().await?;
            self.bridge
                .metrics
                .packets_out
                .inc_by(pending.replies.len() as u64);
        }
        Ok(())
    }
}

/// MQTT 5 topic aliases (3.3.2.3.4): a publish with an alias and a topic sets the alias; one
/// with an alias and an empty topic uses it.
fn resolve_topic_alias(
    publish: &mut Publish,
    aliases: &mut HashMap<u16, Bytes>,
) -> Result<(), Close> {
    let Some(alias) = publish.properties.as_ref().and_then(|p| p.topic_alias) else {
        if publish.topic.is_empty() {
            tracing::info!("empty topic name without a topic alias; closing");
            return Err(Close::ProtocolError);
        }
        return Ok(());
    };
    if alias == 0 || alias > TOPIC_ALIAS_MAX {
        tracing::info!(alias, "topic alias out of range; closing");
        return Err(Close::TopicAliasInvalid);
    }
    if publish.topic.is_empty() {
        publish.topic = aliases.get(&alias).cloned().ok_or_else(|| {
            tracing::info!(alias, "unknown topic alias; closing");
            Close::ProtocolError
        })?;
    } else {
        aliases.insert(alias, publish.topic.clone());
    }
    Ok(())
}

/// A QoS 1 or 2 delivery the client has not completed yet.
struct InFlight {
    /// The command it carries, delivered at the PUBACK (QoS 1) or PUBREC (QoS 2).
    command: Option<CommandId>,
    /// QoS 2: PUBREC received and PUBREL sent; waiting for PUBCOMP.
    released: bool,
    /// The delivery itself, for persistent sessions (see `deliver`).
    delivery: Option<Delivery>,
}

/// What a publish still has to wait for after [`Connection::publish`].
enum Deferred {
    /// A publish to a topic the tenant's policies have not been asked about yet.
    Authorize { publish: Publish },
    /// QoS 1 deliveries waiting for room in full queues, deliveries to store for away
    /// persistent sessions, and a retained message to store.
    Routed {
        waiting: Vec<(mpsc::Sender<Delivery>, Delivery)>,
        away: Vec<(Arc<Away>, Delivery)>,
        retain: Option<ToRetain>,
        reply: Option<Packet>,
    },
    /// The device's reported state changed (a JSON merge patch); acknowledged once stored.
    TwinReported { publish: Publish },
    /// A gateway's publish for a child device; the child starts at byte `child_at` of the topic.
    ForChild {
        publish: Publish,
        kind: EventKind,
        child_at: usize,
    },
    /// A device's answer to a command; acknowledged once the command's state is stored.
    CommandResponse {
        command: CommandId,
        status: u16,
        payload: Bytes,
        reply: Option<Packet>,
    },
}

/// The acknowledgement a publish is owed on success (none for QoS 0); registers a QoS 2
/// packet id for exactly-once.
fn success_reply(publish: &Publish, flow: &mut Flow) -> Option<Packet> {
    match publish.qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(publish.pkid, None))),
        QoS::ExactlyOnce => {
            flow.qos2.insert(publish.pkid);
            Some(Packet::PubRec(PubRec::new(publish.pkid, None)))
        }
    }
}

/// An MQTT 5 "not authorized" acknowledgement with the reason (none for QoS 0).
fn refusal(publish: &Publish, why: &str) -> Option<Packet> {
    let reason_string = Some(why.to_string());
    match publish.qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(Packet::PubAck(PubAck {
            pkid: publish.pkid,
            reason: PubAckReason::NotAuthorized,
            properties: Some(PubAckProperties {
                reason_string,
                user_properties: Vec::new(),
            }),
        })),
        QoS::ExactlyOnce => Some(Packet::PubRec(PubRec {
            pkid: publish.pkid,
            reason: PubRecReason::NotAuthorized,
            properties: Some(PubRecProperties {
                reason_string,
                user_properties: Vec::new(),
            }),
        })),
    }
}

/// The PUBLISH of a delivery (packet id set by the caller).
pub(crate) fn to_publish(delivery: Delivery, version: Version) -> Publish {
    let properties = match version {
        Version::V311 => None,
        Version::V5 if delivery.subscription_ids.is_empty() => {
            delivery.properties.map(Arc::unwrap_or_clone)
        }
        Version::V5 => Some(PublishProperties {
            subscription_identifiers: delivery.subscription_ids,
            ..delivery
                .properties
                .map(Arc::unwrap_or_clone)
                .unwrap_or_default()
        }),
    };
    Publish {
        dup: false,
        qos: delivery.qos,
        retain: delivery.retain,
        topic: Bytes::copy_from_slice(delivery.topic.as_bytes()),
        pkid: 0,
        payload: delivery.payload,
        properties,
    }
}

/// `telemetry/{child}` or `event/{child}`: what a gateway publishes for a child device.
fn child_topic(topic: &str) -> Option<(EventKind, &str)> {
    let (kind, child) = if let Some(child) = topic.strip_prefix("telemetry/") {
        (EventKind::Telemetry, child)
    } else {
        (EventKind::Event, topic.strip_prefix("event/")?)
    };
    Some((kind, child))
}

fn session_store_failed(e: tern_store::StoreError) -> Close {
    tracing::error!(error = %e, "cannot store the persistent session");
    Close::AppendFailed
}

/// Publishes a will once its delay has passed, unless the device connects again first.
fn delay_will(
    bridge: &Arc<Bridge>,
    tenant: TenantId,
    device: DeviceId,
    will: LastWill,
    delay: u32,
) {
    let cancelled = bridge.sessions.delay_will(tenant, device);
    let bridge = bridge.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = cancelled.cancelled() => tracing::info!(%device, "delayed will cancelled: the device is back"),
            _ = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => {
                bridge.sessions.will_published(tenant, device, &cancelled);
                let records = publish_will(&bridge, tenant, device, will).await;
                if let Err(e) = bridge.log.append(records).await {
                    tracing::error!(error = %e, "cannot append a delayed will to the event log");
                }
            }
        }
    });
}

/// The instant a wall-clock time (ms since the epoch) falls on, for timers.
fn instant_of(at_ms: i64) -> Instant {
    let from_now = u64::try_from(at_ms - tern_core::now_ms()).unwrap_or(0);
    Instant::now() + Duration::from_millis(from_now)
}

/// Sleeps until `until` (polled only while there is one: a pause, or a token's expiry).
async fn sleep_until_some(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// The next delivery for this connection (polled only once it has subscribed): what new
/// subscriptions are owed first, then the queue.
async fn next_delivery(
    backlog: &mut VecDeque<Delivery>,
    deliveries: &mut Option<mpsc::Receiver<Delivery>>,
) -> Option<Delivery> {
    if let Some(delivery) = backlog.pop_front() {
        return Some(delivery);
    }
    match deliveries {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for the oldest pending entry (acknowledgements go out in the order received).
async fn next_done(inflight: &mut VecDeque<Pending>) -> (Pending, Result<(), String>) {
    let result = match inflight.front_mut().and_then(|p| p.append.as_mut()) {
        Some(handle) => match handle.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        None => Ok(()),
    };
    let pending = inflight
        .pop_front()
        .expect("next_done is only polled with entries");
    (pending, result)
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Auth(_) => "AUTH",
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq(_) => "PINGREQ",
        Packet::PingResp(_) => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
    }
}
