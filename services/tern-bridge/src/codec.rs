//! MQTT framing for both protocol versions the bridge speaks.
//!
//! Inside the bridge every packet is an MQTT 5 packet (rumqttc's `v5::mqttbytes`): it is a
//! superset of 3.1.1, so the connection logic is written once. A 3.1.1 connection's packets
//! are converted at this edge: read with the 3.1.1 codec and lifted to MQTT 5 (no properties,
//! default subscription options), and written by lowering to 3.1.1 (reason codes mapped to the
//! 3.1.1 return codes; packets 3.1.1 does not have, such as a server DISCONNECT, are not sent).

use crate::reauth::{self, AuthRequest};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, LastWill, Login,
    Packet, PingReq, PubAck, PubComp, PubRec, PubRel, Publish, RetainForwardRule, Subscribe,
    SubscribeReasonCode, Unsubscribe,
};
use rumqttc::v5::mqttbytes::{Error as V5Error, QoS};

/// The protocol version of a connection, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

impl Version {
    pub fn label(self) -> &'static str {
        match self {
            Self::V311 => "mqtt/3.1.1",
            Self::V5 => "mqtt/5",
        }
    }
}

/// Why no packet came out of the buffer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// Not a whole packet yet: read more.
    #[error("incomplete packet")]
    Incomplete,
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
    #[error("packet larger than the {0}-byte limit")]
    TooLarge(usize),
    #[error("{0} packets are not sent by clients")]
    Unexpected(&'static str),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A CONNECT, lifted to MQTT 5.
pub(crate) struct ConnectPacket {
    pub version: Version,
    pub connect: Connect,
    pub will: Option<LastWill>,
    pub login: Option<Login>,
}

/// Reads the first packet, which must be CONNECT; its protocol level decides the version.
pub(crate) fn read_connect(buf: &mut BytesMut, max: usize) -> Result<ConnectPacket, ReadError> {
    let level = connect_level(buf)?;
    whole_frame(buf)?;
    complete(match level {
        4 => match read_v4(buf, max)? {
            v4::Packet::Connect(c) => Ok(ConnectPacket {
                version: Version::V311,
                connect: Connect {
                    keep_alive: c.keep_alive,
                    client_id: c.client_id,
                    clean_start: c.clean_session,
                    properties: None,
                },
                will: c.last_will.map(|w| LastWill {
                    topic: Bytes::from(w.topic),
                    message: w.message,
                    qos: lift_qos(w.qos),
                    retain: w.retain,
                    properties: None,
                }),
                login: c.login.map(|l| Login {
                    username: l.username,
                    password: l.password,
                }),
            }),
            other => Err(ReadError::Unexpected(v4_name(&other))),
        },
        5 => match read_v5(buf, max)? {
            Packet::Connect(connect, will, login) => Ok(ConnectPacket {
                version: Version::V5,
                connect,
                will,
                login,
            }),
            _ => Err(ReadError::Malformed("expected CONNECT".into())),
        },
        other => Err(ReadError::UnsupportedVersion(other)),
    })
}

/// What a client sent on an established connection.
#[derive(Debug)]
// Packet is nearly every value: boxing it would cost an allocation per packet.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Incoming {
    Packet(Packet),
    /// MQTT 5 AUTH, which rumqttc's codec does not read (`reauth.rs` does).
    Auth(AuthRequest),
}

/// Reads the next packet of an established connection.
pub(crate) fn read(
    buf: &mut BytesMut,
    version: Version,
    max: usize,
) -> Result<Incoming, ReadError> {
    whole_frame(buf)?;
    if version == Version::V5 && buf.first().is_some_and(|b| b >> 4 == AUTH_PACKET_TYPE) {
        let len = frame_len(buf)?.unwrap_or(buf.len());
        if len > max {
            return Err(ReadError::TooLarge(max));
        }
        let frame = buf.split_to(len).freeze();
        return reauth::parse(frame)
            .map(Incoming::Auth)
            .ok_or_else(|| ReadError::Malformed("malformed AUTH packet".into()));
    }
    complete(match version {
        Version::V5 => read_v5(buf, max),
        Version::V311 => read_v4(buf, max).and_then(lift),
    })
    .map(Incoming::Packet)
}

const AUTH_PACKET_TYPE: u8 = 15;

/// Whether a whole frame is at the start of `buf`; an error for a malformed fixed header.
pub(crate) fn frame_ready(buf: &[u8]) -> Result<bool, ReadError> {
    match whole_frame(buf) {
        Ok(()) => Ok(true),
        Err(ReadError::Incomplete) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `Incomplete` until the whole frame at the start of `buf` has arrived.
///
/// The codecs split a frame off the buffer before parsing it, and report a body that ends
/// early as "insufficient bytes" too: only a frame not yet fully received is incomplete,
/// anything short inside a whole frame is malformed (see [`complete`]).
fn whole_frame(buf: &[u8]) -> Result<(), ReadError> {
    match frame_len(buf)? {
        Some(len) if len <= buf.len() => Ok(()),
        _ => Err(ReadError::Incomplete),
    }
}

/// A parse of a whole frame: running out of bytes means the packet is malformed.
fn complete<T>(result: Result<T, ReadError>) -> Result<T, ReadError> {
    match result {
        Err(ReadError::Incomplete) => Err(ReadError::Malformed("the packet ends early".into())),
        other => other,
    }
}

/// The length of the frame at the start of `buf` (fixed header included), once its fixed
/// header has arrived.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ReadError> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some(1 + i + 1 + remaining));
        }
    }
    if buf.len() > 4 {
        return Err(ReadError::Malformed(
            "remaining length longer than four bytes".into(),
        ));
    }
    Ok(None)
}

/// Appends `packet` in the connection's version to `out`. Returns whether anything was
/// written (MQTT 3.1.1 has no server DISCONNECT or AUTH, so those are skipped).
pub(crate) fn write(packet: &Packet, version: Version, out: &mut BytesMut) -> Result<bool, String> {
    match version {
        Version::V5 => packet
            .write(out, None)
            .map(|_| true)
            .map_err(|e| e.to_string()),
        Version::V311 => match lower(packet) {
            Some(p) => p
                .write(out, usize::MAX)
                .map(|_| true)
                .map_err(|e| e.to_string()),
            None => Ok(false),
        },
    }
}

/// The protocol level of a CONNECT at the start of `buf`, once enough of it has arrived.
fn connect_level(buf: &[u8]) -> Result<u8, ReadError> {
    let first = *buf.first().ok_or(ReadError::Incomplete)?;
    if first != 0x10 {
        return Err(ReadError::Unexpected("non-CONNECT first"));
    }
    // Remaining length: up to four bytes of 7 bits each.
    let mut offset = 1;
    loop {
        let byte = *buf.get(offset).ok_or(ReadError::Incomplete)?;
        offset += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if offset > 4 {
            return Err(ReadError::Malformed("remaining length".into()));
        }
    }
    let name_len = match buf.get(offset..offset + 2) {
        Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
        None => return Err(ReadError::Incomplete),
    };
    buf.get(offset + 2 + name_len)
        .copied()
        .ok_or(ReadError::Incomplete)
}

fn read_v4(buf: &mut BytesMut, max: usize) -> Result<v4::Packet, ReadError> {
    use rumqttc::mqttbytes::Error as E;
    v4::Packet::read(buf, max).map_err(|e| match e {
        E::InsufficientBytes(_) => ReadError::Incomplete,
        E::PayloadSizeLimitExceeded { .. } => ReadError::TooLarge(max),
        E::InvalidProtocolLevel(level) => ReadError::UnsupportedVersion(level),
        other => ReadError::Malformed(other.to_string()),
    })
}

fn read_v5(buf: &mut BytesMut, max: usize) -> Result<Packet, ReadError> {
    // A DISCONNECT without properties (remaining length 0 or 1) is valid MQTT 5 (3.14.2.1,
    // 3.14.2.2.1) but the codec refuses it, so it is taken here.
    if let [0xE0, len @ (0 | 1), ..] = buf[..] {
        let frame = buf.split_to(2 + usize::from(len));
        let reason = match frame.get(2) {
            None => DisconnectReasonCode::NormalDisconnection,
            Some(code) => DisconnectReasonCode::try_from(*code)
                .map_err(|_| ReadError::Malformed(format!("DISCONNECT reason code {code:#04x}")))?,
        };
        return Ok(Packet::Disconnect(Disconnect::new(reason)));
    }
    let packet = Packet::read(buf, Some(max as u32)).map_err(|e| match e {
        V5Error::InsufficientBytes(_) => ReadError::Incomplete,
        V5Error::PayloadSizeLimitExceeded { .. } => ReadError::TooLarge(max),
        V5Error::InvalidProtocolLevel(level) => ReadError::UnsupportedVersion(level),
        other => ReadError::Malformed(other.to_string()),
    })?;
    match packet {
        Packet::ConnAck(_) => Err(ReadError::Unexpected("CONNACK")),
        Packet::SubAck(_) => Err(ReadError::Unexpected("SUBACK")),
        Packet::UnsubAck(_) => Err(ReadError::Unexpected("UNSUBACK")),
        Packet::PingResp(_) => Err(ReadError::Unexpected("PINGRESP")),
        other => Ok(other),
    }
}

pub(crate) fn lift_qos(qos: rumqttc::mqttbytes::QoS) -> QoS {
    match qos {
        rumqttc::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn lower_qos(qos: QoS) -> rumqttc::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

/// A 3.1.1 packet from a client as MQTT 5.
fn lift(packet: v4::Packet) -> Result<Packet, ReadError> {
    Ok(match packet {
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: lift_qos(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(PubAck::new(a.pkid, None)),
        v4::Packet::PubRec(a) => Packet::PubRec(PubRec::new(a.pkid, None)),
        v4::Packet::PubRel(a) => Packet::PubRel(PubRel::new(a.pkid, None)),
        v4::Packet::PubComp(a) => Packet::PubComp(PubComp::new(a.pkid, None)),
        v4::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| Filter {
                    path: f.path,
                    qos: lift_qos(f.qos),
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        v4::Packet::PingReq => Packet::PingReq(PingReq),
        v4::Packet::Disconnect => {
            Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection))
        }
        other => return Err(ReadError::Unexpected(v4_name(&other))),
    })
}

/// An MQTT 5 packet from the server as 3.1.1, if 3.1.1 has it.
fn lower(packet: &Packet) -> Option<v4::Packet> {
    Some(match packet {
        Packet::ConnAck(ConnAck {
            session_present,
            code,
            ..
        }) => v4::Packet::ConnAck(v4::ConnAck::new(lower_connack(*code), *session_present)),
        Packet::Publish(p) => {
            let mut publish = v4::Publish::from_bytes(
                String::from_utf8_lossy(&p.topic),
                lower_qos(p.qos),
                p.payload.clone(),
            );
            publish.pkid = p.pkid;
            publish.retain = p.retain;
            publish.dup = p.dup;
            v4::Packet::Publish(publish)
        }
        Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
        Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec::new(a.pkid)),
        Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel::new(a.pkid)),
        Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp::new(a.pkid)),
        Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck::new(
            s.pkid,
            s.return_codes
                .iter()
                .map(|c| match c {
                    SubscribeReasonCode::Success(q) => {
                        v4::SubscribeReasonCode::Success(lower_qos(*q))
                    }
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::UnsubAck(u) => v4::Packet::UnsubAck(v4::UnsubAck::new(u.pkid)),
        Packet::PingResp(_) => v4::Packet::PingResp,
        _ => return None,
    })
}

/// MQTT 5 CONNACK reason codes as the nearest 3.1.1 return code (3.2.2.3).
fn lower_connack(code: ConnectReturnCode) -> v4::ConnectReturnCode {
    use ConnectReturnCode as C;
    use v4::ConnectReturnCode as V4;
    match code {
        C::Success => V4::Success,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => V4::RefusedProtocolVersion,
        C::BadClientId | C::ClientIdentifierNotValid => V4::BadClientId,
        C::ServiceUnavailable | C::ServerUnavailable | C::ServerBusy | C::QuotaExceeded => {
            V4::ServiceUnavailable
        }
        C::BadUserNamePassword | C::BadAuthenticationMethod => V4::BadUserNamePassword,
        _ => V4::NotAuthorized,
    }
}

fn v4_name(packet: &v4::Packet) -> &'static str {
    match packet {
        v4::Packet::Connect(_) => "CONNECT",
        v4::Packet::ConnAck(_) => "CONNACK",
        v4::Packet::SubAck(_) => "SUBACK",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::PingResp => "PINGRESP",
        _ => "unexpected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_bytes(packet: v4::Packet) -> BytesMut {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, usize::MAX).expect("encode");
        buf
    }

    #[test]
    fn the_connect_decides_the_version() {
        let mut connect = v4::Connect::new("dev-1");
        connect.set_login("user", "pass");
        let mut buf = v4_bytes(v4::Packet::Connect(connect));
        let c = read_connect(&mut buf, 1024).expect("3.1.1 CONNECT");
        assert_eq!(c.version, Version::V311);
        assert_eq!(c.connect.client_id, "dev-1");
        assert_eq!(c.login.map(|l| l.password).as_deref(), Some("pass"));
        assert!(buf.is_empty());

        let mut buf = BytesMut::new();
        Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: "dev-2".into(),
                clean_start: true,
                properties: None,
            },
            None,
            None,
        )
        .write(&mut buf, None)
        .expect("encode");
        let c = read_connect(&mut buf, 1024).expect("MQTT 5 CONNECT");
        assert_eq!((c.version, c.connect.keep_alive), (Version::V5, 30));

        let mut partial = BytesMut::from(&[0x10u8, 0x0c, 0x00][..]);
        assert!(matches!(
            read_connect(&mut partial, 1024),
            Err(ReadError::Incomplete)
        ));
        let mut mqtt31 = BytesMut::from(&b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00"[..]);
        assert!(matches!(
            read_connect(&mut mqtt31, 1024),
            Err(ReadError::UnsupportedVersion(3))
        ));
    }

    #[test]
    fn v311_packets_round_trip_through_the_mqtt5_form() {
        let mut publish =
            v4::Publish::new("a/b", rumqttc::mqttbytes::QoS::AtLeastOnce, b"x".to_vec());
        publish.pkid = 7;
        publish.retain = true;
        let mut buf = v4_bytes(v4::Packet::Publish(publish.clone()));
        let Ok(Incoming::Packet(lifted)) = read(&mut buf, Version::V311, 1024) else {
            panic!("a packet");
        };
        let mut out = BytesMut::new();
        assert!(write(&lifted, Version::V311, &mut out).expect("write"));
        assert_eq!(out, v4_bytes(v4::Packet::Publish(publish)));

        let mut out = BytesMut::new();
        let disconnect =
            Packet::Disconnect(Disconnect::new(DisconnectReasonCode::KeepAliveTimeout));
        assert!(!write(&disconnect, Version::V311, &mut out).expect("write"));
        assert!(out.is_empty(), "3.1.1 has no server DISCONNECT");
    }

    #[test]
    fn short_mqtt5_disconnects_are_read() {
        for (bytes, reason) in [
            (
                &[0xE0u8, 0x00][..],
                DisconnectReasonCode::NormalDisconnection,
            ),
            (
                &[0xE0, 0x01, 0x04],
                DisconnectReasonCode::DisconnectWithWillMessage,
            ),
        ] {
            let mut buf = BytesMut::from(bytes);
            match read(&mut buf, Version::V5, 1024).expect("read") {
                Incoming::Packet(Packet::Disconnect(d)) => assert_eq!(d.reason_code, reason),
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_whole_frame_with_a_short_body_is_malformed_not_incomplete() {
        // PUBLISH, remaining length 3: a topic length of 5 with only one byte of topic.
        let mut buf = BytesMut::from(&[0x30u8, 0x03, 0x00, 0x05, b'a'][..]);
        assert!(matches!(
            read(&mut buf, Version::V311, 1024),
            Err(ReadError::Malformed(_))
        ));
        let mut partial = BytesMut::from(&[0x30u8, 0x05, 0x00][..]);
        assert!(matches!(
            read(&mut partial, Version::V5, 1024),
            Err(ReadError::Incomplete)
        ));
    }

    #[test]
    fn oversized_packets_are_named_as_such() {
        let publish = v4::Publish::new("t", rumqttc::mqttbytes::QoS::AtMostOnce, vec![0u8; 100]);
        let mut buf = v4_bytes(v4::Packet::Publish(publish));
        assert!(matches!(
            read(&mut buf, Version::V311, 50),
            Err(ReadError::TooLarge(50))
        ));
    }
}
