//! MQTT 5 on the wire: the client is written against MQTT 3.1.1 packets, so in MQTT 5 mode
//! each packet it writes is lifted to its MQTT 5 form (no properties) and each packet it reads
//! is lowered back. Only the packets the simulator and the agent use.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

fn qos_up(qos: rumqttc::mqttbytes::QoS) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        rumqttc::mqttbytes::QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_down(qos: rumqttc::v5::mqttbytes::QoS) -> rumqttc::mqttbytes::QoS {
    match qos {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Encodes a 3.1.1 packet as MQTT 5.
pub fn write(packet: &v4::Packet, out: &mut BytesMut, max: usize) -> anyhow::Result<()> {
    let lifted = match packet {
        v4::Packet::Connect(c) => v5::Packet::Connect(
            v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                clean_start: c.clean_session,
                properties: None,
            },
            None,
            c.login
                .as_ref()
                .map(|l| v5::Login::new(l.username.clone(), l.password.clone())),
        ),
        v4::Packet::Publish(p) => v5::Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos_up(p.qos),
            retain: p.retain,
            topic: Bytes::copy_from_slice(p.topic.as_bytes()),
            pkid: p.pkid,
            payload: p.payload.clone(),
            properties: None,
        }),
        v4::Packet::Subscribe(s) => v5::Packet::Subscribe(v5::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .iter()
                .map(|f| v5::Filter::new(f.path.clone(), qos_up(f.qos)))
                .collect(),
            properties: None,
        }),
        v4::Packet::PubAck(a) => v5::Packet::PubAck(v5::PubAck::new(a.pkid, None)),
        v4::Packet::PubRel(r) => v5::Packet::PubRel(v5::PubRel::new(r.pkid, None)),
        v4::Packet::PingReq => v5::Packet::PingReq(v5::PingReq),
        v4::Packet::Disconnect => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
        other => anyhow::bail!("the simulator does not send {other:?} over MQTT 5"),
    };
    lifted.write(out, Some(max as u32))?;
    Ok(())
}

/// Reads the next MQTT 5 packet as its 3.1.1 form; `None` until a whole packet arrived.
pub fn read(inbox: &mut BytesMut, max: usize) -> anyhow::Result<Option<v4::Packet>> {
    let packet = match v5::Packet::read(inbox, Some(max as u32)) {
        Ok(packet) => packet,
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => anyhow::bail!("bad packet from the broker: {e}"),
    };
    Ok(Some(match packet {
        v5::Packet::ConnAck(a) => v4::Packet::ConnAck(v4::ConnAck {
            session_present: a.session_present,
            code: if a.code == v5::ConnectReturnCode::Success {
                v4::ConnectReturnCode::Success
            } else {
                v4::ConnectReturnCode::NotAuthorized
            },
        }),
        v5::Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
        v5::Packet::PubRec(r) => v4::Packet::PubRec(v4::PubRec::new(r.pkid)),
        v5::Packet::PubComp(c) => v4::Packet::PubComp(v4::PubComp::new(c.pkid)),
        v5::Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos_down(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload,
        }),
        v5::Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck::new(
            s.pkid,
            s.return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => {
                        v4::SubscribeReasonCode::Success(qos_down(*q))
                    }
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        v5::Packet::PingResp(_) => v4::Packet::PingResp,
        v5::Packet::Disconnect(d) => {
            anyhow::bail!("the broker disconnected: {:?}", d.reason_code)
        }
        other => anyhow::bail!("unexpected packet from the broker: {other:?}"),
    }))
}
