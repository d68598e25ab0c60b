//! Observing `/commands` (RFC 7641): a device that registers gets its pending commands in the
//! response, then each command that arrives later as a confirmable notification, retransmitted
//! until acknowledged (RFC 7252 section 4.2). One observation per device: a new registration
//! (say, after a reboot, from a new port) replaces the old one. An observation ends when the
//! device deregisters, answers a notification with a reset, stops acknowledging, or its token
//! stops being valid (revoked, expired, device disabled).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use coap_lite::{ContentFormat, MessageClass, MessageType, Packet, ResponseType};
use serde::Serialize;
use tern_core::{Command, Device, DeviceId, TenantId};
use tern_runtime::Shutdown;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Answer, Coap, authenticate, unavailable};

/// RFC 7252 section 4.8: ACK_TIMEOUT and MAX_RETRANSMIT.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;
/// How long one wait for new commands lasts before the token is checked again.
const POLL: Duration = Duration::from_secs(55);

#[derive(Serialize)]
pub(crate) struct Commands {
    pub commands: Vec<Command>,
}

struct Observation {
    peer: SocketAddr,
    token: Vec<u8>,
    cancel: CancellationToken,
}

#[derive(Default)]
pub(crate) struct Observers {
    by_device: Mutex<HashMap<(TenantId, DeviceId), Observation>>,
    /// Confirmable notifications waiting for their ACK (true) or RST (false).
    acks: Mutex<HashMap<(SocketAddr, u16), oneshot::Sender<bool>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Observers {
    /// An ACK or RST from a peer.
    pub fn answered(&self, peer: SocketAddr, message_id: u16, acknowledged: bool) {
        if let Some(waiting) = lock(&self.acks).remove(&(peer, message_id)) {
            let _ = waiting.send(acknowledged);
        }
    }

    fn register(&self, device: &Device, peer: SocketAddr, token: Vec<u8>) -> CancellationToken {
        let cancel = CancellationToken::new();
        let observation = Observation {
            peer,
            token,
            cancel: cancel.clone(),
        };
        if let Some(old) = lock(&self.by_device).insert((device.tenant_id, device.id), observation)
        {
            old.cancel.cancel();
        }
        cancel
    }

    /// Ends the device's observation if it is the one `peer` registered with `token`.
    pub fn deregister(&self, device: &Device, peer: Option<SocketAddr>, token: &[u8]) {
        let mut by_device = lock(&self.by_device);
        let key = (device.tenant_id, device.id);
        if by_device
            .get(&key)
            .is_some_and(|o| Some(o.peer) == peer && o.token == token)
            && let Some(observation) = by_device.remove(&key)
        {
            observation.cancel.cancel();
        }
    }

    fn ended(&self, device: &Device, cancel: &CancellationToken) {
        let mut by_device = lock(&self.by_device);
        let key = (device.tenant_id, device.id);
        if by_device.get(&key).is_some_and(|o| o.cancel.eq(cancel)) {
            by_device.remove(&key);
        }
    }

    pub fn cancel_all(&self) {
        for (_, observation) in lock(&self.by_device).drain() {
            observation.cancel.cancel();
        }
    }

    pub fn count(&self) -> usize {
        lock(&self.by_device).len()
    }
}

impl Coap {
    /// Registers an observation of `/commands`; the response carries the pending commands.
    pub(super) async fn observe(
        self: &Arc<Self>,
        request: &coap_lite::CoapRequest<SocketAddr>,
        device: Device,
        access_token: String,
        shutdown: &Shutdown,
    ) -> Result<Answer, Answer> {
        let Some(peer) = request.source else {
            return Err(Answer::bad_request("no source address"));
        };
        let token = request.message.get_token().to_vec();
        let pending = self
            .bridge
            .commands
            .take_pending(device.tenant_id, device.id, Duration::ZERO)
            .await
            .map_err(unavailable)?;
        let cancel = self.observers.register(&device, peer, token.clone());
        self.bridge
            .metrics
            .coap_observers
            .set(self.observers.count() as i64);
        let coap = self.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            coap.notify(&device, peer, token, &access_token, &cancel, &shutdown)
                .await;
            coap.observers.ended(&device, &cancel);
            coap.bridge
                .metrics
                .coap_observers
                .set(coap.observers.count() as i64);
        });
        let mut answer = Answer::json(ResponseType::Content, &Commands { commands: pending });
        answer.observe = Some(0);
        Ok(answer)
    }

    /// Pushes each new command to the observer until the observation ends.
    async fn notify(
        &self,
        device: &Device,
        peer: SocketAddr,
        token: Vec<u8>,
        access_token: &str,
        cancel: &CancellationToken,
        shutdown: &Shutdown,
    ) {
        let mut sequence = 1u32;
        loop {
            // Checked before commands are taken, so none is taken for a device that may no
            // longer have them.
            let (status, payload) = match authenticate(&self.bridge, access_token).await {
                Ok(_) => {
                    let taken = tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = shutdown.cancelled() => return,
                        taken = self.bridge.commands.take_pending(device.tenant_id, device.id, POLL) => taken,
                    };
                    match taken {
                        Ok(commands) if commands.is_empty() => continue,
                        Ok(commands) => (
                            ResponseType::Content,
                            serde_json::to_vec(&Commands { commands }).unwrap_or_default(),
                        ),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read pending commands");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
                Err(refusal) => (refusal.status, refusal.payload),
            };
            let mut notification = Packet::new();
            notification.header.code = MessageClass::Response(status);
            notification.set_token(token.clone());
            notification.set_observe_value(sequence & 0x00FF_FFFF);
            notification.set_content_format(ContentFormat::ApplicationJSON);
            notification.payload = payload;
            sequence = sequence.wrapping_add(1);
            let acknowledged = self.confirm(peer, notification).await;
            // 4.01 and friends end an observation (RFC 7641 section 4.2).
            if !acknowledged || status != ResponseType::Content {
                tracing::info!(%peer, device = %device.id, "CoAP observation ended");
                return;
            }
        }
    }

    /// Sends a confirmable message, retransmitting with exponential back-off until an ACK
    /// (true) or a RST or silence (false).
    async fn confirm(&self, peer: SocketAddr, mut packet: Packet) -> bool {
        let message_id = self.message_id();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.message_id = message_id;
        let Ok(bytes) = packet.to_bytes_unlimited() else {
            return false;
        };
        let (answered, mut answer) = oneshot::channel();
        lock(&self.observers.acks).insert((peer, message_id), answered);
        // ACK_RANDOM_FACTOR 1.5: a jitter of up to half the timeout, from the message id.
        let mut wait = ACK_TIMEOUT + ACK_TIMEOUT * u32::from(message_id % 64) / 128;
        for _ in 0..=MAX_RETRANSMIT {
            let _ = self.socket.send_to(&bytes, peer).await;
            match tokio::time::timeout(wait, &mut answer).await {
                Ok(Ok(acknowledged)) => return acknowledged,
                Ok(Err(_)) => return false,
                Err(_) => wait *= 2,
            }
        }
        lock(&self.observers.acks).remove(&(peer, message_id));
        false
    }
}
