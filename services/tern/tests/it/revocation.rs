//! Ending a device's access: disabling, revoking its tokens and deleting it close its live MQTT
//! connection at once (MQTT 5: DISCONNECT 0x98), and it cannot come back until allowed.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};

use crate::harness::{PATIENCE, Provisioned, Tern};

pub(crate) fn options(tern: &Tern, device_id: &str, token: &str) -> MqttOptions {
    let mut options = MqttOptions::new(device_id, "127.0.0.1", tern.mqtt_port);
    options.set_credentials(device_id, token);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Connects with MQTT 5; the error is the refusal.
pub(crate) async fn connect(
    options: MqttOptions,
) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let (client, mut events) = AsyncClient::new(options, 10);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = tokio::time::timeout(PATIENCE, events.poll())
            .await
            .expect("CONNACK in time")?
        {
            return Ok((client, events));
        }
    }
}

/// Waits for the server to end the connection; returns its DISCONNECT reason and how long
/// it took from `since`.
pub(crate) async fn ended(
    events: &mut EventLoop,
    since: Instant,
) -> (DisconnectReasonCode, Duration) {
    loop {
        match tokio::time::timeout(PATIENCE, events.poll())
            .await
            .expect("closed in time")
        {
            Ok(_) => continue,
            Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code, ..
            })) => {
                return (reason_code, since.elapsed());
            }
            Err(other) => panic!("expected a DISCONNECT with a reason, got {other}"),
        }
    }
}

fn refusal(result: Result<(AsyncClient, EventLoop), ConnectionError>) -> ConnectReturnCode {
    match result {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Ok(_) => panic!("expected a refusal, the device connected"),
        Err(other) => panic!("expected a refusal, got {other}"),
    }
}

pub(crate) fn cli_ok(tern: &Tern, args: &[&str]) {
    let out = tokio::task::block_in_place(|| tern.cli(args));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_device_closes_its_connection_and_enabling_lets_it_back() {
    let tern = Tern::start();
    let p = tern.provision("acme", "a");
    let (_client, mut events) = connect(options(&tern, &p.device_id, &p.access_token))
        .await
        .expect("connect");

    let asked = Instant::now();
    cli_ok(&tern, &["device", "disable", "a", "--tenant", "acme"]);
    let (reason, took) = ended(&mut events, asked).await;
    assert_eq!(reason, DisconnectReasonCode::AdministrativeAction);
    eprintln!("disconnected {took:?} after the disable request was sent");

    let again = connect(options(&tern, &p.device_id, &p.access_token)).await;
    assert_eq!(refusal(again), ConnectReturnCode::NotAuthorized);
    cli_ok(&tern, &["device", "enable", "a", "--tenant", "acme"]);
    connect(options(&tern, &p.device_id, &p.access_token))
        .await
        .expect("enabled again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_close_the_connection_and_stop_working_before_they_expire() {
    let tern = Tern::start();
    let p = tern.provision("acme", "a");
    let other = tern.provision("acme", "b");
    let (_client, mut events) = connect(options(&tern, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    let (_bystander, mut bystander_events) =
        connect(options(&tern, &other.device_id, &other.access_token))
            .await
            .expect("connect");

    let asked = Instant::now();
    cli_ok(&tern, &["token", "revoke", "a", "--tenant", "acme"]);
    let (reason, took) = ended(&mut events, asked).await;
    assert_eq!(reason, DisconnectReasonCode::AdministrativeAction);
    eprintln!("disconnected {took:?} after the revocation request was sent");

    // The old access token is refused although it has not expired.
    let stale = connect(options(&tern, &p.device_id, &p.access_token)).await;
    assert_eq!(refusal(stale), ConnectReturnCode::BadUserNamePassword);
    // Tokens issued after the revocation work, even within the same second.
    let fresh = tokio::task::block_in_place(|| {
        tern.cli_json(&["token", "device", "a", "--tenant", "acme"])
    });
    let token = fresh["access_token"].as_str().expect("token");
    connect(options(&tern, &p.device_id, token))
        .await
        .expect("a fresh token connects");

    // The other device was not touched.
    let still = tokio::time::timeout(Duration::from_millis(200), bystander_events.poll()).await;
    assert!(
        !matches!(still, Ok(Err(_))),
        "the bystander's connection must stay open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_device_closes_its_connection() {
    let tern = Tern::start();
    let p: Provisioned = tern.provision("acme", "a");
    let (_client, mut events) = connect(options(&tern, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    let asked = Instant::now();
    cli_ok(&tern, &["device", "delete", "a", "--tenant", "acme"]);
    let (reason, _) = ended(&mut events, asked).await;
    assert_eq!(reason, DisconnectReasonCode::AdministrativeAction);
    let again = connect(options(&tern, &p.device_id, &p.access_token)).await;
    assert_eq!(
        refusal(again),
        ConnectReturnCode::NotAuthorized,
        "no such device"
    );
}
