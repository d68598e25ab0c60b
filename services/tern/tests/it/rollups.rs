//! Telemetry at other resolutions: rollups kept beside ingest, chosen by `resolution`.

use serde_json::{Value, json};

use crate::harness::{Mqtt, Tern};

const HOUR: i64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_follow_the_raw_points_and_auto_picks_the_resolution() {
    let tern = Tern::start();
    let p = tern.provision("acme", "meter");
    // Samples over the first three hours of a UTC day 200 days ago, sent out of order. (Starting
    // at midnight keeps them in one day bucket whatever the time of day the test runs.)
    let one_day = 24 * HOUR;
    let base = (tern_core::now_ms() - 200 * one_day) / one_day * one_day;
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
    assert_eq!(tern.wait_rollup_points(5).await, 5);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_aged_out_points_per_resolution() {
    let tern = Tern::start_with_env(&[("TERN_RETENTION__SWEEP_INTERVAL_SECS", "1")]);
    let p = tern.provision("acme", "meter");
    let now = tern_core::now_ms();
    let mut device = Mqtt::device(&tern, &p).await;
    let payloads = [now - 72 * HOUR, now - 1000]
        .iter()
        .map(|ts| json!({"kwh": 1, "ts": ts}).to_string().into_bytes())
        .collect();
    device.publish_acked("telemetry", payloads).await;
    assert_eq!(tern.wait_points(&p, "kwh", 2).await.len(), 2);
    assert_eq!(tern.wait_rollup_points(2).await, 2);

    let shown = tern.cli_json(&["tenant", "retention", "acme"]);
    assert_eq!(shown, json!({}), "forever by default");
    let set = tern.cli_json(&[
        "tenant",
        "retention",
        "acme",
        "--raw-days",
        "1",
        "--1m-days",
        "2",
    ]);
    assert_eq!(set, json!({"raw_days": 1, "1m_days": 2}));

    let path = |query: &str| {
        format!(
            "/api/v1/tenants/acme/devices/{}/telemetry?metric=kwh&from=0&{query}",
            p.device_id
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let raw = loop {
        let (_, body) = tern.get(&p.api_token, &path("resolution=raw")).await;
        if body["points"].as_array().map(Vec::len) == Some(1)
            || std::time::Instant::now() > deadline
        {
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        raw["points"].as_array().map(Vec::len),
        Some(1),
        "the 3-day-old point is gone: {raw}"
    );
    let (_, minutes) = tern.get(&p.api_token, &path("resolution=1m")).await;
    assert_eq!(
        minutes["points"].as_array().map(Vec::len),
        Some(1),
        "minutes kept 2 days: {minutes}"
    );
    let (_, hours) = tern.get(&p.api_token, &path("resolution=1h")).await;
    assert_eq!(
        hours["points"].as_array().map(Vec::len),
        Some(2),
        "hours kept forever: {hours}"
    );

    let shorter_minutes = json!({"raw_days": 30, "1m_days": 7});
    let (status, body) = tern
        .send_json(
            reqwest::Method::PUT,
            &p.api_token,
            "/api/v1/tenants/acme/retention",
            &shorter_minutes,
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "1m_days", "{body}");
    let other = tern.provision("globex", "g");
    let (status, _) = tern
        .get(&other.api_token, "/api/v1/tenants/acme/retention")
        .await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_rebuild_runs_as_a_job_with_progress() {
    let tern = Tern::start();
    let p = tern.provision("acme", "meter");
    let mut device = Mqtt::device(&tern, &p).await;
    let base = (tern_core::now_ms() - 10 * 24 * HOUR) / HOUR * HOUR;
    let payloads = (0..6)
        .map(|i| {
            json!({"kwh": i, "temp": 20, "ts": base + i * HOUR})
                .to_string()
                .into_bytes()
        })
        .collect();
    device.publish_acked("telemetry", payloads).await;
    tern.wait_points(&p, "temp", 6).await;
    assert_eq!(tern.wait_rollup_points(12).await, 12, "kwh and temp");
    let hours = format!(
        "/api/v1/tenants/acme/devices/{}/telemetry?metric=kwh&from={base}&resolution=1h",
        p.device_id
    );
    let before = tern.get(&p.api_token, &hours).await.1;

    let job = tern.cli_json(&["job", "rebuild-rollups", "--tenant", "acme", "--wait"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        (&job["series_total"], &job["series_done"]),
        (&json!(2), &json!(2)),
        "kwh and temp"
    );
    assert_eq!(job["points_read"], 12);
    assert_eq!(
        tern.get(&p.api_token, &hours).await.1,
        before,
        "rebuilt buckets equal the kept ones"
    );
    let listed = tern.cli_json(&["job", "list", "--tenant", "acme"]);
    assert_eq!(listed[0]["id"], job["id"]);
    let other = tern.provision("globex", "g");
    let path = format!(
        "/api/v1/tenants/acme/jobs/{}",
        job["id"].as_str().unwrap_or_default()
    );
    assert_eq!(tern.get(&other.api_token, &path).await.0, 403);
}
