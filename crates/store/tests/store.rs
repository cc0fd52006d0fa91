//! The store against a real SQLite file: group commit isolation, shadow merging, reopening.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ioda_store::{AccessKey, Durability, Project, ReportRecord, Store, StoreError};
use ioda_types::event::ReportedService;
use ioda_types::{Device, DeviceAuth, DeviceStatus};
use serde_json::json;

fn device(id: &str, node: &str) -> Device {
    Device {
        seq: 0,
        project_id: "p".into(),
        app_id: "a".into(),
        device_id: id.into(),
        node_id: node.into(),
        product_id: "prod".into(),
        gateway_id: id.into(),
        device_name: None,
        description: None,
        auth: DeviceAuth {
            auth_type: "SECRET".into(),
            secret: Some("secret123".into()),
            secondary_secret: None,
            fingerprint: None,
            secondary_fingerprint: None,
            secure_access: false,
            timeout: 0,
        },
        extension_info: None,
        status: DeviceStatus::Inactive,
        frozen: false,
        fw_version: None,
        sw_version: None,
        sdk_version: None,
        created_at: 1,
        first_online_at: None,
        last_online_at: None,
        last_offline_at: None,
        status_updated_at: None,
    }
}

fn forward(request_id: &str) -> ioda_store::NewForward {
    ioda_store::NewForward {
        action_id: "a1".into(),
        message_id: "m1".into(),
        payload: "{}".into(),
        device_id: Some("d1".into()),
        request_id: Some(request_id.into()),
    }
}

async fn open(dir: &std::path::Path) -> Store {
    Store::open(&dir.join("t.db"), Durability::Normal).unwrap()
}

/// A store holding device `d1`.
async fn open_with_d1(dir: &std::path::Path) -> Store {
    let store = open(dir).await;
    store
        .insert_device(device("d1", "n1"), vec![])
        .await
        .unwrap();
    store
}

#[tokio::test]
async fn a_failing_job_does_not_sink_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let project = Project {
        project_id: "p".into(),
        name: "n".into(),
        default_app_id: "a".into(),
        default_app_name: "A".into(),
        created_at: 0,
    };
    store
        .create_project(
            project,
            AccessKey {
                access_key: "AK".into(),
                secret_key: "SK".into(),
                project_id: "p".into(),
            },
        )
        .await
        .unwrap();
    // Submitted together, these land in one transaction; the duplicate must fail alone.
    let (a, b, c) = tokio::join!(
        store.insert_device(device("d1", "n1"), vec![]),
        store.insert_device(device("d1", "n2"), vec![]),
        store.insert_device(device("d2", "n3"), vec![]),
    );
    assert!(a.is_ok() && c.is_ok());
    assert!(matches!(b, Err(StoreError::Conflict(_))), "{b:?}");
    assert!(
        store
            .device("d1".into())
            .await
            .unwrap()
            .is_some_and(|d| d.node_id == "n1")
    );
    assert!(store.device("d2".into()).await.unwrap().is_some());
    store.close().await;
}

#[tokio::test]
async fn reports_merge_into_the_shadow_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let report = |props: serde_json::Value, t: i64| ReportRecord {
        device_id: "d1".into(),
        request_id: format!("r{t}"),
        received_at: t,
        services: vec![ReportedService::new(
            "S".into(),
            props.as_object().unwrap().clone(),
            t,
        )],
    };
    let (handed, handed_over) = std::sync::mpsc::channel();
    let hand = move |tag: &'static str| -> Option<ioda_store::AfterCommit> {
        let handed = handed.clone();
        Some(Box::new(move |row: i64| handed.send((tag, row)).unwrap()))
    };
    let first = store
        .submit_report(
            report(json!({"a": 1, "b": 2}), 10),
            vec![],
            vec![forward("r10")],
            hand("r10"),
        )
        .await
        .unwrap();
    let second = store
        .submit_report(report(json!({"b": 3}), 20), vec![], vec![], hand("r20"))
        .await
        .unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    // Each report was handed over after its commit, in commit order, with its history row.
    let rows: Vec<(&str, i64)> = handed_over.try_iter().collect();
    assert_eq!(rows, vec![("r10", 1), ("r20", 2)]);
    assert_eq!(store.history_committed(), 2);
    let logged = store.logged_after(1, 10).await.unwrap();
    assert_eq!(
        logged
            .iter()
            .map(|l| (l.id, l.request_id.as_str(), l.properties.as_str()))
            .collect::<Vec<_>>(),
        vec![(2, "r20", r#"{"b":3}"#)]
    );
    store.close().await;

    let store = open(dir.path()).await;
    let shadow = store.shadow("d1".into()).await.unwrap();
    assert_eq!(shadow.len(), 1);
    assert_eq!(
        serde_json::Value::Object(shadow[0].reported.clone().unwrap()),
        json!({"a": 1, "b": 3})
    );
    assert_eq!((shadow[0].version, shadow[0].reported_at), (2, Some(20)));
    let history = store.property_history("d1".into(), 10).await.unwrap();
    // The forwarding staged with the first report was committed with it.
    let queued = store
        .queue_after("a1".into(), i64::MIN, 1)
        .await
        .unwrap()
        .pop()
        .expect("queued with the report");
    assert_eq!(
        (queued.request_id.as_deref(), queued.payload.as_str()),
        (Some("r10"), "{}")
    );
    assert_eq!(
        history
            .iter()
            .map(|h| h.request_id.as_str())
            .collect::<Vec<_>>(),
        vec!["r20", "r10"]
    );
    // Numbering goes on after a restart.
    assert_eq!(store.history_committed(), 2);
    store
        .submit_report(report(json!({"c": 4}), 30), vec![], vec![], hand("r30"))
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(handed_over.try_iter().collect::<Vec<_>>(), vec![("r30", 3)]);
    store.close().await;
}

#[tokio::test]
async fn a_reported_state_stored_as_text_by_an_older_version_merges_and_reads_alike() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    submit_and_wait(&store, json!({"a": 1, "s": "x\"y", "n": 1.50}), 10).await;
    store.close().await;
    // As versions before binary JSON left it: the reported state as text.
    let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    conn.execute(
        "UPDATE shadows SET reported = '{\"a\":1,\"old\":[1,{\"k\":null}],\"gone\":true}'",
        [],
    )
    .unwrap();
    drop(conn);
    let store = open(dir.path()).await;
    assert_eq!(
        reported(&store).await,
        json!({"a": 1, "old": [1, {"k": null}], "gone": true})
    );
    // A null in a report removes the key (JSON merge patch), as it did over text.
    submit_and_wait(&store, json!({"a": 2, "gone": null, "new": "é"}), 20).await;
    assert_eq!(
        reported(&store).await,
        json!({"a": 2, "old": [1, {"k": null}], "new": "é"})
    );
    store.close().await;
}

#[tokio::test]
async fn shadow_merges_a_crash_took_from_memory_are_replayed_from_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_d1(dir.path()).await;
    submit_and_wait(&store, json!({"a": 1, "b": {"x": 1}}), 10).await;
    submit_and_wait(&store, json!({"b": {"y": 2}}), 20).await;
    submit_and_wait(&store, json!({"a": null, "c": 3}), 30).await;
    let first_id = store.property_history("d1".into(), 10).await.unwrap()[2].id;
    store.close().await;
    // What a crash leaves when the last two reports' merges were still in memory: their history
    // rows stored, the shadow row and the mark from before them.
    let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    conn.execute(
        "UPDATE shadows SET reported = jsonb('{\"a\":1,\"b\":{\"x\":1}}'), reported_at = 10, \
         version = 1, last_history_id = ?1",
        [first_id],
    )
    .unwrap();
    conn.execute("UPDATE shadow_mark SET applied_through = 0", [])
        .unwrap();
    drop(conn);

    let store = open(dir.path()).await;
    let shadow = store.shadow("d1".into()).await.unwrap();
    assert_eq!(
        (
            serde_json::Value::Object(shadow[0].reported.clone().unwrap()),
            shadow[0].version,
            shadow[0].reported_at
        ),
        (json!({"b": {"x": 1, "y": 2}, "c": 3}), 3, Some(30)),
        "each report merged once, in order"
    );
    let history = store.property_history("d1".into(), 10).await.unwrap();
    assert_eq!(
        history.iter().map(|h| h.event_time).collect::<Vec<_>>(),
        vec![30, 20, 10],
        "the history is walked from the replayed shadow"
    );
    // Merges written behind the history reach the shadow without a read asking for them.
    submit_and_wait(&store, json!({"d": 4}), 40).await;
    // Written within about 100 ms; up to 5 s on a loaded machine.
    let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    let mut seen = (0, 0, -1);
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        seen = conn
            .query_row(
                "SELECT version, (SELECT applied_through FROM shadow_mark), last_history_id FROM shadows",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        if seen.0 == 4 && seen.1 == seen.2 {
            break;
        }
    }
    let (version, mark, last): (i64, i64, i64) = seen;
    assert_eq!((version, mark), (4, last));
    drop(conn);
    store.close().await;
}

#[tokio::test]
async fn history_ids_the_shadow_mark_covers_are_not_handed_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_d1(dir.path()).await;
    store
        .insert_device(device("d2", "n2"), vec![])
        .await
        .unwrap();
    submit_and_wait(&store, json!({"a": 1}), 10).await;
    submit_for(&store, "d2", json!({"b": 2}), 20).await;
    // The newest rows go with their device, after a flush moved the mark past them.
    store.delete_device("d2".into()).await.unwrap();
    store.close().await;

    let store = open(dir.path()).await;
    submit_and_wait(&store, json!({"a": 3}), 30).await;
    let ids: Vec<i64> = store
        .property_history("d1".into(), 10)
        .await
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(
        ids,
        vec![3, 1],
        "an id under the mark would be taken for applied"
    );
    store.close().await;
}

/// Stores a report of service `S` of device `d1` and waits for its commit.
async fn submit_and_wait(store: &Store, properties: serde_json::Value, t: i64) {
    submit_for(store, "d1", properties, t).await;
}

/// Stores a report of service `S` of `device` and waits for its commit.
async fn submit_for(store: &Store, device: &str, properties: serde_json::Value, t: i64) {
    let report = ReportRecord {
        device_id: device.into(),
        request_id: format!("r{t}"),
        received_at: t,
        services: vec![ReportedService::new(
            "S".into(),
            properties.as_object().unwrap().clone(),
            t,
        )],
    };
    let committed = store.submit_report(report, vec![], vec![], None).await;
    committed.unwrap().await.unwrap().unwrap();
}

/// The reported state of service `S` of device `d1`.
async fn reported(store: &Store) -> serde_json::Value {
    let shadow = store.shadow("d1".into()).await.unwrap();
    serde_json::Value::Object(shadow[0].reported.clone().unwrap())
}

#[tokio::test]
async fn trace_entries_are_readable_at_once_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let entry = |device: &str, i: i64| ioda_store::TraceEntry {
        id: 0,
        device_id: device.into(),
        at: i,
        kind: "k".into(),
        detail: json!({ "i": i }).into(),
    };
    let store = open(dir.path()).await;
    store
        .record_trace(vec![entry("d1", 1), entry("d2", 2), entry("d1", 3)])
        .await
        .unwrap();
    // Still waiting to be written out, yet visible, numbered in commit order.
    let before = store.trace("d1".into(), 10).await.unwrap();
    let seen = |entries: &[ioda_store::TraceEntry]| -> Vec<(i64, serde_json::Value)> {
        entries
            .iter()
            .map(|e| (e.id, e.detail.to_value()))
            .collect()
    };
    assert_eq!(
        seen(&before),
        vec![(3, json!({"i": 3})), (1, json!({"i": 1}))]
    );
    store.close().await;
    // Closing wrote them out; a reopened store reads the same entries and numbers on after them.
    let store = open(dir.path()).await;
    assert_eq!(
        seen(&store.trace("d1".into(), 10).await.unwrap()),
        seen(&before)
    );
    store.record_trace(vec![entry("d1", 4)]).await.unwrap();
    let after = store.trace("d1".into(), 2).await.unwrap();
    assert_eq!(
        seen(&after),
        vec![(4, json!({"i": 4})), (3, json!({"i": 3}))]
    );
    store.close().await;
}

#[tokio::test]
async fn a_store_dropped_without_closing_still_writes_its_waiting_trace() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store
        .record_trace(vec![trace_entry("d1", 1)])
        .await
        .unwrap();
    drop(store);
    // Its threads end by themselves (nothing keeps them waiting); the trace thread writes the
    // entry out as it goes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let written = trace_rows(dir.path(), "d1");
        // Each thread's last act is truncating its log: empty (or removed) logs mean both ended.
        let log = |name: &str| std::fs::metadata(dir.path().join(name)).map_or(0, |m| m.len());
        let (main_log, trace_log) = (log("t.db-wal"), log("t-trace.db-wal"));
        if written == 1 && main_log == 0 && trace_log == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "written {written}, logs {main_log} and {trace_log} bytes: the threads did not end"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn trace_entry(device: &str, i: i64) -> ioda_store::TraceEntry {
    ioda_store::TraceEntry {
        id: 0,
        device_id: device.into(),
        at: i,
        kind: "k".into(),
        detail: json!({ "i": i }).into(),
    }
}

/// Rows of a device in the trace file, read with a connection of its own.
fn trace_rows(dir: &std::path::Path, device: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("t-trace.db")).unwrap();
    conn.query_row(
        "SELECT COALESCE(SUM(entries), 0) FROM trace_blocks WHERE device_id = ?1",
        [device],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

#[tokio::test]
async fn a_deleted_devices_trace_goes_with_it_stored_or_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_d1(dir.path()).await;
    store
        .record_trace(vec![trace_entry("d1", 1), trace_entry("d2", 2)])
        .await
        .unwrap();
    // The trace thread writes waiting entries out within a quarter of a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while trace_rows(dir.path(), "d1") == 0 {
        assert!(std::time::Instant::now() < deadline, "never written out");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // One stored, one still waiting: the deletion takes both.
    store
        .record_trace(vec![trace_entry("d1", 3)])
        .await
        .unwrap();
    store.delete_device("d1".into()).await.unwrap();
    assert!(store.trace("d1".into(), 10).await.unwrap().is_empty());
    store.close().await;
    assert_eq!(trace_rows(dir.path(), "d1"), 0);
    assert_eq!(trace_rows(dir.path(), "d2"), 1, "other devices keep theirs");
}

#[tokio::test]
async fn trace_an_older_version_kept_in_the_main_database_moves_to_the_trace_file() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).await.close().await;
    // The layout of earlier versions: the trace in the main database.
    let main = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    main.execute_batch(
        "CREATE TABLE device_trace (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, at INTEGER NOT NULL, \
         kind TEXT NOT NULL, detail TEXT NOT NULL); \
         INSERT INTO device_trace VALUES (5, 'd1', 1, 'old', '{\"i\":5}'), (7, 'd1', 2, 'old', '{\"i\":7}');",
    )
    .unwrap();
    drop(main);
    let store = open(dir.path()).await;
    store
        .record_trace(vec![trace_entry("d1", 8)])
        .await
        .unwrap();
    let ids: Vec<(i64, serde_json::Value)> = store
        .trace("d1".into(), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.detail.to_value()))
        .collect();
    assert_eq!(
        ids,
        vec![
            (8, json!({"i": 8})),
            (7, json!({"i": 7})),
            (5, json!({"i": 5}))
        ],
        "moved over, and numbering goes on after them"
    );
    store.close().await;
    let main = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    let left: i64 = main
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'device_trace'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "the old table is gone from the main database");
}

#[tokio::test]
async fn trace_blocks_are_stored_compressed_and_a_damaged_one_hides_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store
        .record_trace(vec![trace_entry("d1", 1), trace_entry("d1", 2)])
        .await
        .unwrap();
    store.close().await;
    let file = rusqlite::Connection::open(dir.path().join("t-trace.db")).unwrap();
    let kind: String = file
        .query_row("SELECT typeof(body) FROM trace_blocks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kind, "blob", "written compressed");
    // Damaged blocks, newer than the good one: bad JSON text, a blob too short to hold its
    // length, one claiming 4 GiB, one whose bytes are not LZ4, one that is not text or a blob.
    let huge = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let garbage = [16, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff];
    let damaged: [(i64, rusqlite::types::Value); 5] = [
        (10, "[{not json".to_owned().into()),
        (11, vec![1u8, 2].into()),
        (12, huge.to_vec().into()),
        (13, garbage.to_vec().into()),
        (14, 42i64.into()),
    ];
    for (id, body) in damaged {
        file.execute(
            "INSERT INTO trace_blocks (id, device_id, entries, body) VALUES (?1, 'd1', 1, ?2)",
            rusqlite::params![id, body],
        )
        .unwrap();
    }
    drop(file);
    let store = open(dir.path()).await;
    let read = store.trace("d1".into(), 10).await.unwrap();
    let details: Vec<serde_json::Value> = read.iter().map(|e| e.detail.to_value()).collect();
    assert_eq!(details, vec![json!({"i": 2}), json!({"i": 1})]);
    store.close().await;
}

#[tokio::test]
async fn the_trace_stays_bounded_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for round in 0..20 {
        store
            .record_trace(
                (0..100)
                    .map(|i| trace_entry("d1", round * 100 + i))
                    .collect(),
            )
            .await
            .unwrap();
        // Let the trace thread write this round out, so the file holds several blocks.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while trace_rows(dir.path(), "d1") < ((round + 1) * 100).min(1000) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round} never written out"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    store.close().await;
    // Whole blocks go, a quarter of the kept entries at a time: between the 1 000 kept and 250
    // and a block more.
    let stored = trace_rows(dir.path(), "d1");
    assert!((1000..=1350).contains(&stored), "stored {stored}");
    let store = open(dir.path()).await;
    let kept = store.trace("d1".into(), 5000).await.unwrap();
    assert_eq!(kept.len(), 1000, "reads return at most the 1 000 kept");
    assert_eq!(
        kept[0].detail.to_value(),
        json!({ "i": 1999 }),
        "the newest first"
    );
    assert_eq!(kept[999].detail.to_value(), json!({ "i": 1000 }));
    store.close().await;
}

#[tokio::test]
async fn queued_messages_are_numbered_on_after_the_newest_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store
        .enqueue_forward(vec![forward("r1"), forward("r2")], vec![], 1)
        .await
        .unwrap();
    let first = store.queue_after("a1".into(), i64::MIN, 10).await.unwrap();
    let ids: Vec<i64> = first.iter().map(|m| m.id).collect();
    // Both delivered and removed: the table is empty again.
    store
        .submit_dequeue(ids.clone(), vec![])
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    store
        .enqueue_forward(vec![forward("r3")], vec![], 2)
        .await
        .unwrap();
    let after = store.queue_after("a1".into(), ids[1], 10).await.unwrap();
    assert_eq!(
        after
            .iter()
            .map(|m| m.request_id.as_deref())
            .collect::<Vec<_>>(),
        vec![Some("r3")],
        "a worker reading on after the last id it saw finds the new message"
    );
    store.close().await;
}

/// Reports of two devices with two services each, interleaved; returns the store.
async fn interleaved_history(dir: &std::path::Path) -> Store {
    let store = open(dir).await;
    let mut waits = Vec::new();
    for i in 1..=6i64 {
        for device_id in ["d1", "d2"] {
            let service = if i % 2 == 0 { "A" } else { "B" };
            let report = ReportRecord {
                device_id: device_id.into(),
                request_id: format!("{device_id}-{i}"),
                received_at: i,
                services: vec![ReportedService::new(
                    service.into(),
                    json!({ "i": i }).as_object().unwrap().clone(),
                    i,
                )],
            };
            waits.push(
                store
                    .submit_report(report, vec![], vec![], None)
                    .await
                    .unwrap(),
            );
        }
    }
    for wait in waits {
        wait.await.unwrap().unwrap();
    }
    store
}

fn request_ids(rows: &[ioda_store::HistoryRow]) -> Vec<&str> {
    rows.iter().map(|r| r.request_id.as_str()).collect()
}

#[tokio::test]
async fn a_devices_history_is_found_through_its_services_chains_and_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = interleaved_history(dir.path()).await;
    let newest = store.property_history("d1".into(), 4).await.unwrap();
    assert_eq!(request_ids(&newest), vec!["d1-6", "d1-5", "d1-4", "d1-3"]);
    let all = store.property_history("d2".into(), 100).await.unwrap();
    assert_eq!(
        request_ids(&all),
        vec!["d2-6", "d2-5", "d2-4", "d2-3", "d2-2", "d2-1"]
    );
    assert!(
        store
            .property_history("nobody".into(), 10)
            .await
            .unwrap()
            .is_empty()
    );

    store
        .insert_device(device("d1", "n1"), vec![])
        .await
        .unwrap();
    store.delete_device("d1".into()).await.unwrap();
    assert!(
        store
            .property_history("d1".into(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let left: Vec<String> = store
        .logged_after(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.request_id)
        .collect();
    assert_eq!(
        left,
        vec!["d2-1", "d2-2", "d2-3", "d2-4", "d2-5", "d2-6"],
        "only d1's rows went"
    );
    store.close().await;
}

#[tokio::test]
async fn history_stored_before_the_chains_is_chained_by_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    interleaved_history(dir.path()).await.close().await;
    // Back to the earlier schema: an index by device, no chain.
    let c = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    c.execute_batch(
        "CREATE INDEX property_history_by_device ON property_history(device_id, id); \
         ALTER TABLE property_history DROP COLUMN prev_id; \
         ALTER TABLE shadows DROP COLUMN last_history_id; DROP TABLE shadow_mark; \
         DROP TABLE device_tracing; DROP INDEX devices_by_gateway; \
         DROP TABLE child_deletions; PRAGMA user_version = 7;",
    )
    .unwrap();
    drop(c);
    let store = open(dir.path()).await;
    let all = store.property_history("d1".into(), 100).await.unwrap();
    assert_eq!(
        request_ids(&all),
        vec!["d1-6", "d1-5", "d1-4", "d1-3", "d1-2", "d1-1"]
    );
    store.close().await;
}

#[tokio::test]
async fn history_ids_are_not_handed_out_again_after_the_newest_rows_went() {
    let dir = tempfile::tempdir().unwrap();
    let store = interleaved_history(dir.path()).await;
    assert_eq!(store.history_committed(), 12);
    store
        .submit_cursor("a1".into(), 12, vec![])
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    // Both devices go, with every stored report.
    for id in ["d1", "d2"] {
        store.insert_device(device(id, id), vec![]).await.unwrap();
        store.delete_device(id.into()).await.unwrap();
    }
    assert!(store.logged_after(0, 100).await.unwrap().is_empty());
    store.close().await;
    let store = open(dir.path()).await;
    assert_eq!(
        store.history_committed(),
        12,
        "numbering goes on after the cursor"
    );
    store.close().await;
}

#[tokio::test]
async fn device_tracing_is_kept_until_it_ends_and_goes_with_its_device() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for id in ["d1", "d2", "d4"] {
        store.insert_device(device(id, id), vec![]).await.unwrap();
    }
    // (device, until: a start, or a stop)
    let changes: &[(&str, Option<i64>)] = &[
        ("d1", Some(100)),
        ("d2", Some(200)),
        ("d1", Some(300)),
        ("d3", None),
        ("d4", Some(400)),
        ("d4", None),
    ];
    for (device_id, until) in changes {
        store
            .set_device_tracing((*device_id).into(), *until)
            .await
            .unwrap();
    }
    let sorted = |mut rows: Vec<(String, i64)>| {
        rows.sort();
        rows
    };
    assert_eq!(
        sorted(store.traced_devices(150).await.unwrap()),
        vec![("d1".to_owned(), 300), ("d2".to_owned(), 200)]
    );
    assert_eq!(
        sorted(store.traced_devices(250).await.unwrap()),
        vec![("d1".to_owned(), 300)]
    );
    assert_eq!(
        store.traced_devices(0).await.unwrap(),
        vec![("d1".to_owned(), 300)],
        "an ended trace is removed, not only hidden"
    );
    store.delete_device("d1".into()).await.unwrap();
    assert!(
        matches!(
            store.set_device_tracing("d1".into(), Some(500)).await,
            Err(ioda_store::StoreError::NotFound)
        ),
        "a deleted device's trace cannot be started"
    );
    store.close().await;
    let store = open(dir.path()).await;
    assert!(store.traced_devices(0).await.unwrap().is_empty());
    store.close().await;
}

#[tokio::test]
async fn a_gateways_connection_finds_what_waits_for_its_children() {
    use ioda_types::MessageStatus;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut child = device("c1", "nc1");
    child.gateway_id = "gw".into();
    for device in [device("gw", "ngw"), child, device("other", "nother")] {
        store.insert_device(device, vec![]).await.unwrap();
    }
    for (i, device_id) in ["gw", "c1", "other"].into_iter().enumerate() {
        let message = ioda_store::DeviceMessage {
            seq: 0,
            message_id: format!("m{i}"),
            project_id: "p".into(),
            device_id: device_id.into(),
            name: None,
            message: serde_json::json!("x"),
            encoding: None,
            payload_format: "standard".into(),
            topic: None,
            properties: None,
            ttl_minutes: 60,
            status: MessageStatus::Pending,
            error: None,
            created_at: i as i64,
            finished_at: None,
        };
        let overflow = ("E".to_owned(), "full".to_owned());
        store.insert_message(message, 20, overflow).await.unwrap();
    }
    let ids = |messages: Vec<ioda_store::DeviceMessage>| -> Vec<String> {
        messages.into_iter().map(|m| m.device_id).collect()
    };
    let via_gateway = store.pending_messages_via("gw".into()).await.unwrap();
    assert_eq!(ids(via_gateway), ["gw", "c1"]);
    let direct = store.pending_messages_via("other".into()).await.unwrap();
    assert_eq!(ids(direct), ["other"]);
    // A child's own connection finds its own only.
    let child = store.pending_messages_via("c1".into()).await.unwrap();
    assert_eq!(ids(child), ["c1"]);
    store.close().await;
}
