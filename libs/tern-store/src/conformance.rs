//! The conformance suite every [`Store`] implementation must pass. Each check takes an `open`
//! function that opens (or reopens) the store kept under a directory, and a fresh directory.
//! [`store_conformance_tests!`](crate::store_conformance_tests) makes one test per check.

// Test support: a failed expectation is the point of a panic here.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::{
    Point, RangeQuery, RawEvent, RecordSwap, RecordWrite, Resolution, Rollup, RollupDelta,
    RollupDeltas, Store, StoreError, WriteBatch,
};

/// Opens the store under a directory; opening it again after dropping it must see the same data.
pub type Open = dyn Fn(&Path) -> Arc<dyn Store>;

fn point(tenant: &str, device: &str, metric: &str, ts_ms: i64, value: f64, id: &str) -> Point {
    Point {
        tenant: tenant.into(),
        device: device.into(),
        metric: metric.into(),
        ts_ms,
        value,
        message_id: id.into(),
    }
}

fn range(tenant: &str, device: &str, from_ms: i64, to_ms: i64) -> RangeQuery {
    RangeQuery {
        tenant: tenant.into(),
        device: device.into(),
        from_ms,
        to_ms,
        limit: 1000,
        descending: false,
    }
}

fn event(device: &str, ts_ms: i64, id: &str, payload: &'static [u8]) -> RawEvent {
    RawEvent {
        tenant: "t".into(),
        device: device.into(),
        ts_ms,
        message_id: id.into(),
        kind: "event".into(),
        topic: "event".into(),
        content_type: "text/plain".into(),
        payload: Bytes::from_static(payload),
    }
}

async fn write_points(store: &dyn Store, points: Vec<Point>) {
    store
        .write(WriteBatch {
            points,
            events: vec![],
        })
        .await
        .expect("write");
}

const CHECKPOINT: &str = "rollup_checkpoint";

/// Folds `points` into rollup deltas and merges them, advancing the checkpoint `test/0`
/// (a count of merges) from whatever it holds.
pub async fn merge_points(store: &dyn Store, points: &[Point]) {
    let expected = store.get_record(CHECKPOINT, "test/0").await.expect("get");
    let merges = expected.as_deref().map_or(0, |b| {
        String::from_utf8_lossy(b).parse::<u64>().unwrap_or(0)
    });
    let mut deltas = RollupDeltas::default();
    for p in points {
        deltas.add_point(p).expect("valid point");
    }
    let swap = RecordSwap {
        kind: CHECKPOINT.into(),
        key: "test/0".into(),
        expected,
        new: Bytes::from((merges + 1).to_string()),
    };
    let merged = store
        .merge_rollups(deltas.into_deltas(), swap)
        .await
        .expect("merge");
    assert!(merged, "the checkpoint was the one just read");
}

pub async fn range_queries_respect_bounds_order_and_limit(open: &Open, dir: &Path) {
    let store = open(dir);
    let points = (0..10)
        .map(|i| point("t", "d", "temp", 1000 + i * 10, i as f64, &format!("m{i}")))
        .collect();
    write_points(store.as_ref(), points).await;
    write_points(
        store.as_ref(),
        vec![point("t", "d", "hum", 1005, 50.0, "x")],
    )
    .await;

    let got = store
        .points(&range("t", "d", 1020, 1050), "temp")
        .await
        .expect("query");
    let times: Vec<i64> = got.iter().map(|p| p.ts_ms).collect();
    assert_eq!(
        times,
        vec![1020, 1030, 1040],
        "from inclusive, to exclusive, other metrics excluded"
    );
    assert_eq!(got[0].value, 2.0);
    assert_eq!(got[0].metric, "temp");

    let mut newest_two = range("t", "d", i64::MIN, i64::MAX);
    newest_two.limit = 2;
    newest_two.descending = true;
    let got = store.points(&newest_two, "temp").await.expect("query");
    assert_eq!(
        got.iter().map(|p| p.ts_ms).collect::<Vec<_>>(),
        vec![1090, 1080]
    );

    let negative = store
        .points(&range("t", "d", -100, 0), "temp")
        .await
        .expect("query");
    assert!(negative.is_empty());
}

pub async fn rewriting_a_message_is_idempotent(open: &Open, dir: &Path) {
    let store = open(dir);
    for _ in 0..3 {
        write_points(
            store.as_ref(),
            vec![point("t", "d", "temp", 5, 1.5, "same")],
        )
        .await;
        store
            .write(WriteBatch {
                points: vec![],
                events: vec![event("d", 5, "same-event", b"x")],
            })
            .await
            .expect("write");
    }
    write_points(
        store.as_ref(),
        vec![point("t", "d", "temp", 5, 1.5, "other")],
    )
    .await;
    let all = range("t", "d", i64::MIN, i64::MAX);
    assert_eq!(store.points(&all, "temp").await.expect("query").len(), 2);
    assert_eq!(store.events(&all, None).await.expect("query").len(), 1);
}

/// The rollups of `points` computed from scratch, per resolution and bucket start.
pub fn expected_rollups(points: &[Point], resolution: Resolution) -> Vec<Rollup> {
    let mut buckets: std::collections::BTreeMap<i64, Rollup> = Default::default();
    for p in points {
        let start = resolution.bucket_start(p.ts_ms);
        let one = Rollup::of(start, p.value);
        buckets
            .entry(start)
            .and_modify(|r| r.merge(&one))
            .or_insert(one);
    }
    buckets.into_values().collect()
}

/// Compares rollups allowing for the rounding of sums added in another order.
pub fn assert_rollups_eq(actual: &[Rollup], expected: &[Rollup]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert_eq!(
            (a.start_ms, a.count, a.min, a.max),
            (e.start_ms, e.count, e.min, e.max)
        );
        assert!(
            (a.sum - e.sum).abs() <= 1e-9 * e.sum.abs().max(1.0),
            "sum {} vs {}",
            a.sum,
            e.sum
        );
    }
}

pub async fn rollups_add_merged_deltas(open: &Open, dir: &Path) {
    let store = open(dir);
    const MIN: i64 = 60_000;
    let points = vec![
        point("t", "d", "temp", 10, 1.0, "a"),
        point("t", "d", "temp", 20, 3.0, "b"),
        point("t", "d", "temp", MIN + 5, 10.0, "c"),
        point("t", "d", "temp", 61 * MIN, -4.0, "d"),
        point("t", "d", "temp", -5, 7.0, "e"),
    ];
    write_points(store.as_ref(), points.clone()).await;
    let all = range("t", "d", i64::MIN / 2, i64::MAX);
    assert!(
        store
            .rollups(&all, "temp", Resolution::Minute)
            .await
            .expect("rollups")
            .is_empty(),
        "writing points leaves rollups to merges"
    );
    merge_points(store.as_ref(), &points[..3]).await;
    // Later merges add to the stored buckets, also under another handle after reopening; a
    // late point and a point before the epoch land in their own buckets.
    drop(store);
    let store = open(dir);
    merge_points(store.as_ref(), &points[3..]).await;
    merge_points(
        store.as_ref(),
        &[point("t", "other", "temp", 15, 99.0, "x")],
    )
    .await;

    for resolution in Resolution::ALL {
        let actual = store
            .rollups(&all, "temp", resolution)
            .await
            .expect("rollups");
        assert_rollups_eq(&actual, &expected_rollups(&points, resolution));
    }
    let minutes = store
        .rollups(&all, "temp", Resolution::Minute)
        .await
        .expect("rollups");
    assert_eq!(minutes[1].start_ms, 0);
    assert_eq!((minutes[1].count, minutes[1].sum), (2, 4.0));
    assert_eq!(minutes[1].mean(), 2.0);

    // A range starting inside a bucket includes that bucket; the end is exclusive.
    let inside = store
        .rollups(
            &range("t", "d", MIN + 30_000, 61 * MIN),
            "temp",
            Resolution::Minute,
        )
        .await
        .expect("rollups");
    assert_eq!(
        inside.iter().map(|r| r.start_ms).collect::<Vec<_>>(),
        vec![MIN]
    );
    let hours = store
        .rollups(&range("t", "d", 0, i64::MAX), "temp", Resolution::Hour)
        .await
        .expect("rollups");
    assert_eq!(
        hours
            .iter()
            .map(|r| (r.start_ms, r.count))
            .collect::<Vec<_>>(),
        vec![(0, 3), (60 * MIN, 1)]
    );
}

pub async fn a_rollup_merge_under_a_stale_checkpoint_writes_nothing(open: &Open, dir: &Path) {
    let store = open(dir);
    let points = [point("t", "d", "temp", 10, 1.0, "a")];
    merge_points(store.as_ref(), &points).await;
    let mut deltas = RollupDeltas::default();
    deltas
        .add_point(&point("t", "d", "temp", 20, 5.0, "b"))
        .expect("valid");
    for stale in [None, Some(Bytes::from_static(b"0"))] {
        let swap = RecordSwap {
            kind: CHECKPOINT.into(),
            key: "test/0".into(),
            expected: stale,
            new: Bytes::from_static(b"taken"),
        };
        let merged = store
            .merge_rollups(deltas.clone().into_deltas(), swap)
            .await
            .expect("merge");
        assert!(!merged, "another consumer saved the checkpoint since");
    }
    assert_eq!(
        store.get_record(CHECKPOINT, "test/0").await.expect("get"),
        Some(Bytes::from_static(b"1"))
    );
    let all = range("t", "d", i64::MIN / 2, i64::MAX);
    for resolution in Resolution::ALL {
        let actual = store
            .rollups(&all, "temp", resolution)
            .await
            .expect("rollups");
        assert_rollups_eq(&actual, &expected_rollups(&points, resolution));
    }
    let bad = RecordSwap {
        kind: CHECKPOINT.into(),
        key: "test/0".into(),
        expected: Some(Bytes::from_static(b"1")),
        new: Bytes::from_static(b"2"),
    };
    let bad_delta = RollupDelta {
        tenant: "t".into(),
        device: String::new(),
        metric: "temp".into(),
        resolution: Resolution::Minute,
        rollup: Rollup::of(0, 5.0),
    };
    assert!(
        matches!(
            store.merge_rollups(vec![bad_delta], bad).await,
            Err(StoreError::Invalid { .. })
        ),
        "an empty device is refused"
    );
}

pub async fn retention_deletes_only_what_is_older(open: &Open, dir: &Path) {
    let store = open(dir);
    const DAY: i64 = 86_400_000;
    write_points(
        store.as_ref(),
        vec![
            point("t", "d", "temp", DAY, 1.0, "old"),
            point("t", "d", "temp", 3 * DAY, 2.0, "new"),
            point("t", "e", "hum", DAY + 5, 3.0, "old-e"),
            point("other", "d", "temp", DAY, 4.0, "other"),
        ],
    )
    .await;
    merge_points(
        store.as_ref(),
        &[
            point("t", "d", "temp", DAY, 1.0, "old"),
            point("t", "d", "temp", 3 * DAY, 2.0, "new"),
            point("t", "e", "hum", DAY + 5, 3.0, "old-e"),
        ],
    )
    .await;
    let deleted = store
        .delete_before("t", None, 2 * DAY)
        .await
        .expect("delete");
    assert_eq!(deleted, 2, "one old point of each of t's series");
    let all = |tenant: &str, device: &str| range(tenant, device, i64::MIN / 2, i64::MAX);
    let left = store.points(&all("t", "d"), "temp").await.expect("points");
    assert_eq!(
        left.iter().map(|p| p.ts_ms).collect::<Vec<_>>(),
        vec![3 * DAY]
    );
    assert!(
        store
            .points(&all("t", "e"), "hum")
            .await
            .expect("points")
            .is_empty()
    );
    assert_eq!(
        store
            .points(&all("other", "d"), "temp")
            .await
            .expect("points")
            .len(),
        1,
        "another tenant's data stays"
    );
    // Rollups are kept per resolution: raw retention left the day buckets alone.
    let days = store
        .rollups(&all("t", "d"), "temp", Resolution::Day)
        .await
        .expect("rollups");
    assert_eq!(days.len(), 2);
    let deleted = store
        .delete_before("t", Some(Resolution::Day), 2 * DAY)
        .await
        .expect("delete");
    assert_eq!(deleted, 2, "t/d's and t/e's first day");
    let days = store
        .rollups(&all("t", "d"), "temp", Resolution::Day)
        .await
        .expect("rollups");
    assert_eq!(
        days.iter().map(|r| r.start_ms).collect::<Vec<_>>(),
        vec![3 * DAY]
    );
    assert_eq!(
        store
            .rollups(&all("t", "d"), "temp", Resolution::Hour)
            .await
            .expect("rollups")
            .len(),
        2
    );
    assert_eq!(
        store.latest("t", "e").await.expect("latest").len(),
        1,
        "latest values stay"
    );
}

pub async fn rollups_can_be_rebuilt_from_raw_points(open: &Open, dir: &Path) {
    let store = open(dir);
    const DAY: i64 = 86_400_000;
    let points = vec![
        point("t", "d", "kwh", DAY + 10, 2.0, "a"),
        point("t", "d", "kwh", DAY + 70_000, 4.0, "b"),
        point("t", "d", "kwh", 3 * DAY, 8.0, "c"),
        point("t", "e", "temp", 5, 1.0, "x"),
    ];
    write_points(store.as_ref(), points.clone()).await;
    // Some buckets as if from an earlier state of the data; the rebuild replaces them.
    merge_points(store.as_ref(), &points[..1]).await;
    merge_points(store.as_ref(), &points[..1]).await;
    let mut series = store.series("t").await.expect("series");
    series.sort();
    assert_eq!(
        series,
        vec![
            ("d".to_string(), "kwh".to_string()),
            ("e".to_string(), "temp".to_string())
        ]
    );
    let read = store
        .rebuild_rollups("t", "d", "kwh", DAY, 3 * DAY + 1)
        .await
        .expect("rebuild");
    assert_eq!(read, 3, "whole days around the range");
    let all = range("t", "d", i64::MIN / 2, i64::MAX);
    let d_points: Vec<Point> = points[..3].to_vec();
    for resolution in Resolution::ALL {
        let actual = store
            .rollups(&all, "kwh", resolution)
            .await
            .expect("rollups");
        assert_rollups_eq(&actual, &expected_rollups(&d_points, resolution));
    }
    // Later merges keep adding to the rebuilt buckets.
    merge_points(
        store.as_ref(),
        &[point("t", "d", "kwh", DAY + 20, 1.0, "late")],
    )
    .await;
    let minutes = store
        .rollups(&all, "kwh", Resolution::Minute)
        .await
        .expect("rollups");
    assert_eq!((minutes[0].count, minutes[0].sum), (2, 3.0));
}

pub async fn latest_values_only_move_forward(open: &Open, dir: &Path) {
    let store = open(dir);
    write_points(
        store.as_ref(),
        vec![
            point("t", "d", "temp", 200, 2.0, "a"),
            point("t", "d", "hum", 100, 40.0, "b"),
        ],
    )
    .await;
    // An older, late-arriving sample must not replace the latest value.
    write_points(store.as_ref(), vec![point("t", "d", "temp", 150, 1.0, "c")]).await;
    write_points(store.as_ref(), vec![point("t", "d", "hum", 300, 45.0, "d")]).await;
    let mut latest = store.latest("t", "d").await.expect("latest");
    latest.sort_by(|a, b| a.metric.cmp(&b.metric));
    assert_eq!(latest.len(), 2);
    assert_eq!(
        (latest[0].metric.as_str(), latest[0].ts_ms, latest[0].value),
        ("hum", 300, 45.0)
    );
    assert_eq!(
        (latest[1].metric.as_str(), latest[1].ts_ms, latest[1].value),
        ("temp", 200, 2.0)
    );
    assert!(store.latest("t", "other").await.expect("latest").is_empty());
}

pub async fn tenants_and_devices_do_not_bleed(open: &Open, dir: &Path) {
    let store = open(dir);
    write_points(
        store.as_ref(),
        vec![
            point("t1", "d", "m", 1, 1.0, "a"),
            point("t10", "d", "m", 1, 10.0, "b"),
            point("t1", "d1", "m", 1, 11.0, "c"),
        ],
    )
    .await;
    let got = store
        .points(&range("t1", "d", i64::MIN, i64::MAX), "m")
        .await
        .expect("query");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, 1.0);
    assert_eq!(store.latest("t1", "d").await.expect("latest").len(), 1);
}

pub async fn events_round_trip(open: &Open, dir: &Path) {
    let store = open(dir);
    store
        .write(WriteBatch {
            points: vec![],
            events: vec![
                event("d", 10, "e1", b"\x00\xffbinary"),
                event("d", 20, "e2", b"two"),
            ],
        })
        .await
        .expect("write");
    let got = store
        .events(&range("t", "d", 0, 15), None)
        .await
        .expect("query");
    assert_eq!(got, vec![event("d", 10, "e1", b"\x00\xffbinary")]);
}

pub async fn events_filter_by_kind_before_the_limit(open: &Open, dir: &Path) {
    let store = open(dir);
    let lifecycle = |ts, id| RawEvent {
        kind: "lifecycle".into(),
        ..event("d", ts, id, b"{}")
    };
    store
        .write(WriteBatch {
            points: vec![],
            events: vec![
                lifecycle(1, "l1"),
                event("d", 2, "e1", b"x"),
                lifecycle(3, "l2"),
                event("d", 4, "e2", b"y"),
            ],
        })
        .await
        .expect("write");
    let query = RangeQuery {
        limit: 1,
        ..range("t", "d", 0, 10)
    };
    let got = store.events(&query, Some("event")).await.expect("query");
    assert_eq!(got, vec![event("d", 2, "e1", b"x")]);
    let ids = |events: Vec<RawEvent>| events.into_iter().map(|e| e.message_id).collect::<Vec<_>>();
    let all = store
        .events(&range("t", "d", 0, 10), Some("lifecycle"))
        .await
        .expect("query");
    assert_eq!(ids(all), ["l1", "l2"]);
}

pub async fn data_survives_reopen(open: &Open, dir: &Path) {
    {
        let store = open(dir);
        write_points(store.as_ref(), vec![point("t", "d", "temp", 1, 1.0, "a")]).await;
        store
            .put_record("device", "t/d", Bytes::from_static(b"{}"))
            .await
            .expect("put");
    }
    let store = open(dir);
    let all = range("t", "d", i64::MIN, i64::MAX);
    assert_eq!(store.points(&all, "temp").await.expect("query").len(), 1);
    assert_eq!(store.latest("t", "d").await.expect("latest").len(), 1);
    assert!(
        store
            .get_record("device", "t/d")
            .await
            .expect("get")
            .is_some()
    );
}

/// Of many concurrent swaps from the same state, exactly one wins; a stale expectation loses.
pub async fn compare_and_swap_lets_exactly_one_win(open: &Open, dir: &Path) {
    let store = open(dir);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let won = store
                    .compare_and_swap("code", "k", None, Some(Bytes::from(format!("{i}"))))
                    .await
                    .expect("swap");
                (i, won)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, won) = task.await.expect("task");
        if won {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one swap from absent wins");
    let winner = Bytes::from(format!("{}", winners[0]));
    assert_eq!(
        store.get_record("code", "k").await.expect("get"),
        Some(winner.clone())
    );
    let stale = Bytes::from_static(b"not what is there");
    assert!(
        !store
            .compare_and_swap("code", "k", Some(stale), None)
            .await
            .expect("swap")
    );
    assert!(
        store
            .compare_and_swap("code", "k", Some(winner), Some(Bytes::from_static(b"used")))
            .await
            .expect("swap")
    );
    assert!(
        store
            .compare_and_swap("code", "k", Some(Bytes::from_static(b"used")), None)
            .await
            .expect("swap")
    );
    assert_eq!(
        store.get_record("code", "k").await.expect("get"),
        None,
        "None deletes"
    );
}

pub async fn records_crud_and_paged_listing(open: &Open, dir: &Path) {
    let store = open(dir);
    for key in ["a/1", "a/2", "a/3", "ab/1", "b/1"] {
        store
            .put_record("device", key, Bytes::from(key.to_string()))
            .await
            .expect("put");
    }
    store
        .put_record("tenant", "a/9", Bytes::new())
        .await
        .expect("put");
    assert_eq!(
        store.get_record("device", "a/2").await.expect("get"),
        Some(Bytes::from_static(b"a/2"))
    );
    let keys = |v: Vec<(String, Bytes)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let page1 = store
        .list_records("device", "a/", None, 2)
        .await
        .expect("list");
    assert_eq!(keys(page1), vec!["a/1", "a/2"]);
    let page2 = store
        .list_records("device", "a/", Some("a/2"), 2)
        .await
        .expect("list");
    assert_eq!(
        keys(page2),
        vec!["a/3"],
        "prefix `a/` excludes `ab/` and other kinds"
    );
    assert!(store.delete_record("device", "a/2").await.expect("delete"));
    assert!(!store.delete_record("device", "a/2").await.expect("delete"));
    assert_eq!(store.get_record("device", "a/2").await.expect("get"), None);
    store
        .put_record("device", "a/1", Bytes::from_static(b"new"))
        .await
        .expect("put");
    assert_eq!(
        store.get_record("device", "a/1").await.expect("get"),
        Some(Bytes::from_static(b"new"))
    );
    store
        .put_records(
            "queue",
            vec![
                ("q/2".to_string(), Bytes::from_static(b"two")),
                ("q/1".to_string(), Bytes::from_static(b"one")),
            ],
        )
        .await
        .expect("put many");
    let queued = store
        .list_records("queue", "q/", None, 10)
        .await
        .expect("list");
    assert_eq!(
        queued,
        vec![
            ("q/1".to_string(), Bytes::from_static(b"one")),
            ("q/2".to_string(), Bytes::from_static(b"two")),
        ]
    );
    assert!(
        store
            .put_records("queue", vec![("bad\0key".to_string(), Bytes::new())])
            .await
            .is_err(),
        "a batch with an invalid key is refused"
    );
    // Puts and deletes of several kinds in one write; a bad key refuses all of them.
    let refused = store
        .write_records(vec![
            RecordWrite::delete("queue", "q/1"),
            RecordWrite::put("queue", "bad\0key", Bytes::new()),
        ])
        .await;
    assert!(refused.is_err(), "a write with an invalid key is refused");
    assert!(
        store
            .get_record("queue", "q/1")
            .await
            .expect("get")
            .is_some(),
        "nothing of a refused write is applied"
    );
    store
        .write_records(vec![
            RecordWrite::delete("queue", "q/1"),
            RecordWrite::put("queue", "q/3", Bytes::from_static(b"three")),
            RecordWrite::put("index", "q/3", Bytes::from_static(b"q/3")),
        ])
        .await
        .expect("write records");
    assert_eq!(
        keys(
            store
                .list_records("queue", "q/", None, 10)
                .await
                .expect("list")
        ),
        vec!["q/2", "q/3"]
    );
    assert_eq!(
        store.get_record("index", "q/3").await.expect("get"),
        Some(Bytes::from_static(b"q/3"))
    );
}

pub async fn invalid_keys_are_refused(open: &Open, dir: &Path) {
    let store = open(dir);
    let err = store
        .write(WriteBatch {
            points: vec![point("t", "d", "bad\0metric", 1, 1.0, "a")],
            events: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Invalid {
                field: "metric",
                ..
            }
        ),
        "{err}"
    );
    let err = store
        .write(WriteBatch {
            points: vec![point("t", "d", "m", 1, f64::NAN, "a")],
            events: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid { field: "value", .. }),
        "{err}"
    );
    assert!(
        store
            .points(&range("t", "d", 0, 1), "m")
            .await
            .expect("query")
            .is_empty()
    );
}

/// Expands to one `#[tokio::test]` per conformance check, for `fn open(&Path) -> Arc<dyn Store>`.
#[macro_export]
macro_rules! store_conformance_tests {
    ($open:ident) => {
        mod store_conformance {
            $crate::store_conformance_tests!(@tests $open;
                range_queries_respect_bounds_order_and_limit,
                rewriting_a_message_is_idempotent,
                rollups_add_merged_deltas,
                a_rollup_merge_under_a_stale_checkpoint_writes_nothing,
                retention_deletes_only_what_is_older,
                rollups_can_be_rebuilt_from_raw_points,
                latest_values_only_move_forward,
                tenants_and_devices_do_not_bleed,
                events_round_trip,
                events_filter_by_kind_before_the_limit,
                data_survives_reopen,
                records_crud_and_paged_listing,
                compare_and_swap_lets_exactly_one_win,
                invalid_keys_are_refused,
            );
        }
    };
    (@tests $open:ident; $($check:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let dir = tempfile::tempdir().expect("tempdir");
                $crate::conformance::$check(&super::$open, dir.path()).await;
            }
        )*
    };
}
