//! A real browser as an MQTT client: Debian's Chromium, headless, driven over WebDriver by
//! Debian's chromedriver, runs a page whose script opens `ws://…/mqtt` with the `mqtt`
//! subprotocol, sends CONNECT and a QoS 1 telemetry PUBLISH, and writes what came back into
//! the page title. No virtual time: the test polls the title until the PUBACK shows.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Publish};

use crate::harness::{PATIENCE, Tern};
use crate::webdriver::Driver;

/// Serves `page` over HTTP on a free loopback port (the way a web app would be served);
/// returns its URL.
async fn serve_page(page: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    url
}

fn js_bytes(bytes: &BytesMut) -> String {
    bytes
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_connects_over_websocket_and_publishes() {
    let tern = Tern::start();
    let p = tern.provision("acme", "browser");
    let mut connect = BytesMut::new();
    Connect::new(p.device_id.as_str())
        .set_login(p.device_id.as_str(), p.access_token.as_str())
        .write(&mut connect)
        .expect("encode");
    let mut publish = Publish::new("telemetry", QoS::AtLeastOnce, br#"{"browser": 1}"#.to_vec());
    publish.pkid = 7;
    let mut publish_bytes = BytesMut::new();
    publish.write(&mut publish_bytes).expect("encode");
    let page = format!(
        r#"<!doctype html><title>start</title><script>
const ws = new WebSocket("ws://127.0.0.1:{port}/mqtt", "mqtt");
ws.binaryType = "arraybuffer";
ws.onopen = () => ws.send(new Uint8Array([{connect}]));
ws.onmessage = (event) => {{
  const b = new Uint8Array(event.data);
  if (b[0] === 0x20) {{
    document.title = "connack " + b[3] + " " + ws.protocol;
    ws.send(new Uint8Array([{publish}]));
  }} else if (b[0] === 0x40) {{
    document.title = "puback " + (b[2] * 256 + b[3]) + " " + ws.protocol;
  }}
}};
ws.onerror = () => {{ document.title = "error"; }};
</script>"#,
        port = tern.http_port,
        connect = js_bytes(&connect),
        publish = js_bytes(&publish_bytes),
    );
    let url = serve_page(page).await;

    let driver = Driver::start().await;
    driver.goto(&url).await;
    let deadline = Instant::now() + PATIENCE;
    let title = loop {
        let title = driver.command(reqwest::Method::GET, "/title", None).await;
        let title = title.as_str().unwrap_or_default().to_string();
        if title.starts_with("puback") || title == "error" || Instant::now() > deadline {
            break title;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        title, "puback 7 mqtt",
        "PUBACK for packet 7, subprotocol mqtt"
    );
    driver.quit().await;
    let points = tern.wait_points(&p, "browser", 1).await;
    assert_eq!(crate::harness::values(&points), [1.0]);
}
