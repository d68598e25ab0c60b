//! MQTT 5 AUTH packets (section 3.15) for re-authentication on a live connection. rumqttc's
//! codec does not read AUTH (and does not export its property types), so the codec hands the
//! frame here, and the answer is encoded here too.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Reason code 0x19: "Re-authenticate" (3.15.2.1).
pub(crate) const REAUTHENTICATE: u8 = 0x19;

/// What an AUTH packet says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AuthRequest {
    pub reason: u8,
    pub method: Option<String>,
    pub data: Option<Bytes>,
}

/// The reason code, Authentication Method and Authentication Data of a whole AUTH frame
/// (fixed header included); `None` if it is malformed.
pub(crate) fn parse(mut bytes: Bytes) -> Option<AuthRequest> {
    if bytes.first() != Some(&0xF0) {
        return None;
    }
    bytes.advance(1);
    read_varint(&mut bytes)?;
    if !bytes.has_remaining() {
        // 3.15.2.1: no reason code and no properties means Success.
        return Some(AuthRequest {
            reason: 0,
            method: None,
            data: None,
        });
    }
    let reason = bytes.get_u8();
    let mut request = AuthRequest {
        reason,
        method: None,
        data: None,
    };
    let len = read_varint(&mut bytes)?;
    if bytes.remaining() < len {
        return None;
    }
    let mut properties = bytes.split_to(len);
    while properties.has_remaining() {
        match properties.get_u8() {
            0x15 => {
                request.method =
                    Some(String::from_utf8(read_binary(&mut properties)?.to_vec()).ok()?)
            }
            0x16 => request.data = Some(read_binary(&mut properties)?),
            0x1F => {
                read_binary(&mut properties)?;
            }
            0x26 => {
                read_binary(&mut properties)?;
                read_binary(&mut properties)?;
            }
            _ => return None,
        }
    }
    Some(request)
}

/// AUTH with reason Success (0x00) and the method (3.15.2.2.2: it must be the same).
pub(crate) fn success(method: &str) -> BytesMut {
    let properties = 1 + 2 + method.len();
    let mut out = BytesMut::with_capacity(8 + method.len());
    out.put_u8(0xF0);
    write_varint(&mut out, 1 + 1 + properties);
    out.put_u8(0x00);
    write_varint(&mut out, properties);
    out.put_u8(0x15);
    out.put_u16(method.len() as u16);
    out.put_slice(method.as_bytes());
    out
}

fn read_binary(bytes: &mut Bytes) -> Option<Bytes> {
    if bytes.remaining() < 2 {
        return None;
    }
    let len = usize::from(bytes.get_u16());
    (bytes.remaining() >= len).then(|| bytes.split_to(len))
}

fn read_varint(bytes: &mut Bytes) -> Option<usize> {
    let mut value = 0usize;
    for shift in [0, 7, 14, 21] {
        if !bytes.has_remaining() {
            return None;
        }
        let byte = bytes.get_u8();
        value |= usize::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let byte = (value % 128) as u8;
        value /= 128;
        out.put_u8(if value > 0 { byte | 0x80 } else { byte });
        if value == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(bytes: &[u8]) -> Bytes {
        Bytes::copy_from_slice(bytes)
    }

    #[test]
    fn reauthenticate_with_method_and_data_reads_back() {
        // AUTH 0x19, properties: method "token", data "abc", reason string "r".
        let packet = [
            0xF0, 0x13, 0x19, 0x12, 0x15, 0x00, 0x05, b't', b'o', b'k', b'e', b'n', 0x16, 0x00,
            0x03, b'a', b'b', b'c', 0x1F, 0x00, 0x01, b'r',
        ];
        let packet = [&packet[..1], &[(packet.len() - 2) as u8], &packet[2..]].concat();
        assert_eq!(
            parse(auth(&packet)),
            Some(AuthRequest {
                reason: REAUTHENTICATE,
                method: Some("token".into()),
                data: Some(Bytes::from_static(b"abc")),
            })
        );
    }

    #[test]
    fn the_success_answer_is_a_valid_auth_packet_and_garbage_is_refused() {
        assert_eq!(
            parse(auth(&[0xF0, 0x02, 0x19, 0x05])),
            None,
            "properties run short"
        );
        assert_eq!(
            parse(auth(&[0xF0, 0x03, 0x19, 0x01, 0x99])),
            None,
            "unknown property"
        );
        let answer = success("token");
        let parsed = parse(answer.freeze()).expect("reads back");
        assert_eq!(
            (parsed.reason, parsed.method.as_deref()),
            (0, Some("token"))
        );
    }
}
