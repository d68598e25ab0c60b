//! The CoAP device endpoint (RFC 7252 over UDP, port 5683), for devices too small or too
//! sleepy to keep an MQTT connection. Same credentials, tenancy and durability as MQTT and the
//! HTTP device API:
//!
//! - `POST /telemetry`, `POST /event` (and `/telemetry/{child}`, `/event/{child}` for a
//!   gateway): the response (2.01 Created) is sent once the message is durable in the event
//!   log; a confirmable request's retransmissions are recognised (`exchanges.rs`) and never
//!   stored twice. Payloads larger than a datagram arrive block-wise (Block1, RFC 7959).
//! - `GET /commands`: the device's pending commands; with Observe (RFC 7641), every command
//!   that arrives later is pushed as a confirmable notification (`observe.rs`).
//! - `POST /commands/{id}/response`: the device's answer, `{"status": 200, "payload": ...}`.
//!
//! The device's access token travels in option 65003 ("Access-Token": from the experimental
//! range, critical and unsafe, so a server or proxy that does not know it refuses the request
//! rather than dropping it); a JWT is longer than a Uri-Query option may be. Tokens cross the
//! network in clear over plain CoAP: DTLS is not offered yet, so use it on trusted networks.

mod exchanges;
mod observe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use coap_lite::block_handler::BlockValue;
use coap_lite::{
    BlockHandler, BlockHandlerConfig, CoapOption, CoapRequest, ContentFormat, MessageClass,
    MessageType, ObserveOption, Packet, RequestType, ResponseType,
};
use serde::Deserialize;
use tern_core::{CommandId, Device};
use tern_eventlog::{EVENT_TOPIC, TELEMETRY_TOPIC, device_record};
use tern_identity::DeviceAuthError;
use tern_proto::v1::EventKind;
use tern_registry::RegistryError;
use tern_runtime::Shutdown;
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Bridge;
use exchanges::{Exchanges, Seen};
use observe::Observers;

/// The option that carries the device's access token.
pub const ACCESS_TOKEN_OPTION: u16 = 65003;
/// Requests handled at once; beyond, 5.03 with Max-Age tells the device when to come back.
const MAX_CONCURRENT_REQUESTS: usize = 4096;
/// Exchanges remembered for deduplication.
const MAX_EXCHANGES: usize = 200_000;
/// Options this endpoint understands; an unknown critical (odd-numbered) option is refused
/// with 4.02 (RFC 7252 section 5.4.1).
const KNOWN_CRITICAL: [u16; 7] = [3, 7, 11, 15, 17, 23, 27];

/// The shared state of the endpoint.
pub(crate) struct Coap {
    bridge: Arc<Bridge>,
    socket: UdpSocket,
    exchanges: Mutex<Exchanges>,
    blocks: Mutex<BlockHandler<SocketAddr>>,
    observers: Observers,
    next_message_id: AtomicU16,
    requests: Arc<Semaphore>,
}

/// Serves CoAP on `socket` until `shutdown`.
pub(crate) async fn serve(bridge: Arc<Bridge>, socket: UdpSocket, shutdown: Shutdown) {
    let coap = Arc::new(Coap {
        bridge,
        socket,
        exchanges: Mutex::new(Exchanges::new(MAX_EXCHANGES)),
        blocks: Mutex::new(BlockHandler::new(BlockHandlerConfig::default())),
        observers: Observers::default(),
        next_message_id: AtomicU16::new(std::process::id() as u16),
        requests: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (len, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = coap.socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    // ICMP errors of earlier sends surface here on some systems: not fatal.
                    tracing::debug!(error = %e, "CoAP receive failed");
                    continue;
                }
            },
        };
        coap.received(&buf[..len], peer, &shutdown).await;
    }
    coap.observers.cancel_all();
    tracing::info!("CoAP endpoint stopped");
}

impl Coap {
    async fn received(self: &Arc<Self>, datagram: &[u8], peer: SocketAddr, shutdown: &Shutdown) {
        let metrics = &self.bridge.metrics;
        let packet = match Packet::from_bytes(datagram) {
            Ok(packet) => packet,
            Err(e) => {
                metrics.coap_malformed.inc();
                tracing::debug!(%peer, error = ?e, "malformed CoAP message");
                // 4.2: a confirmable message that cannot be parsed is rejected with a reset.
                if datagram.len() >= 4 && (datagram[0] >> 4) & 0x3 == 0 {
                    let message_id = u16::from_be_bytes([datagram[2], datagram[3]]);
                    self.send_reset(peer, message_id).await;
                }
                return;
            }
        };
        let message_id = packet.header.message_id;
        match packet.header.get_type() {
            MessageType::Acknowledgement | MessageType::Reset => {
                self.observers.answered(
                    peer,
                    message_id,
                    packet.header.get_type() == MessageType::Acknowledgement,
                );
                return;
            }
            MessageType::Confirmable | MessageType::NonConfirmable => {}
        }
        if !matches!(packet.header.code, MessageClass::Request(_)) {
            // An empty confirmable message is a "CoAP ping" (4.3): answered with a reset.
            if packet.header.get_type() == MessageType::Confirmable {
                self.send_reset(peer, message_id).await;
            }
            return;
        }
        let seen = self
            .exchanges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin(peer, message_id, Instant::now());
        match seen {
            Seen::New => {}
            Seen::Again(response) => {
                metrics.coap_duplicates.inc();
                if let Some(response) = response {
                    let _ = self.socket.send_to(&response, peer).await;
                }
                return;
            }
            Seen::Full => {
                self.overloaded(packet, peer).await;
                return;
            }
        }
        let Ok(permit) = self.requests.clone().try_acquire_owned() else {
            self.overloaded(packet, peer).await;
            return;
        };
        metrics.coap_requests.inc();
        let coap = self.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { coap.handle(packet, peer, permit, shutdown).await });
    }

    async fn handle(
        self: Arc<Self>,
        packet: Packet,
        peer: SocketAddr,
        _permit: OwnedSemaphorePermit,
        shutdown: Shutdown,
    ) {
        let message_id = packet.header.message_id;
        let non = packet.header.get_type() == MessageType::NonConfirmable;
        let mut request = CoapRequest::from_packet(packet, peer);
        self.respond(&mut request, &shutdown).await;
        let Some(mut response) = request.response else {
            return;
        };
        if non {
            // A non-confirmable response is a message of its own, with its own id (5.2.3).
            response.message.header.message_id = self.message_id();
        }
        let bytes = match response.message.to_bytes_unlimited() {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = ?e, "cannot encode a CoAP response");
                return;
            }
        };
        // Remembered before it is sent: a retransmission may arrive as soon as it is out.
        self.exchanges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .answered(peer, message_id, bytes.clone());
        let _ = self.socket.send_to(&bytes, peer).await;
    }

    /// Fills in the request's response.
    async fn respond(self: &Arc<Self>, request: &mut CoapRequest<SocketAddr>, shutdown: &Shutdown) {
        if let Err(answer) = self.admit(request) {
            answer.apply(request);
            return;
        }
        let intercepted = self
            .blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .intercept_request(request);
        match intercepted {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                request.apply_from_error(e);
                return;
            }
        }
        let answer = match self.route(request, shutdown).await {
            Ok(answer) | Err(answer) => answer,
        };
        answer.apply(request);
        // Responses larger than a datagram go out block-wise (Block2).
        let intercepted = self
            .blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .intercept_response(request);
        if let Err(e) = intercepted {
            request.apply_from_error(e);
        }
    }

    /// Checks what must hold before any handling: known critical options and a payload
    /// within `mqtt.max_packet_size` (also across Block1 blocks).
    fn admit(&self, request: &CoapRequest<SocketAddr>) -> Result<(), Answer> {
        for (&number, _) in request.message.options() {
            if number % 2 == 1 && number != ACCESS_TOKEN_OPTION && !KNOWN_CRITICAL.contains(&number)
            {
                return Err(Answer::error(
                    ResponseType::BadOption,
                    format!("option {number} is not supported"),
                ));
            }
        }
        let max = self.bridge.config.max_packet_size;
        let block1 = request
            .message
            .get_first_option_as::<BlockValue>(CoapOption::Block1)
            .and_then(Result::ok);
        let end = match block1 {
            Some(block) => (usize::from(block.num) + 1) * block.size(),
            None => request.message.payload.len(),
        };
        if end > max {
            return Err(Answer::error(
                ResponseType::RequestEntityTooLarge,
                format!("payloads are at most {max} bytes"),
            )
            .with_size1(max));
        }
        Ok(())
    }

    async fn route(
        self: &Arc<Self>,
        request: &mut CoapRequest<SocketAddr>,
        shutdown: &Shutdown,
    ) -> Result<Answer, Answer> {
        let path = request.get_path();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let method = *request.get_method();
        let kind = |stream: &str| match stream {
            TELEMETRY_TOPIC => Some(EventKind::Telemetry),
            EVENT_TOPIC => Some(EventKind::Event),
            _ => None,
        };
        match (method, segments.as_slice()) {
            (RequestType::Post, [stream, child @ ..])
                if child.len() <= 1 && kind(stream).is_some() =>
            {
                let device = self.authenticate(request).await?;
                let kind = kind(stream).expect("checked above");
                let topic = match child.first() {
                    Some(child) => format!("{}/{child}", kind_topic(kind)),
                    None => kind_topic(kind).to_string(),
                };
                self.permit(request, &device, "publish", &topic).await?;
                let payload = Bytes::from(std::mem::take(&mut request.message.payload));
                self.append(&device, kind, child.first().copied(), payload)
                    .await
            }
            (RequestType::Get, ["commands"]) => {
                let device = self.authenticate(request).await?;
                self.permit(request, &device, "subscribe", "command/req/#")
                    .await?;
                match request.get_observe_flag() {
                    Some(Ok(ObserveOption::Register)) => {
                        let token = access_token(request).unwrap_or_default();
                        self.observe(request, device, token, shutdown).await
                    }
                    Some(Ok(ObserveOption::Deregister)) => {
                        self.observers.deregister(
                            &device,
                            request.source,
                            request.message.get_token(),
                        );
                        self.pending_commands(&device).await
                    }
                    Some(Err(_)) => Err(Answer::bad_request("the Observe option must be 0 or 1")),
                    None => self.pending_commands(&device).await,
                }
            }
            (RequestType::Post, ["commands", id, "response"]) => {
                let device = self.authenticate(request).await?;
                self.permit(request, &device, "publish", "command/res")
                    .await?;
                self.command_response(&device, id, &request.message.payload)
                    .await
            }
            (_, [stream, ..]) if kind(stream).is_some() => Err(Answer::method_not_allowed("POST")),
            (_, ["commands"]) => Err(Answer::method_not_allowed("GET")),
            (_, ["commands", _, "response"]) => Err(Answer::method_not_allowed("POST")),
            _ => Err(Answer::error(
                ResponseType::NotFound,
                format!("no resource /{path}: see docs/devices.md"),
            )),
        }
    }

    async fn authenticate(&self, request: &CoapRequest<SocketAddr>) -> Result<Device, Answer> {
        let Some(token) = access_token(request) else {
            return Err(Answer::error(
                ResponseType::Unauthorized,
                format!("send the device's access token in option {ACCESS_TOKEN_OPTION}"),
            ));
        };
        authenticate(&self.bridge, &token).await
    }

    /// The tenant's policies decide a CoAP request as the MQTT publish or subscribe it stands
    /// for.
    async fn permit(
        &self,
        request: &CoapRequest<SocketAddr>,
        device: &Device,
        action: &str,
        topic: &str,
    ) -> Result<(), Answer> {
        self.bridge
            .identity
            .authorize_device(
                device,
                action,
                topic,
                "coap",
                request.source.map(|s| s.ip()),
            )
            .await
            .map_err(|reason| Answer::error(ResponseType::Forbidden, reason))
    }

    /// Appends a message durably, as the device's or (for a gateway) its child's.
    async fn append(
        &self,
        device: &Device,
        kind: EventKind,
        child: Option<&str>,
        payload: Bytes,
    ) -> Result<Answer, Answer> {
        let bridge = &self.bridge;
        let (owner, topic) = match child {
            None => (device.id, kind_topic(kind).to_string()),
            Some(child) => {
                let owner = bridge
                    .registry
                    .child_of(device.tenant_id, device.id, child)
                    .await
                    .map_err(|e| match e {
                        RegistryError::NotFound(_)
                        | RegistryError::Forbidden(_)
                        | RegistryError::Invalid(_) => Answer::error(
                            ResponseType::Forbidden,
                            format!("not a gateway of {child:?}"),
                        ),
                        other => unavailable(other),
                    })?;
                (owner.id, format!("{}/{child}", kind_topic(kind)))
            }
        };
        let record = device_record(
            device.tenant_id,
            owner,
            kind,
            &topic,
            payload,
            HashMap::new(),
        );
        bridge.log.append(vec![record]).await.map_err(unavailable)?;
        let counter = match kind {
            EventKind::Event => &bridge.metrics.events_in,
            _ => &bridge.metrics.telemetry_in,
        };
        counter.inc();
        Ok(Answer::status(ResponseType::Created))
    }

    /// The device's pending commands, which count as delivered once sent.
    async fn pending_commands(&self, device: &Device) -> Result<Answer, Answer> {
        let commands = self
            .bridge
            .commands
            .take_pending(device.tenant_id, device.id, std::time::Duration::ZERO)
            .await
            .map_err(unavailable)?;
        Ok(Answer::json(
            ResponseType::Content,
            &observe::Commands { commands },
        ))
    }

    async fn command_response(
        &self,
        device: &Device,
        id: &str,
        payload: &[u8],
    ) -> Result<Answer, Answer> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Response {
            status: u16,
            #[serde(default)]
            payload: serde_json::Value,
        }
        let id = CommandId::parse(id)
            .map_err(|_| Answer::bad_request("the command id is not a UUID"))?;
        let response: Response = serde_json::from_slice(payload).map_err(|e| {
            Answer::bad_request(&format!(
                "expected {{\"status\": 200, \"payload\": ...}}: {e}"
            ))
        })?;
        if !(100..=599).contains(&response.status) {
            return Err(Answer::bad_request("`status` must be 100..=599"));
        }
        let body = serde_json::to_vec(&response.payload).unwrap_or_default();
        let command = self
            .bridge
            .commands
            .respond(device.tenant_id, device.id, id, response.status, &body)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Answer::error(ResponseType::NotFound, format!("no command {id}")))?;
        Ok(Answer::json(ResponseType::Changed, &command))
    }

    fn message_id(&self) -> u16 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn send_reset(&self, peer: SocketAddr, message_id: u16) {
        let mut reset = Packet::new();
        reset.header.set_type(MessageType::Reset);
        reset.header.code = MessageClass::Empty;
        reset.header.message_id = message_id;
        if let Ok(bytes) = reset.to_bytes_unlimited() {
            let _ = self.socket.send_to(&bytes, peer).await;
        }
    }

    /// 5.03 with Max-Age: come back in a few seconds (RFC 7252 section 5.9.3.4).
    async fn overloaded(&self, packet: Packet, peer: SocketAddr) {
        self.bridge.metrics.coap_refused.inc();
        let mut request = CoapRequest::from_packet(packet, peer);
        let mut answer =
            Answer::error(ResponseType::ServiceUnavailable, "overloaded; retry".into());
        answer.max_age = Some(5);
        answer.apply(&mut request);
        if let Some(mut response) = request.response {
            if response.message.header.get_type() == MessageType::NonConfirmable {
                response.message.header.message_id = self.message_id();
            }
            if let Ok(bytes) = response.message.to_bytes_unlimited() {
                let _ = self.socket.send_to(&bytes, peer).await;
            }
        }
    }
}

/// Checks a device's access token (signature, expiry, revocation, device enabled).
async fn authenticate(bridge: &Bridge, token: &str) -> Result<Device, Answer> {
    bridge
        .identity
        .authenticate_device(token)
        .await
        .map_err(|e| match e {
            DeviceAuthError::Registry(e) => unavailable(e),
            other => Answer::error(ResponseType::Unauthorized, other.to_string()),
        })
}

fn access_token(request: &CoapRequest<SocketAddr>) -> Option<String> {
    let value = request
        .message
        .get_first_option(CoapOption::Unknown(ACCESS_TOKEN_OPTION))?;
    String::from_utf8(value.clone()).ok()
}

fn kind_topic(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Event => EVENT_TOPIC,
        _ => TELEMETRY_TOPIC,
    }
}

fn unavailable(e: impl std::fmt::Display) -> Answer {
    tracing::error!(error = %e, "CoAP request failed");
    let mut answer = Answer::error(
        ResponseType::ServiceUnavailable,
        "the message could not be handled; retry".into(),
    );
    answer.max_age = Some(1);
    answer
}

/// A response to fill in: status, payload (a diagnostic text for errors, RFC 7252 section
/// 5.5.2) and options.
pub(crate) struct Answer {
    status: ResponseType,
    payload: Vec<u8>,
    json: bool,
    max_age: Option<u32>,
    size1: Option<usize>,
    observe: Option<u32>,
}

impl Answer {
    fn status(status: ResponseType) -> Self {
        Self {
            status,
            payload: Vec::new(),
            json: false,
            max_age: None,
            size1: None,
            observe: None,
        }
    }

    fn error(status: ResponseType, why: String) -> Self {
        Self {
            payload: why.into_bytes(),
            ..Self::status(status)
        }
    }

    fn bad_request(why: &str) -> Self {
        Self::error(ResponseType::BadRequest, why.to_string())
    }

    fn method_not_allowed(allowed: &str) -> Self {
        Self::error(
            ResponseType::MethodNotAllowed,
            format!("this resource takes {allowed}"),
        )
    }

    fn json(status: ResponseType, body: &impl serde::Serialize) -> Self {
        Self {
            payload: serde_json::to_vec(body).unwrap_or_default(),
            json: true,
            ..Self::status(status)
        }
    }

    fn with_size1(mut self, size: usize) -> Self {
        self.size1 = Some(size);
        self
    }

    fn apply(self, request: &mut CoapRequest<SocketAddr>) {
        let Some(response) = request.response.as_mut() else {
            return;
        };
        let message = &mut response.message;
        message.header.code = MessageClass::Response(self.status);
        message.payload = self.payload;
        if self.json {
            message.set_content_format(ContentFormat::ApplicationJSON);
        }
        if let Some(observe) = self.observe {
            message.set_observe_value(observe);
        }
        if let Some(max_age) = self.max_age {
            message.add_option(CoapOption::MaxAge, encode_uint(max_age));
        }
        if let Some(size) = self.size1 {
            message.add_option(CoapOption::Size1, encode_uint(size as u32));
        }
    }
}

/// A CoAP uint option value: big-endian without leading zero bytes (RFC 7252 section 3.2).
fn encode_uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}
