//! The real binary as a process: first start, configuration sources, SIGTERM, restart, kill -9.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ioda::client::ApiClient;
use rumqttc::{Event, Outgoing, Packet, QoS};
use serde_json::json;

fn spawn(data_dir: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ioda"))
        .args(["serve", "--data-dir"])
        .arg(data_dir)
        .args(["--http-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0"])
        .args(["--coap-addr", "127.0.0.1:0", "--coaps-addr", "127.0.0.1:0"])
        .args(["--mqtts-addr", "127.0.0.1:0", "--wss-addr", "127.0.0.1:0"])
        .args(["--https-addr", "127.0.0.1:0"])
        .args(extra)
        .env("IODA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_ready(data_dir: &Path) -> ApiClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = ApiClient::from_data_dir(data_dir) {
            return client;
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout_of(child: &mut Child) -> String {
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    out
}

async fn setup_device(api: &ApiClient) -> (String, String) {
    let body = json!({"name": "thermo", "device_type": "Thermometer", "protocol_type": "MQTT", "service_capabilities": model()});
    let r = api.call("POST", "/products", Some(&body)).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let product = r.body["product_id"].as_str().unwrap().to_owned();
    let r = api.call("POST", "/devices", Some(&json!({"node_id": "n1", "product_id": product, "auth_info": {"secret": "s3cret-pass"}}))).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    (r.body["device_id"].as_str().unwrap().to_owned(), product)
}

fn mqtt_port(data_dir: &Path) -> u16 {
    let listeners: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir.join("listeners.json")).unwrap())
            .unwrap();
    listeners["mqtt"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn restart_keeps_state_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn(dir.path(), &[]);
    let api = wait_ready(dir.path());
    let creds_path = dir.path().join("admin-credentials.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&creds_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let creds_before = std::fs::read_to_string(&creds_path).unwrap();
    let (device_id, product) = setup_device(&api).await;
    // The device's message trace is started: its report's stages are traced too.
    let started = api
        .call(
            "POST",
            &format!("/devices/{device_id}/trace/start"),
            Some(&json!({"duration": 3600})),
        )
        .await
        .unwrap();
    assert_eq!(started.status, 200, "{}", started.body);
    let until = started.body["tracing"]["until"].clone();
    assert!(until.is_string(), "{}", started.body);
    let (client, mut events) = connect(device_options(
        mqtt_port(dir.path()),
        &device_id,
        "s3cret-pass",
        60,
    ))
    .await
    .unwrap();
    report_acked(&client, &mut events, &device_id, json!({"temp": 30.5})).await;

    // The CLI shows the device trace: the report went through.
    let trace = Command::new(env!("CARGO_BIN_EXE_ioda"))
        .args(["trace", "--data-dir"])
        .arg(dir.path())
        .arg(&device_id)
        .output()
        .unwrap();
    assert!(trace.status.success());
    let printed = String::from_utf8_lossy(&trace.stdout);
    assert!(
        printed.contains("report_stored") && printed.contains("applied_services"),
        "{printed}"
    );
    assert!(
        printed.starts_with("message trace: running until "),
        "{printed}"
    );

    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status}");
    assert!(
        !dir.path().join("listeners.json").exists(),
        "listeners.json is removed on shutdown"
    );
    let first_out = stdout_of(&mut child);
    assert!(
        first_out.contains("First start") && first_out.contains(&api.secret_key),
        "{first_out}"
    );

    let mut child = spawn(dir.path(), &[]);
    let api = wait_ready(dir.path());
    assert_eq!(
        std::fs::read_to_string(&creds_path).unwrap(),
        creds_before,
        "credentials are created once"
    );
    let product_view = api
        .call("GET", &format!("/products/{product}"), None)
        .await
        .unwrap();
    assert_eq!(product_view.body["service_capabilities"], model());
    let device = api
        .call("GET", &format!("/devices/{device_id}"), None)
        .await
        .unwrap();
    assert_eq!(device.body["status"], "OFFLINE");
    let shadow = api
        .call("GET", &format!("/devices/{device_id}/shadow"), None)
        .await
        .unwrap();
    assert_eq!(
        shadow.body["shadow"][0]["reported"]["properties"],
        json!({"temp": 30.5})
    );
    let history = api
        .call(
            "GET",
            &format!("/devices/{device_id}/property-history"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(history.body["reports"].as_array().unwrap().len(), 1);
    let trace = api
        .call("GET", &format!("/devices/{device_id}/trace"), None)
        .await
        .unwrap();
    assert_eq!(
        trace.body["tracing"],
        json!({"started": true, "until": until, "all_devices": false}),
        "a started trace survives a restart"
    );
    // `ioda trace` stops it too.
    let stopped = Command::new(env!("CARGO_BIN_EXE_ioda"))
        .args(["trace", "--stop", "--data-dir"])
        .arg(dir.path())
        .arg(&device_id)
        .output()
        .unwrap();
    assert!(stopped.status.success());
    assert!(
        String::from_utf8_lossy(&stopped.stdout).starts_with("message trace: not running"),
        "{}",
        String::from_utf8_lossy(&stopped.stdout)
    );
    let started = Command::new(env!("CARGO_BIN_EXE_ioda"))
        .args(["trace", "--start", "60", "--data-dir"])
        .arg(dir.path())
        .arg(&device_id)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&started.stdout).starts_with("message trace: running until "),
        "{}",
        String::from_utf8_lossy(&started.stdout)
    );
    assert!(terminate(&mut child).success());
    assert!(!stdout_of(&mut child).contains("First start"));
}

#[tokio::test]
async fn configuration_from_file_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("from-file");
    let config = dir.path().join("ioda.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nmqtt_addr = \"127.0.0.1:0\"\nrate_limit = 7\n",
            data_dir
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ioda"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("IODA_HTTP_ADDR", "127.0.0.1:0")
        .env("IODA_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let api = wait_ready(&data_dir);
    assert_eq!(
        api.call("GET", "/products", None).await.unwrap().status,
        200
    );
    assert!(terminate(&mut child).success());

    std::fs::write(&config, "data_dir = 5\n").unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_ioda"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "a malformed config file is refused");
}

#[tokio::test]
async fn kill_9_under_qos1_load_loses_no_acknowledged_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn(dir.path(), &["--rate-limit", "0"]);
    let api = wait_ready(dir.path());
    let (device_id, _) = setup_device(&api).await;
    let mut options = device_options(mqtt_port(dir.path()), &device_id, "s3cret-pass", 60);
    options.set_inflight(32);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 1000);
    let topic = format!("$oc/devices/{device_id}/sys/properties/report");
    let publisher = tokio::spawn(async move {
        for seq in 0..800u32 {
            let report =
                json!({"services": [{"service_id": "Temperature", "properties": {"count": seq}}]});
            if client
                .publish(&topic, QoS::AtLeastOnce, false, report.to_string())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Publishes leave in request order, so the n-th outgoing PUBLISH carries sequence n.
    let mut next_seq = 0u32;
    let mut in_flight: HashMap<u16, u32> = HashMap::new();
    let mut acked = HashSet::new();
    let mut killed = false;
    let mut queue = VecDeque::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                queue.push_back(next_seq);
                in_flight.insert(pkid, next_seq);
                next_seq += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(seq) = in_flight.remove(&ack.pkid) {
                    acked.insert(seq);
                }
                if acked.len() >= 300 && !killed {
                    child.kill().unwrap();
                    killed = true;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    assert!(
        killed,
        "the load ended before the kill ({} acknowledged)",
        acked.len()
    );
    let _ = child.wait();
    publisher.abort();
    // kill -9 leaves the old listeners.json behind; wait for the new server's own.
    std::fs::remove_file(dir.path().join("listeners.json")).unwrap();

    let mut child = spawn(dir.path(), &[]);
    let api = wait_ready(dir.path());
    let history = api
        .call(
            "GET",
            &format!("/devices/{device_id}/property-history?limit=1000"),
            None,
        )
        .await
        .unwrap();
    let stored: HashSet<u32> = history.body["reports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["properties"]["count"].as_u64().unwrap() as u32)
        .collect();
    let lost: Vec<_> = acked.iter().filter(|seq| !stored.contains(seq)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged reports lost: {lost:?}",
        lost.len()
    );
    assert!(stored.len() >= acked.len());
    // The shadow is written behind the history (every 100 ms): what the crash took from memory
    // is replayed from the history, so the shadow holds the newest stored report.
    let shadow = api
        .call("GET", &format!("/devices/{device_id}/shadow"), None)
        .await
        .unwrap();
    let newest = stored.iter().max().copied().unwrap();
    assert_eq!(
        shadow.body["shadow"][0]["reported"]["properties"]["count"],
        json!(newest),
        "{}",
        shadow.body
    );
    let device = api
        .call("GET", &format!("/devices/{device_id}"), None)
        .await
        .unwrap();
    assert_eq!(
        device.body["status"], "OFFLINE",
        "a crash leaves no device ONLINE"
    );
    assert!(terminate(&mut child).success());
}
