//! The legacy northbound subscriptions (`notifyType` + `callbackUrl`): login, subscribe, and the
//! push bodies each notify type produces, received by a real HTTP server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use common::*;
use ioda::client::{ApiResponse, RawRequest};
use rumqttc::QoS;
use serde_json::{Value, json};

async fn receiver() -> (Arc<Mutex<Vec<Value>>>, String) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route(
            "/callback",
            post(
                |State(seen): State<Arc<Mutex<Vec<Value>>>>, body: axum::Json<Value>| async move {
                    seen.lock().unwrap().push(body.0)
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/callback", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (seen, url)
}

async fn legacy(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> ApiResponse {
    let mut headers = vec![("app_key".to_owned(), server.api.access_key.clone())];
    if let Some(token) = token {
        headers.push(("authorization".to_owned(), format!("Bearer {token}")));
    }
    let request = RawRequest {
        method: method.into(),
        path: path.into(),
        body,
        unsigned: true,
        extra_headers: headers,
        ..Default::default()
    };
    server.api.send(request).await.unwrap()
}

async fn pushes(seen: &Arc<Mutex<Vec<Value>>>, kind: &str, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let found: Vec<Value> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["notifyType"] == kind)
            .cloned()
            .collect();
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {n} {kind} pushes in {:?}", seen.lock().unwrap());
}

#[tokio::test]
async fn legacy_subscriptions_push_every_notify_type() {
    let server = server().await;
    let login_path = "/iocm/app/sec/v1.1.0/login";
    let wrong = legacy(
        &server,
        "POST",
        login_path,
        format!("appId={}&secret=nope", server.api.access_key).into_bytes(),
        None,
    )
    .await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    let login = legacy(
        &server,
        "POST",
        login_path,
        format!(
            "appId={}&secret={}",
            server.api.access_key, server.api.secret_key
        )
        .into_bytes(),
        None,
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.body);
    let token = login.body["accessToken"].as_str().unwrap().to_owned();

    let subs = "/iocm/app/sub/v1.2.0/subscriptions";
    let no_token = legacy(&server, "POST", subs, b"{}".to_vec(), None).await;
    assert_eq!(no_token.status, 401);
    let (seen, url) = receiver().await;
    let base = url.trim_end_matches("/callback").to_owned();
    for (body, needle) in [
        (
            json!({"notifyType": "deviceDataChanged", "callbackUrl": base}),
            "path",
        ),
        (
            json!({"notifyType": "deviceDataChanged", "callbackUrl": format!("{base}/")}),
            "path",
        ),
        (
            json!({"notifyType": "somethingElse", "callbackUrl": url}),
            "notifyType",
        ),
    ] {
        let r = legacy(
            &server,
            "POST",
            subs,
            body.to_string().into_bytes(),
            Some(&token),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(
            r.body["error_desc"].as_str().unwrap().contains(needle),
            "{}",
            r.body
        );
    }
    let kinds = [
        "deviceAdded",
        "bindDevice",
        "deviceInfoChanged",
        "deviceDataChanged",
        "deviceDatasChanged",
        "commandRsp",
        "deviceDeleted",
    ];
    let mut ids = Vec::new();
    for kind in kinds {
        let r = legacy(
            &server,
            "POST",
            subs,
            json!({"notifyType": kind, "callbackUrl": url})
                .to_string()
                .into_bytes(),
            Some(&token),
        )
        .await;
        assert_eq!(
            (r.status, r.body["notifyType"].as_str()),
            (201, Some(kind)),
            "{}",
            r.body
        );
        ids.push(r.body["subscriptionId"].as_str().unwrap().to_owned());
    }
    let listed = legacy(&server, "GET", subs, Vec::new(), Some(&token)).await;
    assert_eq!(listed.body["totalCount"], 7);

    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "legacy-1").await;
    let added = pushes(&seen, "deviceAdded", 1).await;
    assert_eq!(
        (
            added[0]["deviceId"].as_str(),
            added[0]["deviceInfo"]["nodeId"].as_str()
        ),
        (Some(device_id.as_str()), Some("legacy-1"))
    );

    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    let bound = pushes(&seen, "bindDevice", 1).await;
    assert_eq!(bound[0]["resultCode"], "succeeded");
    let report = json!({"services": [{"service_id": "Temperature", "properties": {"temp": 20.5}}, {"service_id": "Temperature", "properties": {"count": 4}}]});
    device
        .client
        .publish(
            format!("$oc/devices/{device_id}/sys/properties/report"),
            QoS::AtLeastOnce,
            false,
            report.to_string(),
        )
        .await
        .unwrap();
    let per_service = pushes(&seen, "deviceDataChanged", 2).await;
    assert_eq!(per_service[0]["service"]["data"], json!({"temp": 20.5}));
    assert_eq!(per_service[1]["service"]["data"], json!({"count": 4}));
    let together = pushes(&seen, "deviceDatasChanged", 1).await;
    assert_eq!(together[0]["services"].as_array().unwrap().len(), 2);
    assert_eq!(together[0]["requestId"], per_service[0]["requestId"]);

    let call = spawn_call(
        &server,
        "POST",
        format!("/devices/{device_id}/commands"),
        json!({"command_name": "SET_MODE", "paras": {"mode": "auto"}}),
    );
    let (topic, _) = device.next().await;
    device
        .reply(
            topic.replace("/commands/", "/commands/response/"),
            json!({"result_code": 0, "paras": {"ok": true}}),
        )
        .await;
    assert_eq!(call.await.unwrap().status, 200);
    let rsp = pushes(&seen, "commandRsp", 1).await;
    assert_eq!(
        rsp[0]["body"],
        json!({"result_code": 0, "paras": {"ok": true}})
    );
    assert_eq!(rsp[0]["header"]["deviceId"], device_id.as_str());

    let r = server
        .api
        .call(
            "PUT",
            &format!("/devices/{device_id}"),
            Some(&json!({"device_name": "renamed"})),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let changed = pushes(&seen, "deviceInfoChanged", 1).await;
    assert_eq!(changed[0]["deviceInfo"]["name"], "renamed");
    device.close().await;
    assert_eq!(
        server
            .api
            .call("DELETE", &format!("/devices/{device_id}"), None)
            .await
            .unwrap()
            .status,
        204
    );
    let deleted = pushes(&seen, "deviceDeleted", 1).await;
    assert_eq!(deleted[0]["deviceId"], device_id.as_str());
    assert_eq!(
        pushes(&seen, "bindDevice", 1).await.len(),
        1,
        "bindDevice is sent once, on activation"
    );

    let one = legacy(
        &server,
        "GET",
        &format!("{subs}/{}", ids[0]),
        Vec::new(),
        Some(&token),
    )
    .await;
    assert_eq!(one.body["notifyType"], "deviceAdded");
    assert_eq!(
        legacy(
            &server,
            "DELETE",
            &format!("{subs}/{}", ids[0]),
            Vec::new(),
            Some(&token)
        )
        .await
        .status,
        204
    );
    assert_eq!(
        legacy(
            &server,
            "GET",
            &format!("{subs}/{}", ids[0]),
            Vec::new(),
            Some(&token)
        )
        .await
        .status,
        404
    );
    // Legacy subscriptions are not v5 routing rules.
    assert_eq!(server.get("/routing-rule/rules").await["count"], 0);
    server.stop().await;
}

#[tokio::test]
async fn async_commands_report_each_status_to_their_callback_url() {
    let server = server().await;
    let (seen, url) = receiver().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "legacy-2").await;
    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    let path = format!("/devices/{device_id}/async-commands");
    let base = url.trim_end_matches("/callback").to_owned();
    let bad = server
        .post(
            &path,
            json!({"command_name": "SET_MODE", "paras": {"mode": "auto"}, "callback_url": base}),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let created = server
        .post(
            &path,
            json!({"command_name": "SET_MODE", "paras": {"mode": "auto"}, "callback_url": url}),
        )
        .await;
    let command_id = created.body["command_id"].as_str().unwrap().to_owned();
    let (topic, _) = device.next().await;
    device
        .reply(
            topic.replace("/commands/", "/commands/response/"),
            json!({"result_code": 0, "paras": {"done": 1}}),
        )
        .await;
    let mut codes = Vec::new();
    for _ in 0..100 {
        codes = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["commandId"] == command_id.as_str())
            .map(|v| v["result"]["resultCode"].as_str().unwrap().to_owned())
            .collect();
        if codes.last().is_some_and(|c| c == "SUCCESSFUL") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        codes,
        vec!["PENDING", "SENT", "SUCCESSFUL"],
        "every status change, in order"
    );
    let last = seen
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|v| v["commandId"] == command_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(
        last,
        json!({"deviceId": device_id, "commandId": command_id, "result": {"resultCode": "SUCCESSFUL", "resultDetail": {"result_code": 0, "paras": {"done": 1}}}})
    );
    assert_eq!(
        server.get("/routing-rule/actions").await["count"],
        0,
        "the callback queue is not a routing action"
    );
    device.close().await;
    server.stop().await;
}
