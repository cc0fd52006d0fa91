//! Codecs end to end: set through the API (with the definition errors), the codec test tool over
//! the API and on the command line, and a binary MQTT device whose reports are decoded into its
//! shadow and whose commands are encoded into bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{Event, Packet, QoS};
use serde_json::{Value, json};

/// `ioda codec test --codec FILE ARGS…`, run as a user would.
fn codec_cli(codec: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ioda"))
        .args(["codec", "test", "--codec", codec])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[tokio::test]
async fn codecs_are_checked_kept_and_tested_through_the_api() {
    let server = server().await;
    let product = binary_product(&server, "MQTT").await;
    let path = format!("/products/{product}/codec");
    let missing = server.api.call("GET", &path, None).await.unwrap();
    assert_eq!(missing.status, 404, "{}", missing.body);

    let mut duplicate = smoke_codec();
    duplicate["messages"][1]["fields"][0]["default"] = json!("0x00");
    let refused = server
        .api
        .call("PUT", &path, Some(&duplicate))
        .await
        .unwrap();
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body["error_msg"]
            .as_str()
            .unwrap()
            .contains("have the same msgid 0x0"),
        "{}",
        refused.body
    );
    let not_json = server
        .api
        .call("PUT", &path, Some(&json!("text")))
        .await
        .unwrap();
    assert_eq!(not_json.status, 400, "{}", not_json.body);

    let codec = json!({"type": "declarative", "definition": smoke_codec()});
    let set = server.api.call("PUT", &path, Some(&codec)).await.unwrap();
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(server.get(&path).await["codec"], codec);

    let test = format!("{path}/test");
    let decoded = server.post(&test, json!({"decode": "00 01 01 3A"})).await;
    assert_eq!(decoded.status, 200, "{}", decoded.body);
    assert_eq!(
        decoded.body["decoded"]["services"][0]["properties"],
        json!({"level": 1, "temperature": 31.4})
    );
    assert_eq!(decoded.body["response"], "AAAA0000");
    let encoded = server
        .post(&test, json!({"encode": {"command_name": "SET_LABEL", "paras": {"label": "abc", "text": ""}, "mid": 1}}))
        .await;
    assert_eq!(encoded.body["hex"], "04000161626300", "{}", encoded.body);
    assert!(
        encoded.body["bits"]
            .as_str()
            .unwrap()
            .contains("011000010110001001100011")
    );
    for (request, reason) in [
        (json!({"decode": "zz"}), "not hexadecimal"),
        (json!({"decode": "0001"}), "needs 2 bytes at byte 2"),
        (
            json!({"encode": {"command_name": "SET_ALARM", "paras": {"value": 300}}}),
            "does not fit int8u",
        ),
        (json!({}), "give {\"decode\""),
    ] {
        let r = server.post(&test, request.clone()).await;
        assert_eq!(r.status, 400, "{request}: {}", r.body);
        assert!(
            r.body["error_msg"].as_str().unwrap().contains(reason),
            "{request}: {}",
            r.body
        );
    }

    let deleted = server.api.call("DELETE", &path, None).await.unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    assert_eq!(
        server.api.call("GET", &path, None).await.unwrap().status,
        404
    );
    server.stop().await;
}

#[tokio::test]
async fn a_binary_mqtt_device_reports_and_answers_commands_through_its_codec() {
    let server = server().await;
    let product = binary_product(&server, "MQTT").await;
    let set = set_codec(&server, &product, &smoke_codec()).await;
    assert_eq!(
        set.status, 200,
        "a bare definition is a codec too: {}",
        set.body
    );
    let (device_id, secret) = server.device(&product, "smoke-1").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    client
        .subscribe(
            format!("$oc/devices/{device_id}/sys/commands/#"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let (tx, mut downlinks) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
            }
        }
    });
    let report = format!("$oc/devices/{device_id}/sys/properties/report");
    client
        .publish(
            &report,
            QoS::AtLeastOnce,
            false,
            vec![0x00, 0x02, 0xFF, 0x38],
        )
        .await
        .unwrap();
    server
        .wait_reported(&device_id, json!({"level": 2, "temperature": -20.0}))
        .await;

    // Bytes the codec cannot read are traced with the reason, and the shadow keeps its values.
    client
        .publish(&report, QoS::AtLeastOnce, false, vec![0x07, 0x01])
        .await
        .unwrap();
    eventually("the codec failure is traced", || async {
        let trace = server.get(&format!("/devices/{device_id}/trace")).await;
        trace["entries"].as_array().unwrap().iter().any(|e| {
            e["kind"] == "codec_failed"
                && e["detail"]["error"]
                    .as_str()
                    .unwrap()
                    .contains("no uplink message has msgid 0x7")
                && e["detail"]["payload_hex"] == "0701"
        })
    })
    .await;

    let call = spawn_call(
        &server,
        "POST",
        format!("/devices/{device_id}/commands"),
        json!({"service_id": "Smoke", "command_name": "SET_ALARM", "paras": {"value": 1}}),
    );
    let (topic, bytes) = tokio::time::timeout(Duration::from_secs(5), downlinks.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        bytes,
        vec![0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x03, 0xE8],
        "msgid, mid, value, default threshold"
    );
    let request_id = request_id_of(&topic);
    client
        .publish(
            format!("$oc/devices/{device_id}/sys/commands/response/request_id={request_id}"),
            QoS::AtLeastOnce,
            false,
            vec![0x02, 0x00, 0x00, 0x00, 0x01],
        )
        .await
        .unwrap();
    let answer = call.await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["response"]["result_code"], 0, "{}", answer.body);
    assert_eq!(
        answer.body["response"]["paras"],
        json!({"result": 1}),
        "{}",
        answer.body
    );

    // A command the codec cannot encode is refused before anything is sent.
    let bad = server
        .post(&format!("/devices/{device_id}/commands"), json!({"service_id": "Smoke", "command_name": "SET_ALARM", "paras": {"value": 1, "threshold": 99999999.0}}))
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    server.stop().await;
}

#[test]
fn the_codec_test_command_decodes_encodes_and_explains_errors() {
    let codec = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../codec/golden/smoke.codec.json"
    );
    let run = |args: &[&str]| codec_cli(codec, args);
    let decoded = run(&["--decode", "0001013A"]);
    assert!(decoded.status.success(), "{decoded:?}");
    let json: Value = serde_json::from_slice(&decoded.stdout).unwrap();
    assert_eq!(
        json["decoded"]["services"][0]["properties"]["temperature"],
        31.4
    );

    let encoded = run(&[
        "--encode",
        r#"{"command_name":"SET_LABEL","paras":{"label":"abc","text":""},"mid":1}"#,
    ]);
    assert!(encoded.status.success(), "{encoded:?}");
    let json: Value = serde_json::from_slice(&encoded.stdout).unwrap();
    assert_eq!(json["hex"], "04000161626300");

    let failed = run(&["--decode", "09"]);
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("no uplink message has msgid 0x9"),
        "{failed:?}"
    );
}

#[test]
fn the_codec_test_command_runs_javascript_codecs() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../codec/golden/smoke.js");
    let run = |args: &[&str]| codec_cli(script, args);
    let decoded = run(&[
        "--decode",
        "00 01 01 3A",
        "--topic",
        "$oc/devices/d/sys/properties/report",
    ]);
    assert!(decoded.status.success(), "{decoded:?}");
    let json: Value = serde_json::from_slice(&decoded.stdout).unwrap();
    assert_eq!(
        json["decoded"]["services"][0]["properties"]["temperature"],
        31.4
    );
    let encoded = run(&[
        "--encode",
        r#"{"command_name":"SET_ALARM","paras":{"value":1},"mid":300}"#,
    ]);
    let json: Value = serde_json::from_slice(&encoded.stdout).unwrap();
    assert_eq!(json["hex"], "01012C01", "{encoded:?}");
    let failed = run(&["--decode", "07", "--topic", "t/x"]);
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr)
            .contains("the script threw: Error: unknown message type 7 on t/x")
            || String::from_utf8_lossy(&failed.stderr).contains("unknown message type 7 on t/x"),
        "{failed:?}"
    );
}

#[tokio::test]
async fn a_javascript_codec_decodes_a_binary_mqtt_devices_reports() {
    let server = server().await;
    let product = binary_product(&server, "MQTT").await;
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../codec/golden/smoke.js"
    ))
    .unwrap();
    let set = set_codec(
        &server,
        &product,
        &json!({"type": "javascript", "script": script}),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.body);
    let broken = set_codec(
        &server,
        &product,
        &json!({"type": "javascript", "script": "function decode( {"}),
    )
    .await;
    assert_eq!(broken.status, 400, "{}", broken.body);
    let (device_id, secret) = server.device(&product, "smoke-js").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let report = format!("$oc/devices/{device_id}/sys/properties/report");
    client
        .publish(
            &report,
            QoS::AtLeastOnce,
            false,
            vec![0x00, 0x04, 0x00, 0x64],
        )
        .await
        .unwrap();
    server
        .wait_reported(&device_id, json!({"level": 4, "temperature": 10}))
        .await;
    client
        .publish(&report, QoS::AtLeastOnce, false, vec![0x09])
        .await
        .unwrap();
    eventually(
        "the script's error is traced with the topic it saw",
        || async {
            let trace = server.get(&format!("/devices/{device_id}/trace")).await;
            trace["entries"].as_array().unwrap().iter().any(|e| {
                e["kind"] == "codec_failed"
                    && e["detail"]["error"]
                        .as_str()
                        .unwrap()
                        .contains(&format!("unknown message type 9 on {report}"))
            })
        },
    )
    .await;
    server.stop().await;
}
