//! The CoAP device endpoint (RFC 7252): interoperability with libcoap's `coap-client`
//! (Debian's libcoap3-bin) for telemetry, block-wise transfer (RFC 7959), errors and Observe
//! (RFC 7641) for commands; raw datagrams for deduplication of retransmissions, malformed
//! input and non-confirmable requests.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;

use crate::harness::{PATIENCE, Provisioned, Tern};

/// Debian's libcoap client without DTLS; the Makefile installs it.
const COAP_CLIENT: &str = "coap-client-notls";
const TOKEN_OPTION: u16 = 65003;

fn url(tern: &Tern, path: &str) -> String {
    format!("coap://127.0.0.1:{}/{path}", tern.coap_port)
}

fn coap_client(args: &[&str]) -> Output {
    let out = Command::new(COAP_CLIENT)
        .args(["-B", "10"])
        .args(args)
        .output()
        .expect("coap-client-notls (Debian package libcoap3-bin) runs");
    assert!(out.status.success(), "{out:?}");
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything coap-client printed: it reports error responses on stderr.
fn said(out: &Output) -> String {
    stdout(out) + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_client_posts_telemetry_and_events_block_wise_and_gets_specific_errors() {
    let tern = Tern::start();
    let p = tern.provision("acme", "sensor");
    let token = format!("{TOKEN_OPTION},{}", p.access_token);
    let out = coap_client(&[
        "-m",
        "post",
        "-O",
        &token,
        "-e",
        r#"{"temp": 21.5}"#,
        &url(&tern, "telemetry"),
    ]);
    assert_eq!(stdout(&out).trim(), "", "2.01 Created has no payload");
    assert_eq!(tern.wait_points(&p, "temp", 1).await[0]["value"], 21.5);

    // 5 KB in 64-byte blocks (Block1): stored whole.
    let big: serde_json::Map<String, serde_json::Value> =
        (0..400).map(|i| (format!("m{i}"), i.into())).collect();
    let file = tern.dir.path().join("big.json");
    std::fs::write(&file, serde_json::to_vec(&big).expect("json")).expect("write");
    coap_client(&[
        "-m",
        "post",
        "-b",
        "64",
        "-O",
        &token,
        "-f",
        file.to_str().expect("path"),
        &url(&tern, "telemetry"),
    ]);
    assert_eq!(tern.wait_points(&p, "m399", 1).await[0]["value"], 399.0);

    coap_client(&[
        "-m",
        "post",
        "-O",
        &token,
        "-e",
        "door open",
        &url(&tern, "event"),
    ]);
    // Ingest is asynchronous: wait for the event to be readable.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let path = "/api/v1/tenants/acme/devices/sensor/events?kind=event&from=0";
        let (_, events) = tern.get(&p.api_token, path).await;
        if events.to_string().contains("door open") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "event not stored: {events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for (args, expected) in [
        (vec!["-m", "post", "-e", "{}"], "4.01"),
        (
            vec!["-m", "post", "-O", "65003,not-a-token", "-e", "{}"],
            "4.01",
        ),
        (vec!["-m", "get", "-O", &token], "4.05"),
    ] {
        let said = said(&coap_client(
            &[&args[..], &[&url(&tern, "telemetry")]].concat(),
        ));
        assert!(said.contains(expected), "{args:?}: {said}");
    }
    let out = coap_client(&["-m", "get", "-O", &token, &url(&tern, "nothing")]);
    assert!(said(&out).contains("4.04 no resource"), "{}", said(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_client_observes_its_commands_and_answers_them() {
    let tern = Tern::start();
    let p = tern.provision("acme", "valve");
    let token = format!("{TOKEN_OPTION},{}", p.access_token);
    let mut observer = Command::new(COAP_CLIENT)
        .args([
            "-s",
            "20",
            "-B",
            "20",
            "-m",
            "get",
            "-O",
            &token,
            &url(&tern, "commands"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("coap-client-notls runs");
    let mut output = observer.stdout.take().expect("stdout");
    // The registration's response comes first (no commands yet); then the notification.
    let mut wait_for = |needle: &'static str| {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = std::io::Read::read(&mut output, &mut buf).expect("read");
            assert!(n > 0, "observer ended before {needle:?}: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains(needle) {
                return seen;
            }
        }
    };
    let _ = tokio::task::block_in_place(|| wait_for("{\"commands\":[]}"));
    let sent = tern.cli_json(&["command", "send", "valve", "open", "--tenant", "acme"]);
    let id = sent["id"].as_str().expect("id").to_string();
    let notified = tokio::task::block_in_place(|| wait_for("\"open\""));
    assert!(notified.contains(&id), "{notified}");
    let _ = observer.kill();
    let _ = observer.wait();

    let answer = coap_client(&[
        "-m",
        "post",
        "-O",
        &token,
        "-e",
        r#"{"status": 200, "payload": {"open": true}}"#,
        &url(&tern, &format!("commands/{id}/response")),
    ]);
    assert!(stdout(&answer).contains("succeeded"), "{}", stdout(&answer));
    let shown = tern.cli_json(&["command", "show", "valve", &id, "--tenant", "acme"]);
    assert_eq!(shown["state"], "succeeded");
    assert_eq!(shown["result"]["payload"]["open"], true);
}

/// A confirmable POST of `payload` to `path` with the device's token.
fn post(p: &Provisioned, path: &str, message_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(RequestType::Post);
    packet.header.message_id = message_id;
    packet.set_token(vec![1, 2, 3, 4]);
    for segment in path.split('/') {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    packet.add_option(
        CoapOption::Unknown(TOKEN_OPTION),
        p.access_token.as_bytes().to_vec(),
    );
    packet.payload = payload.to_vec();
    packet.to_bytes_unlimited().expect("encode")
}

async fn exchange(socket: &UdpSocket, datagram: &[u8]) -> Packet {
    socket.send(datagram).await.expect("send");
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(PATIENCE, socket.recv(&mut buf))
        .await
        .expect("an answer in time")
        .expect("recv");
    Packet::from_bytes(&buf[..n]).expect("a CoAP message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_retransmissions_are_stored_once_and_bad_datagrams_harm_nobody() {
    let tern = Tern::start();
    let p = tern.provision("acme", "meter");
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket
        .connect(("127.0.0.1", tern.coap_port))
        .await
        .expect("connect");

    // The same confirmable message twice (a retransmission): one point, the same answer.
    let datagram = post(&p, "telemetry", 0x1234, br#"{"kwh": 7}"#);
    let first = exchange(&socket, &datagram).await;
    let again = exchange(&socket, &datagram).await;
    assert_eq!(first.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(first.header.message_id, 0x1234);
    assert_eq!(
        first.header.code,
        MessageClass::Response(ResponseType::Created)
    );
    assert_eq!(first.get_token(), [1, 2, 3, 4]);
    assert_eq!(
        again.to_bytes_unlimited().ok(),
        first.to_bytes_unlimited().ok()
    );

    // Garbage and a confirmable message that cannot be parsed (reset, 4.2); an unknown
    // critical option (4.02); a payload over the limit (4.13 with Size1).
    socket.send(b"\xff\xff").await.expect("send");
    let mut truncated = post(&p, "telemetry", 0x2000, b"{}");
    truncated.truncate(6);
    let reset = exchange(&socket, &truncated).await;
    assert_eq!(
        (reset.header.get_type(), reset.header.message_id),
        (MessageType::Reset, 0x2000)
    );
    let mut unknown = Packet::from_bytes(&post(&p, "telemetry", 0x2001, b"{}")).expect("parse");
    unknown.add_option(CoapOption::Unknown(65001), b"x".to_vec());
    let refused = exchange(&socket, &unknown.to_bytes_unlimited().expect("encode")).await;
    assert_eq!(
        refused.header.code,
        MessageClass::Response(ResponseType::BadOption)
    );
    let mut block =
        Packet::from_bytes(&post(&p, "telemetry", 0x2002, &[b' '; 1024])).expect("parse");
    // Block1 number 300 of 1024 bytes: past 256 KiB.
    block.add_option(CoapOption::Block1, vec![0x12, 0xC6]);
    let too_large = exchange(&socket, &block.to_bytes_unlimited().expect("encode")).await;
    assert_eq!(
        too_large.header.code,
        MessageClass::Response(ResponseType::RequestEntityTooLarge)
    );
    assert!(too_large.get_first_option(CoapOption::Size1).is_some());

    // A non-confirmable request gets a non-confirmable answer with an id of its own.
    let mut non =
        Packet::from_bytes(&post(&p, "telemetry", 0x3000, br#"{"kwh": 8}"#)).expect("parse");
    non.header.set_type(MessageType::NonConfirmable);
    let answer = exchange(&socket, &non.to_bytes_unlimited().expect("encode")).await;
    assert_eq!(answer.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Created)
    );

    // A gateway path for a device that is not its child (here: another tenant's): 4.03.
    let stranger = tern.provision("globex", "stranger");
    let path = format!("telemetry/{}", stranger.device_id);
    let forbidden = exchange(&socket, &post(&p, &path, 0x3001, br#"{"kwh": 9}"#)).await;
    assert_eq!(
        forbidden.header.code,
        MessageClass::Response(ResponseType::Forbidden)
    );

    let points = tern.wait_points(&p, "kwh", 2).await;
    let values = crate::harness::values(&points);
    assert_eq!(
        values,
        [7.0, 8.0],
        "the retransmission was not stored twice"
    );
}
