//! A smoke run of the fleet simulator against `tern up`: provisioning through the API, QoS 1
//! publishing, and the data arriving in the store. (Load runs are `make bench`, not tests.)

use crate::harness::{Tern, run_sim_all_acked, sim_args};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_provisions_publishes_and_its_data_is_stored() {
    let tern = Tern::start();
    let token = tern.operator_token();
    let args = sim_args(
        &tern,
        tern.mqtt_port,
        &[
            "--devices",
            "5",
            "--qos",
            "1",
            "--rate",
            "50",
            "--duration",
            "1",
        ],
    );
    let (report, acked) = run_sim_all_acked(args).await;
    assert_eq!(report["connected"], 5, "{report}");
    assert!(report["ack_latency"]["p99_us"].as_u64().expect("p99") > 0);

    // Every acknowledged message becomes exactly one point of `value` for its device.
    let mut stored = 0;
    for _ in 0..300 {
        stored = 0;
        for i in 0..5 {
            let path = format!(
                "/api/v1/tenants/sim/devices/sim-{i}/telemetry?metric=value&from=0&limit=10000"
            );
            let (status, body) = tern.get(&token, &path).await;
            assert_eq!(status, 200, "{body}");
            stored += body["points"].as_array().map_or(0, Vec::len) as u64;
        }
        if stored >= acked {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stored, acked, "every acknowledged message stored once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_answer_commands_sent_through_the_api() {
    let tern = Tern::start();
    let args = sim_args(
        &tern,
        tern.mqtt_port,
        &[
            "--devices",
            "4",
            "--rate",
            "5",
            "--duration",
            "1",
            "--answer-commands",
            "--command-rate",
            "20",
        ],
    );
    let report = tern_sim::run(args).await.expect("simulation");
    let commands = &report["commands"];
    let sent = commands["sent"].as_u64().expect("sent");
    assert!(sent > 0, "{report}");
    assert_eq!(commands["succeeded"].as_u64(), Some(sent), "{report}");
    assert!(commands["round_trip"]["p99_us"].as_u64().expect("p99") > 0);
}

/// Runs 3 publishers and 1 subscriber with `flag` against `port`, checks the subscriber got
/// messages, and waits until the bridge recorded a connection whose lifecycle event mentions
/// `marker` (how it was made).
async fn pub_sub_with(tern: &Tern, port: u16, flag: &str, marker: &str) {
    let extra = [
        flag,
        "--devices",
        "3",
        "--qos",
        "1",
        "--rate",
        "20",
        "--duration",
        "1",
        "--topic",
        "bench/{device}",
        "--payload",
        "binary",
        "--subscribers",
        "1",
        "--sub-topic",
        "bench/#",
    ];
    let (report, _) = run_sim_all_acked(sim_args(tern, port, &extra)).await;
    assert!(
        report["received"].as_u64().expect("received") > 0,
        "{report}"
    );
    let token = tern.operator_token();
    let path = "/api/v1/tenants/sim/devices/sim-0/events?kind=lifecycle&from=0";
    let deadline = std::time::Instant::now() + crate::harness::PATIENCE;
    loop {
        let (_, events) = tern.get(&token, path).await;
        if events.to_string().contains(marker) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {marker} connection: {events}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_speaks_mqtt_5_for_publishers_and_subscribers() {
    let tern = Tern::start();
    pub_sub_with(&tern, tern.mqtt_port, "--mqtt5", "mqtt/5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_speaks_mqtt_over_websocket() {
    let tern = Tern::start();
    pub_sub_with(&tern, tern.http_port, "--websocket", "websocket").await;
}
