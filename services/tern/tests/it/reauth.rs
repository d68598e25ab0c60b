//! MQTT 5 enhanced authentication (section 4.12) with the `token` method: the access token as
//! Authentication Data in CONNECT, a fresh one in AUTH (reason 0x19) to keep a live connection
//! going, and the connection ended with DISCONNECT 0xA0 (maximum connect time) when its token
//! expires unrefreshed. Raw packets: neither rumqttc nor Paho sends AUTH.

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Login, Packet,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{PATIENCE, Provisioned, Tern};

struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// CONNECT with Authentication Method `method` and the token as Authentication Data (no
    /// user name or password); returns the CONNACK.
    async fn connect(tern: &Tern, method: &str, token: &str) -> (Self, ConnAck) {
        Self::open(tern, Some((method, token)), None).await
    }

    /// CONNECT with enhanced authentication, or with the device's id and token as user name
    /// and password.
    async fn open(
        tern: &Tern,
        enhanced: Option<(&str, &str)>,
        login: Option<&Provisioned>,
    ) -> (Self, ConnAck) {
        let mut properties = ConnectProperties::new();
        if let Some((method, token)) = enhanced {
            properties.authentication_method = Some(method.to_string());
            properties.authentication_data = Some(token.to_string().into());
        }
        let connect = Connect {
            keep_alive: 30,
            client_id: String::new(),
            clean_start: true,
            properties: Some(properties),
        };
        let login = login.map(|p| Login::new(p.device_id.clone(), p.access_token.clone()));
        let mut bytes = BytesMut::new();
        connect.write(&None, &login, &mut bytes).expect("encode");
        let stream = TcpStream::connect(("127.0.0.1", tern.mqtt_port))
            .await
            .expect("connect");
        let mut raw = Self {
            stream,
            buf: BytesMut::new(),
        };
        raw.send(&bytes).await;
        let frame = raw.frame().await.expect("CONNACK");
        match Packet::read(&mut BytesMut::from(&frame[..]), None) {
            Ok(Packet::ConnAck(connack)) => (raw, connack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next whole packet's bytes, or `None` once the server closed.
    async fn frame(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(len) = frame_len(&self.buf) {
                return Some(self.buf.split_to(len).to_vec());
            }
            let n = tokio::time::timeout(PATIENCE, self.stream.read_buf(&mut self.buf))
                .await
                .expect("data in time")
                .expect("read");
            if n == 0 {
                return None;
            }
        }
    }

    /// AUTH (0x19) with the `token` method and `token`; returns the answer's first byte and
    /// reason code: (0xF0, 0x00) for AUTH success, (0xE0, reason) for a DISCONNECT.
    async fn reauthenticate(&mut self, method: &str, token: &str) -> (u8, u8) {
        self.send(&auth(0x19, method, token)).await;
        let frame = self.frame().await.expect("an answer");
        (frame[0], frame[2])
    }
}

fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let len = 2 + i + remaining;
            return (buf.len() >= len).then_some(len);
        }
    }
    None
}

/// An AUTH packet with a method and data.
fn auth(reason: u8, method: &str, data: &str) -> Vec<u8> {
    let mut properties = vec![0x15];
    properties.extend((method.len() as u16).to_be_bytes());
    properties.extend(method.as_bytes());
    properties.push(0x16);
    properties.extend((data.len() as u16).to_be_bytes());
    properties.extend(data.as_bytes());
    let mut body = vec![reason];
    push_varint(&mut body, properties.len());
    body.extend(properties);
    let mut packet = vec![0xF0];
    push_varint(&mut packet, body.len());
    packet.extend(body);
    packet
}

fn push_varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value % 128) as u8;
        value /= 128;
        out.push(if value > 0 { byte | 0x80 } else { byte });
        if value == 0 {
            return;
        }
    }
}

fn fresh_token(tern: &Tern, p: &Provisioned, name: &str) -> String {
    let tokens = tern.cli_json(&["token", "device", name, "--tenant", &p.tenant]);
    tokens["access_token"].as_str().expect("token").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_4_12_token_method_connects_and_refreshes_on_a_live_connection() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let (mut raw, connack) = Raw::connect(&tern, "token", &a.access_token).await;
    assert_eq!(connack.code, ConnectReturnCode::Success);
    let properties = connack.properties.expect("properties");
    assert_eq!(
        properties.authentication_method.as_deref(),
        Some("token"),
        "3.2.2.3.17: the CONNECT's method"
    );
    assert_eq!(
        properties.assigned_client_identifier.as_deref(),
        Some(a.device_id.as_str()),
        "the device comes from the token"
    );

    let fresh = fresh_token(&tern, &a, "a");
    assert_eq!(
        raw.reauthenticate("token", &fresh).await,
        (0xF0, 0x00),
        "AUTH success"
    );
    // Another device's token ends the connection: DISCONNECT 0x87 (4.12.1-2).
    assert_eq!(
        raw.reauthenticate("token", &b.access_token).await,
        (0xE0, 0x87)
    );

    // A method the server does not know is refused at CONNECT with 0x8C.
    let (_, refused) = Raw::connect(&tern, "SCRAM-SHA-1", "x").await;
    assert_eq!(refused.code, ConnectReturnCode::BadAuthenticationMethod);
    // An invalid token as authentication data: 0x86.
    let (_, refused) = Raw::connect(&tern, "token", "not-a-token").await;
    assert_eq!(refused.code, ConnectReturnCode::BadUserNamePassword);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_4_12_a_token_connection_ends_with_its_token_unless_refreshed() {
    let tern = Tern::start_with_env(&[("TERN_IDENTITY__DEVICE_ACCESS_TOKEN_TTL_SECS", "3")]);
    let a = tern.provision("acme", "a");
    let b = tern.provision("acme", "b");

    // b refreshes each second and outlives its first token; a does not and is cut.
    let (mut cut, _) = Raw::connect(&tern, "token", &a.access_token).await;
    let (mut kept, _) = Raw::connect(&tern, "token", &b.access_token).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let fresh = fresh_token(&tern, &b, "b");
        assert_eq!(kept.reauthenticate("token", &fresh).await, (0xF0, 0x00));
    }
    let frame = cut.frame().await.expect("a DISCONNECT");
    assert_eq!((frame[0], frame[2]), (0xE0, 0xA0), "maximum connect time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_4_12_0_7_auth_without_an_authentication_method_is_a_protocol_error() {
    let tern = Tern::start();
    let a = tern.provision("acme", "a");
    let (mut raw, connack) = Raw::open(&tern, None, Some(&a)).await;
    assert_eq!(connack.code, ConnectReturnCode::Success);
    assert_eq!(
        raw.reauthenticate("token", &a.access_token).await,
        (0xE0, 0x82)
    );
}
