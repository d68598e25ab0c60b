//! MQTT over WebSocket on the HTTP port (`/mqtt`, subprotocol `mqtt`): Eclipse Paho's
//! WebSocket transport (the same handshake and binary framing browsers use) and a refused
//! upgrade without the subprotocol.

use std::io::{Read, Write};

use crate::harness::Tern;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_speaks_mqtt_311_and_5_over_websocket() {
    let tern = Tern::start();
    let p = tern.provision("acme", "a");
    crate::harness::paho_websocket(tern.http_port, &p, None);
    let points = tern.wait_points(&p, "ws", 2).await;
    assert_eq!(
        points.len(),
        2,
        "one telemetry message per protocol version"
    );
}

#[test]
fn an_upgrade_without_the_mqtt_subprotocol_is_refused() {
    let tern = Tern::start();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", tern.http_port)).expect("connect");
    write!(
        stream,
        "GET /mqtt HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .expect("write");
    let mut response = vec![0u8; 512];
    let n = stream.read(&mut response).expect("read");
    let head = String::from_utf8_lossy(&response[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}
