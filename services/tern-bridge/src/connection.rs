//! One MQTT connection: CONNECT and authentication, then the packet loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, Publish,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use tern_core::{CommandId, DeviceId, TenantId};
use tern_eventlog::{EventLog, LogError, Position, Record};
use tern_proto::v1::EventKind;
use tern_runtime::Shutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::Instrument;

use crate::Bridge;
use crate::commands::{self, is_command_topic, parse_response_topic};
use crate::envelope::{EVENT_TOPIC, TELEMETRY_TOPIC, record};
use crate::lifecycle;
use crate::metrics::{KindLabel, ReasonLabel};
use crate::retained::RetainOutcome;
use crate::router::{Delivery, lower_qos};
use crate::topics::{InvalidTopic, validate_filter, validate_name};

/// How long a publisher waits for room in a full subscriber queue before that delivery is
/// dropped: long enough to ride out bursts, short enough that a stuck subscriber cannot stall
/// publishers indefinitely.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// QoS 1 deliveries a client may have unacknowledged before the bridge waits for PUBACKs.
const OUTBOUND_WINDOW: usize = 64;

/// Bytes reserved for a read when the buffer runs low.
const READ_CHUNK: usize = 8 * 1024;

/// Publishes appended together (or a reply that must keep its place in the order of
/// acknowledgements), waiting for the durable append.
struct Pending {
    append: Option<JoinHandle<Result<Vec<Position>, LogError>>>,
    replies: Vec<Packet>,
    /// Retained messages for a subscription, sent after its SUBACK.
    then_deliver: Vec<Delivery>,
    publishes: usize,
    received: Instant,
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
    /// Publishes received and not yet acknowledged (including the open batch).
    unacked: usize,
    /// This connection's id in the router.
    connection: u64,
    /// The queue of deliveries, created by the first SUBSCRIBE: a connection that never
    /// subscribes (most devices) allocates none.
    queue: Option<mpsc::Sender<Delivery>>,
    deliveries: Option<mpsc::Receiver<Delivery>>,
    /// Retained messages owed to new subscriptions (after their SUBACK), sent ahead of the
    /// queue.
    backlog: VecDeque<Delivery>,
    /// QoS 1 deliveries sent and not yet acknowledged, by packet id, with the command each
    /// carries.
    awaiting_ack: HashMap<u16, Option<CommandId>>,
    next_pkid: u16,
}

impl Flow {
    /// Starts the durable append of the open batch, if any.
    fn seal(&mut self, log: &Arc<dyn EventLog>) {
        if self.batch.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.batch);
        let publishes = records.len();
        let log = log.clone();
        self.inflight.push_back(Pending {
            append: Some(tokio::spawn(async move { log.append(records).await })),
            replies: std::mem::take(&mut self.batch_replies),
            then_deliver: Vec::new(),
            publishes,
            received: Instant::now(),
        });
    }

    /// The next delivery that is ready without waiting: retained backlog first, then the queue.
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
        });
    }
}

/// Why a connection ended; becomes a metric label and a log field.
#[derive(Debug, Clone, Copy)]
enum Close {
    ClientDisconnect,
    ClientClosed,
    KeepaliveExpired,
    TakenOver,
    ServerShutdown,
    ProtocolError,
    NotAuthorized,
    AppendFailed,
    WriteFailed,
}

impl Close {
    fn label(self) -> &'static str {
        match self {
            Self::ClientDisconnect => "client_disconnect",
            Self::ClientClosed => "client_closed",
            Self::KeepaliveExpired => "keepalive_expired",
            Self::TakenOver => "session_taken_over",
            Self::ServerShutdown => "server_shutdown",
            Self::ProtocolError => "protocol_error",
            Self::NotAuthorized => "not_authorized",
            Self::AppendFailed => "append_failed",
            Self::WriteFailed => "write_failed",
        }
    }

    fn is_error(self) -> bool {
        matches!(
            self,
            Self::ProtocolError | Self::NotAuthorized | Self::AppendFailed | Self::WriteFailed
        )
    }

    /// MQTT 3.1.1 3.1.2.5: the will is published unless the client said DISCONNECT. A server
    /// shutdown is not the device's failure, so it does not publish wills either.
    fn publishes_will(self) -> bool {
        !matches!(self, Self::ClientDisconnect | Self::ServerShutdown)
    }
}

/// An admitted client.
struct Admitted {
    tenant: TenantId,
    device: DeviceId,
    keepalive: u16,
    will: Option<LastWill>,
}

struct Connection {
    bridge: Arc<Bridge>,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    inbox: BytesMut,
    outbox: BytesMut,
}

pub(crate) async fn run(
    bridge: Arc<Bridge>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: Shutdown,
) {
    let span = tracing::info_span!("mqtt", %peer, tenant = tracing::field::Empty, device = tracing::field::Empty);
    async move {
        let (reader, writer) = stream.into_split();
        let mut conn = Connection {
            bridge,
            reader,
            writer,
            inbox: BytesMut::new(),
            outbox: BytesMut::new(),
        };
        let Some(Admitted {
            tenant,
            device,
            keepalive,
            will,
        }) = conn.handshake().await
        else {
            return;
        };
        let span = tracing::Span::current();
        span.record("tenant", tracing::field::display(tenant));
        span.record("device", tracing::field::display(device));
        let bridge = conn.bridge.clone();
        bridge.metrics.connections_total.inc();
        bridge.metrics.connections.inc();
        let session = bridge.sessions.claim(tenant, device);
        tracing::info!(keepalive, "device connected");
        let log = bridge.log.clone();
        let connected = lifecycle::connected(tenant, device, peer, "mqtt/3.1.1");
        let connected = tokio::spawn(async move { log.append(vec![connected]).await });
        let close = conn
            .serve(
                tenant,
                device,
                keepalive,
                session.id,
                &session.closed,
                &shutdown,
            )
            .await;
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
            records.extend(publish_will(&bridge, tenant, device, will).await);
        }
        records.push(lifecycle::disconnected(tenant, device, close.label()));
        // After the connected event, so that a device's lifecycle stays in order in the log.
        let _ = connected.await;
        if let Err(e) = bridge.log.append(records).await {
            tracing::error!(error = %e, "cannot append the disconnect to the event log");
        }
    }
    .instrument(span)
    .await
}

impl Connection {
    /// Reads the next complete packet. Cancel-safe: bytes read so far stay in `inbox`.
    ///
    /// The read buffer is allocated only when the socket is readable and released whenever it
    /// is empty, so an idle connection holds no buffer at all.
    async fn read_packet(&mut self) -> Result<Option<Packet>, CodecError> {
        loop {
            match Packet::read(&mut self.inbox, self.bridge.config.max_packet_size) {
                Ok(packet) => return Ok(Some(packet)),
                Err(CodecError::InsufficientBytes(_)) => {
                    if self.inbox.is_empty() {
                        self.inbox = BytesMut::new();
                    }
                    self.reader.readable().await?;
                    if self.inbox.capacity() - self.inbox.len() < READ_CHUNK / 4 {
                        self.inbox.reserve(READ_CHUNK);
                    }
                    match self.reader.try_read_buf(&mut self.inbox) {
                        Ok(0) => return Ok(None),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send(&mut self, packet: &Packet) -> Result<(), CodecError> {
        self.outbox.clear();
        packet.write(&mut self.outbox, usize::MAX)?;
        self.writer.write_all(&self.outbox).await?;
        self.bridge.metrics.packets_out.inc();
        Ok(())
    }

    /// Waits for CONNECT and authenticates it. Returns the device and keepalive on success; on
    /// failure the CONNACK refusal (where one is due) has been sent and the caller closes.
    async fn handshake(&mut self) -> Option<Admitted> {
        let limit = Duration::from_secs(self.bridge.config.connect_timeout_secs);
        let connect = match timeout(limit, self.read_packet()).await {
            Err(_) => return self.refuse_silently("connect_timeout"),
            Ok(Ok(None)) => return None,
            Ok(Ok(Some(Packet::Connect(connect)))) => connect,
            Ok(Ok(Some(other))) => {
                tracing::info!(packet = ?packet_name(&other), "first packet was not CONNECT");
                return self.refuse_silently("not_connect");
            }
            Ok(Err(CodecError::InvalidProtocolLevel(level))) => {
                tracing::info!(level, "unsupported MQTT protocol level");
                return self
                    .refuse(
                        ConnectReturnCode::RefusedProtocolVersion,
                        "protocol_version",
                    )
                    .await;
            }
            Ok(Err(e)) => {
                tracing::info!(error = %e, "malformed CONNECT");
                return self.refuse_silently("malformed_connect");
            }
        };
        self.authenticate(connect).await
    }

    async fn authenticate(&mut self, connect: Connect) -> Option<Admitted> {
        use ConnectReturnCode::*;
        if connect.protocol != Protocol::V4 {
            return self
                .refuse(RefusedProtocolVersion, "protocol_version")
                .await;
        }
        if let Some(will) = &connect.last_will
            && let Err(InvalidTopic(why)) = validate_name(&will.topic).and_then(|()| {
                if is_command_topic(&will.topic) {
                    Err(InvalidTopic("wills may not be published under command/"))
                } else {
                    Ok(())
                }
            })
        {
            // MQTT 3.1.1 3.1.2.9: an invalid will topic makes the CONNECT malformed.
            tracing::info!(topic = %will.topic, why, "invalid will topic; closing");
            let _ = self.writer.shutdown().await;
            return self.refuse_silently("bad_will_topic");
        }
        let (tenant, device) = match &connect.login {
            Some(_) => self.authenticate_device(&connect).await?,
            None => match self.bridge.anonymous_tenant {
                Some(tenant) => (tenant, self.anonymous_device(tenant, &connect).await?),
                None => {
                    tracing::info!("CONNECT without credentials");
                    return self.refuse(BadUserNamePassword, "no_credentials").await;
                }
            },
        };
        self.send(&Packet::ConnAck(ConnAck::new(Success, false)))
            .await
            .ok()?;
        Some(Admitted {
            tenant,
            device,
            keepalive: connect.keep_alive,
            will: connect.last_will,
        })
    }

    /// A device's own credentials: its id as user name and its access token as password.
    async fn authenticate_device(&mut self, connect: &Connect) -> Option<(TenantId, DeviceId)> {
        use ConnectReturnCode::*;
        let login = connect.login.as_ref()?;
        let Ok(device_id) = DeviceId::parse(&login.username) else {
            tracing::info!("CONNECT username is not a device id");
            return self.refuse(BadUserNamePassword, "bad_username").await;
        };
        if !connect.client_id.is_empty() && connect.client_id != login.username {
            tracing::info!(client_id = %connect.client_id, "client id differs from the device id");
            return self.refuse(BadClientId, "bad_client_id").await;
        }
        let principal = match self.bridge.identity.verify_device_token(&login.password) {
            Ok(p) if p.device_id == device_id => p,
            Ok(_) => {
                tracing::info!(%device_id, "token belongs to another device");
                return self
                    .refuse(BadUserNamePassword, "token_device_mismatch")
                    .await;
            }
            Err(_) => {
                tracing::info!(%device_id, "invalid or expired token");
                return self.refuse(BadUserNamePassword, "bad_token").await;
            }
        };
        match self
            .bridge
            .registry
            .device_of(principal.tenant_id, &device_id.to_string())
            .await
        {
            Ok(device) if !device.disabled => {}
            Ok(_) => {
                tracing::info!(%device_id, "device is disabled");
                return self.refuse(NotAuthorized, "device_disabled").await;
            }
            Err(e) => {
                tracing::info!(%device_id, error = %e, "device not in the registry");
                return self.refuse(NotAuthorized, "unknown_device").await;
            }
        }
        Some((principal.tenant_id, device_id))
    }

    /// Anonymous mode: a client id that names a registered device of the tenant acts as that
    /// device; any other client id gets a stable id derived from it (so session takeover works),
    /// and an empty one (clean session only, 3.1.3-7) a fresh id.
    async fn anonymous_device(&mut self, tenant: TenantId, connect: &Connect) -> Option<DeviceId> {
        use ConnectReturnCode::*;
        let client_id = connect.client_id.as_str();
        if client_id.is_empty() {
            if !connect.clean_session {
                return self.refuse(BadClientId, "empty_client_id").await;
            }
            return Some(DeviceId::random());
        }
        match self.bridge.registry.device_of(tenant, client_id).await {
            Ok(device) if device.disabled => {
                tracing::info!(client_id, "device is disabled");
                self.refuse(NotAuthorized, "device_disabled").await
            }
            Ok(device) => Some(device.id),
            Err(_) => Some(derived_device_id(tenant, client_id)),
        }
    }

    async fn refuse<T>(&mut self, code: ConnectReturnCode, reason: &'static str) -> Option<T> {
        let _ = self.send(&Packet::ConnAck(ConnAck::new(code, false))).await;
        let _ = self.writer.shutdown().await;
        self.refuse_silently(reason)
    }

    fn refuse_silently<T>(&self, reason: &'static str) -> Option<T> {
        self.bridge
            .metrics
            .connect_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
        None
    }

    /// The packet loop of an authenticated connection.
    async fn serve(
        &mut self,
        tenant: TenantId,
        device: DeviceId,
        keepalive: u16,
        connection: u64,
        taken_over: &Shutdown,
        shutdown: &Shutdown,
    ) -> Close {
        // MQTT 3.1.1 3.1.2.10: the server disconnects after 1.5 keepalive periods of silence.
        let grace = (keepalive > 0).then(|| Duration::from_millis(u64::from(keepalive) * 1500));
        let far_future = Duration::from_secs(365 * 24 * 3600);
        let mut deadline = Instant::now() + grace.unwrap_or(far_future);
        let max_inflight = self.bridge.config.max_inflight.max(1);
        let mut flow = Flow {
            tenant,
            device,
            inflight: VecDeque::new(),
            qos2: HashSet::new(),
            batch: Vec::new(),
            batch_replies: Vec::new(),
            unacked: 0,
            connection,
            queue: None,
            deliveries: None,
            backlog: VecDeque::new(),
            awaiting_ack: HashMap::new(),
            next_pkid: 0,
        };

        let close = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Close::ServerShutdown,
                _ = taken_over.cancelled() => break Close::TakenOver,
                delivery = next_delivery(&mut flow.backlog, &mut flow.deliveries),
                    if flow.deliveries.is_some() && flow.awaiting_ack.len() < OUTBOUND_WINDOW =>
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
                read = timeout_at(deadline, self.read_packet()), if flow.unacked < max_inflight => {
                    let packet = match read {
                        Err(_) => break Close::KeepaliveExpired,
                        Ok(Ok(None)) => break Close::ClientClosed,
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "malformed packet; closing");
                            break Close::ProtocolError;
                        }
                        Ok(Ok(Some(packet))) => packet,
                    };
                    deadline = Instant::now() + grace.unwrap_or(far_future);
                    if let Err(close) = self.handle_burst(packet, &mut flow, max_inflight).await {
                        break close;
                    }
                }
            }
        };
        self.bridge.router.drop_connection(tenant, connection);
        self.bridge
            .command_targets
            .drop_connection(tenant, device, connection);
        // Whatever was received is acknowledged once durable, even when closing.
        flow.seal(&self.bridge.log);
        while !flow.inflight.is_empty() {
            let done = next_done(&mut flow.inflight).await;
            if self.acknowledge(done).await.is_err() {
                break;
            }
        }
        let _ = self.writer.shutdown().await;
        close
    }

    /// Handles `first` and every further packet already buffered (a pipelining client sends
    /// many per read), so that their publishes are appended as one batch.
    async fn handle_burst(
        &mut self,
        first: Packet,
        flow: &mut Flow,
        max_inflight: usize,
    ) -> Result<(), Close> {
        let mut packet = first;
        loop {
            if !self.handle(packet, flow).await? {
                flow.seal(&self.bridge.log);
                return Err(Close::ClientDisconnect);
            }
            if flow.unacked >= max_inflight {
                break;
            }
            packet = match Packet::read(&mut self.inbox, self.bridge.config.max_packet_size) {
                Ok(next) => next,
                Err(CodecError::InsufficientBytes(_)) => break,
                Err(e) => {
                    tracing::info!(error = %e, "malformed packet; closing");
                    flow.seal(&self.bridge.log);
                    return Err(Close::ProtocolError);
                }
            };
        }
        flow.seal(&self.bridge.log);
        Ok(())
    }

    /// Handles a SUBSCRIBE: plain filters go to the tenant's router (and get the matching
    /// retained messages), filters under `command/` to the device's own command route (and get
    /// its pending commands). Both follow the SUBACK.
    async fn subscribe(&mut self, subscribe: Subscribe, flow: &mut Flow) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut owed = Vec::new();
        let capacity = self.bridge.config.max_queued_messages.max(1);
        let queue = flow
            .queue
            .get_or_insert_with(|| {
                let (queue, deliveries) = mpsc::channel(capacity);
                flow.deliveries = Some(deliveries);
                queue
            })
            .clone();
        for filter in &subscribe.filters {
            if let Err(InvalidTopic(why)) = validate_filter(&filter.path) {
                tracing::info!(filter = %filter.path, why, "invalid topic filter; closing");
                return Err(Close::ProtocolError);
            }
            // Deliveries go out with QoS 0 or 1; QoS 2 requests are granted QoS 1, which MQTT
            // allows (the SUBACK says so).
            let granted = lower_qos(filter.qos, QoS::AtLeastOnce);
            if is_command_topic(&filter.path) {
                self.bridge.command_targets.subscribe(
                    flow.tenant,
                    flow.device,
                    flow.connection,
                    &filter.path,
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
                owed.extend(
                    pending
                        .iter()
                        .filter_map(|c| commands::owed(c, &filter.path, granted)),
                );
            } else {
                self.bridge.router.subscribe(
                    flow.tenant,
                    flow.connection,
                    &filter.path,
                    granted,
                    queue.clone(),
                );
                // 3.3.1-6 and 3.8.4-3: every matching retained message goes to a new (or
                // replaced) subscription, flagged as retained (3.3.1-8).
                for message in self.bridge.retained.matching(flow.tenant, &filter.path) {
                    owed.push(Delivery {
                        topic: message.topic,
                        payload: message.payload,
                        qos: lower_qos(message.qos, granted),
                        retain: true,
                        command: None,
                    });
                }
            }
            codes.push(SubscribeReasonCode::Success(granted));
        }
        let suback = Packet::SubAck(SubAck::new(subscribe.pkid, codes));
        flow.reply_then_deliver(&self.bridge.log, suback, owed);
        Ok(())
    }

    /// Records (in the background) that the device received a command.
    fn command_delivered(&self, flow: &Flow, command: CommandId) {
        let commands = self.bridge.commands.clone();
        let (tenant, device) = (flow.tenant, flow.device);
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
            let pkid = if delivery.qos == QoS::AtMostOnce {
                0
            } else {
                loop {
                    flow.next_pkid = flow.next_pkid % u16::MAX + 1;
                    if !flow.awaiting_ack.contains_key(&flow.next_pkid) {
                        break flow.next_pkid;
                    }
                }
            };
            let command = delivery.command;
            let mut publish = Publish::from_bytes(&*delivery.topic, delivery.qos, delivery.payload);
            publish.pkid = pkid;
            publish.retain = delivery.retain;
            Packet::Publish(publish)
                .write(&mut self.outbox, usize::MAX)
                .map_err(|_| Close::WriteFailed)?;
            if pkid != 0 {
                flow.awaiting_ack.insert(pkid, command);
            } else if let Some(command) = command {
                // At most once: written is as delivered as it gets.
                self.command_delivered(flow, command);
            }
            sent += 1;
            next = if flow.awaiting_ack.len() < OUTBOUND_WINDOW {
                flow.next_ready()
            } else {
                None
            };
        }
        self.writer
            .write_all(&self.outbox)
            .await
            .map_err(|_| Close::WriteFailed)?;
        self.bridge.metrics.packets_out.inc_by(sent);
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
            reply
                .write(&mut self.outbox, usize::MAX)
                .map_err(|_| Close::WriteFailed)?;
        }
        if !self.outbox.is_empty() {
            self.writer
                .write_all(&self.outbox)
                .await
                .map_err(|_| Close::WriteFailed)?;
            self.bridge
                .metrics
                .packets_out
                .inc_by(pending.replies.len() as u64);
        }
        Ok(())
    }

    /// Handles one packet; `Ok(false)` is a clean DISCONNECT.
    async fn handle(&mut self, packet: Packet, flow: &mut Flow) -> Result<bool, Close> {
        let log = &self.bridge.log;
        match packet {
            Packet::Publish(publish) => {
                if publish.qos == QoS::ExactlyOnce && flow.qos2.contains(&publish.pkid) {
                    // A resent QoS 2 publish: already stored (or being stored); answer again
                    // in order without storing twice.
                    flow.reply_in_order(log, Packet::PubRec(PubRec::new(publish.pkid)));
                    return Ok(true);
                }
                match self.accept_publish(publish, flow)? {
                    Accepted::Durable(record, reply) => {
                        flow.batch.push(record);
                        flow.batch_replies.extend(reply);
                        flow.unacked += 1;
                    }
                    Accepted::CommandResponse {
                        reply,
                        command,
                        status,
                        payload,
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
                        if let Some(reply) = reply {
                            flow.reply_in_order(&self.bridge.log, reply);
                        }
                    }
                    Accepted::Routed(reply, waiting, retain) => {
                        hand_over(&self.bridge, waiting, flow.queue.as_ref()).await;
                        if let Some((topic, payload, qos)) = retain {
                            retain_message(&self.bridge, flow.tenant, &topic, payload, qos)
                                .await
                                .map_err(|()| Close::AppendFailed)?;
                        }
                        if let Some(reply) = reply {
                            flow.reply_in_order(&self.bridge.log, reply);
                        }
                    }
                }
            }
            Packet::PubRel(rel) => {
                flow.qos2.remove(&rel.pkid);
                flow.reply_in_order(log, Packet::PubComp(PubComp::new(rel.pkid)));
            }
            Packet::Subscribe(subscribe) => self.subscribe(subscribe, flow).await?,
            Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.topics {
                    self.bridge
                        .router
                        .unsubscribe(flow.tenant, flow.connection, filter);
                    self.bridge.command_targets.unsubscribe(
                        flow.tenant,
                        flow.device,
                        flow.connection,
                        filter,
                    );
                }
                flow.reply_in_order(log, Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
            }
            Packet::PubAck(ack) => {
                if let Some(Some(command)) = flow.awaiting_ack.remove(&ack.pkid) {
                    self.command_delivered(flow, command);
                }
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp)
                    .await
                    .map_err(|_| Close::WriteFailed)?;
            }
            Packet::Disconnect => return Ok(false),
            other => {
                tracing::info!(
                    packet = packet_name(&other),
                    "unexpected packet from a client; closing"
                );
                return Err(Close::ProtocolError);
            }
        }
        Ok(true)
    }

    /// Checks a publish: `telemetry` and `event` become log records (acknowledged once durable);
    /// any other topic is routed to the tenant's subscribers and acknowledged at once.
    fn accept_publish(&self, publish: Publish, flow: &mut Flow) -> Result<Accepted, Close> {
        let metrics = &self.bridge.metrics;
        let reply = match publish.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(publish.pkid))),
            QoS::ExactlyOnce => {
                flow.qos2.insert(publish.pkid);
                Some(Packet::PubRec(PubRec::new(publish.pkid)))
            }
        };
        metrics.bytes_in.inc_by(publish.payload.len() as u64);
        let kind = match publish.topic.as_str() {
            TELEMETRY_TOPIC => EventKind::Telemetry,
            EVENT_TOPIC => EventKind::Event,
            topic if is_command_topic(topic) => {
                let (command, status) = parse_response_topic(topic).map_err(|why| {
                    // 3.3.5: a publish the server does not authorise is refused by closing.
                    tracing::info!(topic, why, "publish under command/ refused; closing");
                    Close::NotAuthorized
                })?;
                metrics
                    .messages_in
                    .get_or_create(&KindLabel {
                        kind: "command_response",
                    })
                    .inc();
                return Ok(Accepted::CommandResponse {
                    reply,
                    command,
                    status,
                    payload: publish.payload,
                });
            }
            topic => {
                if let Err(InvalidTopic(why)) = validate_name(topic) {
                    tracing::info!(topic, why, "invalid topic name; closing");
                    return Err(Close::ProtocolError);
                }
                metrics
                    .messages_in
                    .get_or_create(&KindLabel { kind: "pubsub" })
                    .inc();
                let routed =
                    self.bridge
                        .router
                        .route(flow.tenant, topic, &publish.payload, publish.qos);
                metrics.deliveries.inc_by(routed.delivered as u64);
                metrics.deliveries_dropped.inc_by(routed.dropped as u64);
                let retain = publish
                    .retain
                    .then(|| (publish.topic.clone(), publish.payload, publish.qos));
                return Ok(Accepted::Routed(reply, routed.waiting, retain));
            }
        };
        metrics
            .messages_in
            .get_or_create(&KindLabel {
                kind: if kind == EventKind::Event {
                    "event"
                } else {
                    "telemetry"
                },
            })
            .inc();
        let record = record(
            flow.tenant,
            flow.device,
            kind,
            &publish.topic,
            publish.payload,
        );
        Ok(Accepted::Durable(record, reply))
    }
}

/// What became of an accepted publish, with the acknowledgement it is owed.
enum Accepted {
    /// Goes to the event log; acknowledged once durable.
    Durable(Record, Option<Packet>),
    /// A device's answer to a command; acknowledged once the command's state is stored.
    CommandResponse {
        reply: Option<Packet>,
        command: CommandId,
        status: u16,
        payload: bytes::Bytes,
    },
    /// Routed to subscribers; acknowledged in order once every QoS 1 delivery is queued and
    /// the retained message (topic, payload, QoS), if any, is stored.
    Routed(
        Option<Packet>,
        Vec<(mpsc::Sender<Delivery>, Delivery)>,
        Option<(String, bytes::Bytes, QoS)>,
    ),
}

/// The next delivery for this connection (polled only once it has subscribed): retained
/// messages for new subscriptions first, then the queue.
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

/// Waits for room in full subscriber queues (a publisher's back pressure), for at most
/// `DELIVERY_WAIT` each; a subscriber stuck that long loses the delivery, counted. A full
/// queue of the publishing connection itself cannot drain while it waits, so that delivery is
/// dropped at once.
async fn hand_over(
    bridge: &Bridge,
    waiting: Vec<(mpsc::Sender<Delivery>, Delivery)>,
    own: Option<&mpsc::Sender<Delivery>>,
) {
    let metrics = &bridge.metrics;
    for (queue, delivery) in waiting {
        if own.is_some_and(|own| queue.same_channel(own)) {
            metrics.deliveries_dropped.inc();
            continue;
        }
        let counter = match queue.send_timeout(delivery, DELIVERY_WAIT).await {
            Ok(()) => &metrics.deliveries,
            Err(_) => &metrics.deliveries_dropped,
        };
        counter.inc();
    }
}

/// Sets or clears (empty payload, 3.3.1-10) a retained message. A tenant at its retained quota
/// keeps its old messages and the publish is only delivered; `Err` means the store failed and
/// the publish must not be acknowledged.
async fn retain_message(
    bridge: &Bridge,
    tenant: TenantId,
    topic: &str,
    payload: bytes::Bytes,
    qos: QoS,
) -> Result<(), ()> {
    match bridge.retained.set(tenant, topic, payload, qos).await {
        Ok(RetainOutcome::Stored | RetainOutcome::Cleared) => Ok(()),
        Ok(RetainOutcome::QuotaExceeded) => {
            bridge.metrics.retained_refused.inc();
            tracing::info!(
                topic,
                limit = bridge.config.max_retained_per_tenant,
                "retained message quota reached; delivered but not retained"
            );
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, topic, "cannot store a retained message");
            Err(())
        }
    }
}

/// Publishes a will as if the device had sent it: `telemetry`/`event` wills go to the event log,
/// others to the tenant's subscribers (and the retained store when flagged). Returns the records
/// to append, the lifecycle event first.
async fn publish_will(
    bridge: &Bridge,
    tenant: TenantId,
    device: DeviceId,
    will: LastWill,
) -> Vec<Record> {
    let mut records = vec![lifecycle::will_published(tenant, device, &will.topic)];
    match will.topic.as_str() {
        TELEMETRY_TOPIC => records.push(record(
            tenant,
            device,
            EventKind::Telemetry,
            TELEMETRY_TOPIC,
            will.message,
        )),
        EVENT_TOPIC => records.push(record(
            tenant,
            device,
            EventKind::Event,
            EVENT_TOPIC,
            will.message,
        )),
        topic => {
            let routed = bridge.router.route(tenant, topic, &will.message, will.qos);
            bridge.metrics.deliveries.inc_by(routed.delivered as u64);
            bridge
                .metrics
                .deliveries_dropped
                .inc_by(routed.dropped as u64);
            hand_over(bridge, routed.waiting, None).await;
            if will.retain {
                let _ = retain_message(bridge, tenant, topic, will.message, will.qos).await;
            }
        }
    }
    tracing::info!(topic = %will.topic, "will published");
    records
}

/// A stable device id for an anonymous client id: the same client id always maps to the same
/// id within a tenant, and never collides with another tenant's.
fn derived_device_id(tenant: TenantId, client_id: &str) -> DeviceId {
    use aws_lc_rs::digest::{Context, SHA256};
    let mut hash = Context::new(&SHA256);
    hash.update(tenant.0.as_bytes());
    hash.update(client_id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash.finish().as_ref()[..16]);
    DeviceId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
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
        Packet::Connect(_) => "CONNECT",
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
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}
