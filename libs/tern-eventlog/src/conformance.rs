//! The conformance suite every [`EventLog`] implementation must pass.
//!
//! Each check takes an `open` function that opens (or reopens) the log stored under a directory
//! (backends without local files may use the directory name as a namespace), and a fresh
//! directory. [`eventlog_conformance_tests!`](crate::eventlog_conformance_tests) turns the suite
//! into one `#[tokio::test]` per check.

// Test support: a failed expectation is the point of a panic here.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{EventLog, LogError, Record};

/// Opens the log under a directory; calling it again after the previous instance was dropped
/// must see the same data.
pub type Open = dyn Fn(&Path) -> Arc<dyn EventLog>;

const WAIT: Duration = Duration::from_millis(200);

fn record(topic: &str, key: &str, value: impl Into<Bytes>) -> Record {
    Record::new(topic, Bytes::copy_from_slice(key.as_bytes()), value)
}

async fn drain(log: &dyn EventLog, group: &str, topic: &str) -> Vec<(String, String)> {
    let mut consumer = log.consumer(group, topic).await.expect("consumer");
    let mut out = Vec::new();
    loop {
        let batch = consumer.poll(100, WAIT).await.expect("poll");
        if batch.is_empty() {
            return out;
        }
        for r in batch {
            out.push((
                String::from_utf8_lossy(&r.key).into_owned(),
                String::from_utf8_lossy(&r.value).into_owned(),
            ));
        }
    }
}

pub async fn appended_records_are_consumed(open: &Open, dir: &Path) {
    let log = open(dir);
    let positions = log
        .append(vec![
            record("telemetry", "a", "1"),
            record("telemetry", "b", "2"),
            record("telemetry", "a", "3"),
        ])
        .await
        .expect("append");
    assert_eq!(positions.len(), 3);
    assert_eq!(
        positions[0].partition, positions[2].partition,
        "same key, same partition"
    );
    assert!(positions[0].offset < positions[2].offset);
    let mut got = drain(log.as_ref(), "g", "telemetry").await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("a".into(), "1".into()),
            ("a".into(), "3".into()),
            ("b".into(), "2".into())
        ]
    );
}

pub async fn order_is_kept_per_key(open: &Open, dir: &Path) {
    let log = open(dir);
    // Concurrent producers, each owning some keys; every key's values must come out in order.
    let mut tasks = Vec::new();
    for producer in 0..4 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let batch = (0..3)
                    .map(|k| record("t", &format!("p{producer}-k{k}"), format!("{i}")))
                    .collect();
                log.append(batch).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    for (key, value) in drain(log.as_ref(), "g", "t").await {
        per_key
            .entry(key)
            .or_default()
            .push(value.parse().expect("number"));
    }
    assert_eq!(per_key.len(), 12);
    for (key, values) in per_key {
        assert_eq!(values, (0..50).collect::<Vec<_>>(), "order of {key}");
    }
}

pub async fn appends_survive_reopen(open: &Open, dir: &Path) {
    {
        let log = open(dir);
        log.append(vec![record("t", "k", "before")])
            .await
            .expect("append");
    }
    let log = open(dir);
    log.append(vec![record("t", "k", "after")])
        .await
        .expect("append");
    assert_eq!(
        drain(log.as_ref(), "g", "t").await,
        vec![("k".into(), "before".into()), ("k".into(), "after".into())],
        "offsets continue after reopen and nothing is lost"
    );
}

pub async fn groups_resume_from_committed_offsets(open: &Open, dir: &Path) {
    {
        let log = open(dir);
        let batch = (0..5).map(|i| record("t", "k", format!("{i}"))).collect();
        log.append(batch).await.expect("append");
        let mut consumer = log.consumer("g", "t").await.expect("consumer");
        let first = consumer.poll(2, WAIT).await.expect("poll");
        assert_eq!(first.len(), 2);
        consumer.commit(&[first[1].position]).await.expect("commit");
        // Read but not committed: must be delivered again.
        let uncommitted = consumer.poll(1, WAIT).await.expect("poll");
        assert_eq!(uncommitted.len(), 1);
        assert_eq!(consumer.lag().await.expect("lag"), 3);
    }
    let log = open(dir);
    let resumed: Vec<String> = drain(log.as_ref(), "g", "t")
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(resumed, vec!["2", "3", "4"]);
    let other_group = drain(log.as_ref(), "other", "t").await;
    assert_eq!(
        other_group.len(),
        5,
        "another group starts from the beginning"
    );
}

pub async fn a_consumer_reads_only_its_assignment(open: &Open, dir: &Path) {
    let log = open(dir);
    let batch = (0..20)
        .map(|i| record("t", &format!("k{i}"), "v"))
        .collect();
    log.append(batch).await.expect("append");
    let mut consumer = log.consumer("g", "t").await.expect("consumer");
    let mut read = 0;
    while read < 20 {
        let batch = consumer.poll(100, WAIT).await.expect("poll");
        assert!(!batch.is_empty(), "only {read} of 20 records read");
        let assignment = consumer.assignment();
        for r in &batch {
            assert!(
                assignment.partitions.contains(&r.position.partition),
                "{:?} read outside {assignment:?}",
                r.position
            );
        }
        read += batch.len();
    }
}

pub async fn poll_wakes_up_on_append(open: &Open, dir: &Path) {
    let log = open(dir);
    let mut consumer = log.consumer("g", "t").await.expect("consumer");
    let producer = {
        let log = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            log.append(vec![record("t", "k", "late")])
                .await
                .expect("append");
        })
    };
    let batch = consumer
        .poll(10, Duration::from_secs(10))
        .await
        .expect("poll");
    producer.await.expect("producer");
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].value, Bytes::from_static(b"late"));
}

pub async fn topics_are_separate(open: &Open, dir: &Path) {
    let log = open(dir);
    log.append(vec![
        record("telemetry", "k", "t"),
        record("event", "k", "e"),
    ])
    .await
    .expect("append");
    assert_eq!(
        drain(log.as_ref(), "g", "telemetry").await,
        vec![("k".into(), "t".into())]
    );
    assert_eq!(
        drain(log.as_ref(), "g", "event").await,
        vec![("k".into(), "e".into())]
    );
}

pub async fn bad_names_are_refused(open: &Open, dir: &Path) {
    let log = open(dir);
    let err = log
        .append(vec![record("Bad Topic", "k", "v")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, LogError::Invalid { field: "topic", .. }),
        "{err}"
    );
    assert!(log.consumer("", "t").await.is_err());
}

/// Expands to one `#[tokio::test]` per conformance check, for an `open` function in scope:
/// `fn open(dir: &Path) -> Arc<dyn EventLog>`. A backend that needs a server passes
/// `fixture = f` instead, with `fn f() -> (Guard, Box<Open>)`: each test gets its own server,
/// kept until the guard drops.
#[macro_export]
macro_rules! eventlog_conformance_tests {
    ($open:ident) => {
        $crate::eventlog_conformance_tests!(@suite (|| ((), Box::new(super::$open) as Box<$crate::conformance::Open>)));
    };
    (fixture = $fixture:ident) => {
        $crate::eventlog_conformance_tests!(@suite super::$fixture);
    };
    (@suite $fixture:expr) => {
        mod eventlog_conformance {
            $crate::eventlog_conformance_tests!(@tests $fixture;
                appended_records_are_consumed,
                order_is_kept_per_key,
                appends_survive_reopen,
                groups_resume_from_committed_offsets,
                a_consumer_reads_only_its_assignment,
                poll_wakes_up_on_append,
                topics_are_separate,
                bad_names_are_refused,
            );
        }
    };
    (@tests $fixture:expr; $($check:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (_server, open) = ($fixture)();
                let dir = tempfile::tempdir().expect("tempdir");
                $crate::conformance::$check(&*open, dir.path()).await;
            }
        )*
    };
}
