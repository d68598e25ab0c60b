//! A bad configuration stops start-up with an error naming the key.

use std::process::Command;

use crate::harness::{TERN, free_ports, free_udp_port};

fn up_with(env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every listener on a free port: a default one (CoAP's 5683) would collide with the
    // other tests that start at the same time.
    let [mqtt, http, grpc, mqtts, wss] = free_ports();
    let out = Command::new(TERN)
        .args(["up", "--bind", "127.0.0.1", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(args)
        .env("TERN_MQTT_PORT", mqtt.to_string())
        .env("TERN_HTTP_PORT", http.to_string())
        .env("TERN_GRPC_PORT", grpc.to_string())
        .env("TERN_MQTTS_PORT", mqtts.to_string())
        .env("TERN_WSS_PORT", wss.to_string())
        .env("TERN_COAP_PORT", free_udp_port().to_string())
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .output()
        .expect("run tern up");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_environment_value_names_the_variable_and_key() {
    let (ok, stderr) = up_with(&[("TERN_MQTT__MAX_PACKET_SIZE", "lots")], &[]);
    assert!(!ok);
    assert!(
        stderr.contains("mqtt.max_packet_size") && stderr.contains("TERN_MQTT__MAX_PACKET_SIZE"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_key_in_the_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tern.toml");
    std::fs::write(&file, "[mqtt]\nmax_packet_sise = 10\n").expect("write");
    let (ok, stderr) = up_with(&[], &["--config", file.to_str().expect("path")]);
    assert!(!ok);
    assert!(
        stderr.contains("max_packet_sise") && stderr.contains("mqtt"),
        "{stderr}"
    );
}

#[test]
fn an_out_of_range_value_and_a_missing_file_are_refused() {
    let (ok, stderr) = up_with(&[("TERN_MQTT__MAX_PACKET_SIZE", "1")], &[]);
    assert!(!ok);
    assert!(stderr.contains("mqtt.max_packet_size"), "{stderr}");
    let (ok, stderr) = up_with(&[], &["--config", "/nonexistent/tern.toml"]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/tern.toml"), "{stderr}");
}

#[test]
fn a_port_in_use_is_named() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let (ok, stderr) = up_with(&[("TERN_HTTP_PORT", &port)], &[]);
    assert!(!ok);
    assert!(
        stderr.contains("http_port") && stderr.contains(&port),
        "{stderr}"
    );
}

#[test]
fn a_missing_or_half_tls_configuration_stops_start_up_naming_the_key() {
    let (ok, stderr) = up_with(
        &[
            ("TERN_MQTT__TLS__CERT_FILE", "/nonexistent/tls.crt"),
            ("TERN_MQTT__TLS__KEY_FILE", "/nonexistent/tls.key"),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("mqtt.tls.cert_file") && stderr.contains("/nonexistent/tls.crt"),
        "{stderr}"
    );
    let (ok, stderr) = up_with(&[("TERN_MQTT__TLS__CERT_FILE", "/etc/hostname")], &[]);
    assert!(!ok);
    assert!(stderr.contains("mqtt.tls.key_file"), "{stderr}");
}

#[test]
fn a_bad_kafka_setting_stops_start_up_naming_the_key() {
    let (ok, stderr) = up_with(
        &[
            ("TERN_EVENTLOG__BACKEND", "kafka"),
            ("TERN_EVENTLOG__KAFKA__COMPRESSION", "brotli"),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("`eventlog.kafka.compression` must be none, snappy or lz4"),
        "{stderr}"
    );
}
