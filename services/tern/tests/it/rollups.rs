//! Telemetry at other resolutions: rollups kept while ingesting, chosen by `resolution`.

use serde_json::{Value, json};

use crate::harness::{Mqtt, Tern};

const HOUR: i64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_follow_the_raw_points_and_auto_picks_the_resolution() {
    let tern = Tern::start();
    let p = tern.provision("acme", "meter");
    // Samples over three hours that ended 200 days ago, sent out of order.
    let base = (tern_core::now_ms() - 200 * 24 * HOUR) / HOUR * HOUR;
    let samples = [
        (2, 30.0),
        (0, 10.0),
        (HOUR / 2, 20.0),
        (HOUR + 5, 5.0),
        (3 * HOUR - 1, 7.0),
    ];
    let mut device = Mqtt::device(&tern, &p).await;
    let payloads = samples
        .iter()
        .map(|(at, v)| json!({"kwh": v, "ts": base + at}).to_string().into_bytes())
        .collect();
    device.publish_acked("telemetry", payloads).await;
    assert_eq!(tern.wait_points(&p, "kwh", samples.len()).await.len(), 5);

    let series = |query: String| {
        let tern = &tern;
        let p = &p;
        async move {
            let path = format!(
                "/api/v1/tenants/acme/devices/{}/telemetry?metric=kwh&{query}",
                p.device_id
            );
            tern.get(&p.api_token, &path).await
        }
    };
    let (status, hours) = series(format!("from={base}&to={}&resolution=1h", base + 3 * HOUR)).await;
    assert_eq!(status, 200, "{hours}");
    assert_eq!(hours["resolution"], "1h");
    let buckets: Vec<Value> = hours["points"].as_array().expect("points").clone();
    assert_eq!(buckets.len(), 3, "{hours}");
    assert_eq!(
        (&buckets[0]["ts"], &buckets[0]["count"], &buckets[0]["sum"]),
        (&json!(base), &json!(3), &json!(60.0))
    );
    assert_eq!(
        (&buckets[0]["min"], &buckets[0]["max"]),
        (&json!(10.0), &json!(30.0))
    );
    assert_eq!(buckets[0]["value"], 20.0, "the mean");
    assert_eq!(
        (&buckets[1]["count"], &buckets[1]["value"]),
        (&json!(1), &json!(5.0))
    );
    assert_eq!(buckets[2]["ts"], base + 2 * HOUR);

    // A year-long chart reads days; half an hour reads raw points; a day reads minutes when
    // the limit allows 1440 buckets, hours when it does not.
    let year = format!(
        "from={}&resolution=auto",
        tern_core::now_ms() - 365 * 24 * HOUR
    );
    let (_, yearly) = series(year).await;
    assert_eq!(yearly["resolution"], "1d", "{yearly}");
    assert_eq!(yearly["points"][0]["count"], 5);
    let (_, short) = series(format!(
        "from={base}&to={}&resolution=auto",
        base + HOUR / 2
    ))
    .await;
    assert_eq!(short["resolution"], "raw");
    assert_eq!(short["points"].as_array().map(Vec::len), Some(2));
    assert!(
        short["points"][0].get("count").is_none(),
        "raw points carry no bucket fields"
    );
    let day = |limit| {
        format!(
            "from={base}&to={}&resolution=auto&limit={limit}",
            base + 24 * HOUR
        )
    };
    assert_eq!(series(day(1500)).await.1["resolution"], "1m");
    assert_eq!(series(day(1000)).await.1["resolution"], "1h");

    let (status, body) = series("resolution=5m".into()).await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (400, &json!("resolution")),
        "{body}"
    );
    let events = format!(
        "/api/v1/tenants/acme/devices/{}/events?resolution=1h",
        p.device_id
    );
    let (status, body) = tern.get(&p.api_token, &events).await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (400, &json!("resolution")),
        "{body}"
    );
}
