//! Shared test fixtures: an in-process server on ephemeral ports, a signed API client, IoTDA device
//! credentials and MQTT clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod forwarding;
pub mod nb;
pub mod receiver;

use std::time::Duration;

use ioda::client::ApiClient;
use ioda::config::ServeConfig;
use std::sync::Arc;

use ioda::serve::{Running, start_with_clock};
use ioda_engine::{Clock, SystemClock};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tempfile::TempDir;

pub struct TestServer {
    pub running: Option<Running>,
    pub api: ApiClient,
    pub mqtt_port: u16,
    pub dir: TempDir,
}

pub async fn server() -> TestServer {
    server_with(|_| {}).await
}

pub async fn server_with(adjust: impl FnOnce(&mut ServeConfig)) -> TestServer {
    server_on(tempfile::tempdir().unwrap(), adjust, Arc::new(SystemClock)).await
}

/// A server on a manual clock, in a given directory (reused across restarts).
pub async fn server_on(
    dir: TempDir,
    adjust: impl FnOnce(&mut ServeConfig),
    clock: Arc<dyn Clock>,
) -> TestServer {
    let mut config = ServeConfig::ephemeral(dir.path());
    config.durability = ioda_store::Durability::Normal;
    adjust(&mut config);
    let running = start_with_clock(config, clock).await.unwrap();
    let api = ApiClient::from_data_dir(dir.path()).unwrap();
    let mqtt_port = running.mqtt_addr.port();
    TestServer {
        running: Some(running),
        api,
        mqtt_port,
        dir,
    }
}

/// The model every test product uses.
pub fn model() -> Value {
    json!([{
        "service_id": "Temperature",
        "service_type": "Temperature",
        "properties": [
            {"property_name": "temp", "data_type": "decimal", "min": "-40", "max": "120", "method": "RW"},
            {"property_name": "count", "data_type": "int", "min": "0", "max": "1000000", "method": "R"},
            {"property_name": "mode", "data_type": "enum", "enum_list": ["auto", "manual"], "method": "RW"}
        ],
        "commands": [{"command_name": "SET_MODE", "paras": [{"para_name": "mode", "data_type": "string"}]}]
    }])
}

impl TestServer {
    pub async fn product(&self) -> String {
        let body = json!({"name": "thermo", "device_type": "Thermometer", "protocol_type": "MQTT", "service_capabilities": model()});
        let r = self
            .api
            .call("POST", "/products", Some(&body))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["product_id"].as_str().unwrap().to_owned()
    }

    /// Registers a device and returns `(device_id, secret)`.
    pub async fn device(&self, product_id: &str, node_id: &str) -> (String, String) {
        let body = json!({"node_id": node_id, "product_id": product_id, "auth_info": {"secret": "s3cret-pass"}});
        let r = self
            .api
            .call("POST", "/devices", Some(&body))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
        (
            r.body["device_id"].as_str().unwrap().to_owned(),
            "s3cret-pass".to_owned(),
        )
    }

    pub async fn get(&self, path: &str) -> Value {
        let r = self.api.call("GET", path, None).await.unwrap();
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.body
    }

    pub async fn status(&self, device_id: &str) -> String {
        self.get(&format!("/devices/{device_id}")).await["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Starts a device's message trace (its successful traffic is traced too) for an hour.
    pub async fn start_trace(&self, device_id: &str) {
        let r = self
            .post(&format!("/devices/{device_id}/trace/start"), json!({}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    /// Trace entry kinds of a device, newest first.
    pub async fn trace_kinds(&self, device_id: &str) -> Vec<String> {
        let body = self.get(&format!("/devices/{device_id}/trace")).await;
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
    }

    /// Stops the server and hands back its directory for a restart.
    pub async fn stop_keep_dir(mut self) -> TempDir {
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
        self.dir
    }

    pub fn platform(&self) -> &Arc<ioda_engine::Platform> {
        &self.running.as_ref().unwrap().platform
    }

    pub async fn post(&self, path: &str, body: Value) -> ioda::client::ApiResponse {
        self.api.call("POST", path, Some(&body)).await.unwrap()
    }
}

pub fn hour_stamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    ioda_types::time::format_hour_stamp(now)
}

/// MQTT options of an IoTDA device: client id, username and HMAC password.
pub fn device_options(
    port: u16,
    device_id: &str,
    secret: &str,
    keep_alive_secs: u64,
) -> MqttOptions {
    let ts = hour_stamp();
    let mut options = MqttOptions::new(format!("{device_id}_0_0_{ts}"), "127.0.0.1", port);
    options.set_credentials(device_id, ioda_engine::auth::device_password(secret, &ts));
    options.set_keep_alive(Duration::from_secs(keep_alive_secs));
    options.set_clean_session(true);
    // A gateway's answers and notifications name up to a hundred children; what the device
    // sends keeps rumqttc's default limit (10 KiB).
    options.set_max_packet_size(1 << 20, 10 * 1024);
    options
}

/// Polls until the CONNACK: `Ok` with a live client, or the connection error.
pub async fn connect(options: MqttOptions) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let (client, mut events) = AsyncClient::new(options, 64);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll())
            .await
            .expect("CONNACK in time")?
        {
            Event::Incoming(Packet::ConnAck(_)) => return Ok((client, events)),
            _ => continue,
        }
    }
}

/// Drives the event loop until `until` matches an event or the time runs out.
pub async fn drive(
    events: &mut EventLoop,
    secs: u64,
    mut until: impl FnMut(&Event) -> bool,
) -> Result<Event, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => return Err("timed out".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(event)) if until(&event) => return Ok(event),
            Ok(Ok(_)) => {}
        }
    }
}

/// Publishes a property report of one Temperature service at QoS 1 and waits for its PUBACK.
pub async fn report_acked(
    client: &AsyncClient,
    events: &mut EventLoop,
    device_id: &str,
    properties: Value,
) {
    let report = json!({"services": [{"service_id": "Temperature", "properties": properties}]});
    client
        .publish(
            format!("$oc/devices/{device_id}/sys/properties/report"),
            QoS::AtLeastOnce,
            false,
            report.to_string(),
        )
        .await
        .unwrap();
    drive(events, 5, |e| {
        matches!(e, Event::Incoming(Packet::PubAck(_)))
    })
    .await
    .expect("the report acknowledged");
}

/// Polls `check` every 50 ms for up to five seconds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 5 s");
}

/// Prefixes a packet body with its fixed header (type byte and variable-length size).
fn with_header(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut packet = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

fn put_str(body: &mut Vec<u8>, s: &[u8]) {
    body.extend_from_slice(&(s.len() as u16).to_be_bytes());
    body.extend_from_slice(s);
}

/// A hand-made MQTT 3.1.1 CONNECT, for tests that need a client which misbehaves.
pub fn raw_connect(client_id: &str, user: &str, password: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(4);
    body.push(0xC2);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    put_str(&mut body, user.as_bytes());
    put_str(&mut body, password.as_bytes());
    with_header(0x10, body)
}

/// A raw TCP session of a device, past a successful CONNACK, for tests that need to misbehave.
pub async fn raw_device(
    port: u16,
    device_id: &str,
    secret: &str,
    keep_alive: u16,
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ts = hour_stamp();
    let password = ioda_engine::auth::device_password(secret, &ts);
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket
        .write_all(&raw_connect(
            &format!("{device_id}_0_0_{ts}"),
            device_id,
            &password,
            keep_alive,
        ))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    socket
}

/// A hand-made MQTT 3.1.1 PUBLISH.
pub fn raw_publish(topic: &str, payload: &[u8], qos1_pkid: Option<u16>) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    if let Some(pkid) = qos1_pkid {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    with_header(if qos1_pkid.is_some() { 0x32 } else { 0x30 }, body)
}

/// MQTT 5 options of an IoTDA device, for rumqttc's v5 client.
pub fn device_options_v5(port: u16, device_id: &str, secret: &str) -> rumqttc::v5::MqttOptions {
    let ts = hour_stamp();
    let mut options =
        rumqttc::v5::MqttOptions::new(format!("{device_id}_0_0_{ts}"), "127.0.0.1", port);
    options.set_credentials(device_id, ioda_engine::auth::device_password(secret, &ts));
    options.set_keep_alive(Duration::from_secs(60));
    options
}

/// A simulated device: subscribes to its downlink topics and hands every publish it receives to the
/// test, which answers (or not) through `client`.
pub struct SimDevice {
    pub client: AsyncClient,
    pub inbox: tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
    pub task: tokio::task::JoinHandle<()>,
}

impl SimDevice {
    /// Connects and subscribes to the system downlink topics at `qos`.
    pub async fn connect(port: u16, device_id: &str, secret: &str, qos: QoS) -> SimDevice {
        let (client, mut events) = connect(device_options(port, device_id, secret, 60))
            .await
            .unwrap();
        for filter in [
            "sys/commands/#",
            "sys/properties/set/#",
            "sys/properties/get/#",
            "sys/messages/down",
            "sys/shadow/get/response/#",
            "user/#",
        ] {
            client
                .subscribe(format!("$oc/devices/{device_id}/{filter}"), qos)
                .await
                .unwrap();
        }
        let (tx, inbox) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let body = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                    });
                    let _ = tx.send((p.topic.clone(), body));
                }
            }
        });
        SimDevice {
            client,
            inbox,
            task,
        }
    }

    /// The next publish the device receives, within five seconds.
    pub async fn next(&mut self) -> (String, Value) {
        tokio::time::timeout(Duration::from_secs(5), self.inbox.recv())
            .await
            .expect("a downlink within 5 s")
            .expect("device task alive")
    }

    /// Asserts nothing arrives for `ms` milliseconds.
    pub async fn quiet(&mut self, ms: u64) {
        if let Ok(Some(got)) =
            tokio::time::timeout(Duration::from_millis(ms), self.inbox.recv()).await
        {
            panic!("unexpected downlink {got:?}");
        }
    }

    /// Publishes a JSON reply.
    pub async fn reply(&self, topic: String, body: Value) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
            .unwrap();
    }

    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

/// The request id at the end of a downlink topic.
pub fn request_id_of(topic: &str) -> String {
    topic.rsplit("request_id=").next().unwrap().to_owned()
}

/// The declarative codec of the golden tests (a smoke detector).
pub fn smoke_codec() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../codec/golden/smoke.codec.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A product that declares binary data, with the smoke detector's model (no codec yet).
pub async fn binary_product(server: &TestServer, protocol: &str) -> String {
    let model = json!([{
        "service_id": "Smoke", "service_type": "Smoke",
        "properties": [
            {"property_name": "level", "data_type": "int", "min": "0", "max": "255", "method": "R"},
            {"property_name": "temperature", "data_type": "decimal", "min": "-100", "max": "200", "method": "R"}
        ],
        "commands": [{"command_name": "SET_ALARM", "paras": [
            {"para_name": "value", "data_type": "int", "min": "0", "max": "1"},
            {"para_name": "threshold", "data_type": "decimal", "min": "-100", "max": "100", "required": false}
        ]}]
    }]);
    let body = json!({"name": "smoke", "device_type": "Smoke", "protocol_type": protocol, "data_format": "binary", "service_capabilities": model});
    let r = server.post("/products", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["product_id"].as_str().unwrap().to_owned()
}

/// Sets a product's codec through the API.
pub async fn set_codec(
    server: &TestServer,
    product: &str,
    codec: &Value,
) -> ioda::client::ApiResponse {
    server
        .api
        .call("PUT", &format!("/products/{product}/codec"), Some(codec))
        .await
        .unwrap()
}

/// Starts an API call that waits for a device (a synchronous command, say) without waiting for it.
pub fn spawn_call(
    server: &TestServer,
    method: &'static str,
    path: String,
    body: Value,
) -> tokio::task::JoinHandle<ioda::client::ApiResponse> {
    let api = server.api.clone();
    tokio::spawn(async move { api.call(method, &path, Some(&body)).await.unwrap() })
}

impl TestServer {
    /// Waits (up to 5 s) for a device's status.
    pub async fn wait_status(&self, device_id: &str, status: &str) {
        eventually(&format!("status {status}"), || async {
            self.status(device_id).await == status
        })
        .await;
    }

    /// Waits (up to 5 s) until the device's trace holds an entry of `kind`.
    pub async fn wait_trace(&self, device_id: &str, kind: &str) {
        eventually(&format!("a {kind} trace entry"), || async {
            self.trace_kinds(device_id).await.iter().any(|k| k == kind)
        })
        .await;
    }

    /// Waits (up to 5 s) until the device's first shadow service reports exactly `properties`.
    pub async fn wait_reported(&self, device_id: &str, properties: Value) {
        eventually(&format!("reported {properties}"), || async {
            let shadow = self.get(&format!("/devices/{device_id}/shadow")).await;
            shadow["shadow"][0]["reported"]["properties"] == properties
        })
        .await;
    }
}

/// Creates a routing rule from `body` and activates it; returns its id.
pub async fn activated_rule(server: &TestServer, body: Value) -> String {
    let rule = server.post("/routing-rule/rules", body).await;
    assert_eq!(rule.status, 201, "{}", rule.body);
    let rule_id = rule.body["rule_id"].as_str().unwrap().to_owned();
    let r = server
        .api
        .call(
            "PUT",
            &format!("/routing-rule/rules/{rule_id}"),
            Some(&json!({"active": true})),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    rule_id
}

/// A TLS handshake with OpenSSL as the client, limited to `max` and (for TLS 1.2) `ciphers`.
pub async fn tls_handshake(
    port: u16,
    ca: &std::path::Path,
    max: openssl::ssl::SslVersion,
    ciphers: Option<&str>,
) -> Result<tokio_openssl::SslStream<tokio::net::TcpStream>, String> {
    let mut builder =
        openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client()).unwrap();
    builder.set_ca_file(ca).unwrap();
    builder.set_min_proto_version(None).unwrap();
    builder.set_max_proto_version(Some(max)).unwrap();
    if let Some(ciphers) = ciphers {
        builder.set_cipher_list(ciphers).unwrap();
    }
    let ssl = builder
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut stream = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    std::pin::Pin::new(&mut stream)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(stream)
}
