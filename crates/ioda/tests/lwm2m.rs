//! NB-IoT devices over CoAP/LwM2M, end to end over real UDP sockets: registration, binary data
//! decoded into the shadow, commands written to `/19/1/0` one at a time with their LwM2M statuses,
//! queue mode, lifetime expiry, libcoap's `coap-client` as a real peer, and bad datagrams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::nb::NbDevice;
use common::*;
use ioda_coap::blockwise::Block;
use ioda_coap::{MessageClass, MessageType, Packet, ResponseType};
use ioda_engine::ManualClock;
use serde_json::{Value, json};

use coap_lite::{CoapOption, RequestType};

fn coap_addr(server: &TestServer) -> SocketAddr {
    server.running.as_ref().unwrap().coap_addr
}

async fn nb_product(server: &TestServer) -> String {
    let product = binary_product(server, "CoAP").await;
    let set = set_codec(server, &product, &smoke_codec()).await;
    assert_eq!(set.status, 200, "{}", set.body);
    product
}

/// A server with the smoke detector's NB-IoT product, one device of it, and a scripted module.
async fn nb_setup(node: &str) -> (TestServer, String, NbDevice) {
    let server = server().await;
    let product = nb_product(&server).await;
    let (device_id, _) = server.device(&product, node).await;
    let device = NbDevice::new(coap_addr(&server)).await;
    (server, device_id, device)
}

async fn command_status(server: &TestServer, device_id: &str, command_id: &str) -> Value {
    server
        .get(&format!("/devices/{device_id}/async-commands/{command_id}"))
        .await
}

async fn create_command(server: &TestServer, device_id: &str, value: i64) -> String {
    let created = server
        .post(
            &format!("/devices/{device_id}/async-commands"),
            json!({"service_id": "Smoke", "command_name": "SET_ALARM", "paras": {"value": value}}),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body);
    created.body["command_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_nb_iot_device_registers_reports_and_answers_commands_one_at_a_time() {
    let (server, device_id, mut device) = nb_setup("863000000000001").await;

    let created = device.register("urn:imei:863000000000001", 300, "U").await;
    assert_eq!(
        created.header.code,
        MessageClass::Response(ResponseType::Created)
    );
    let location: Vec<String> = created
        .get_option(CoapOption::LocationPath)
        .unwrap()
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert_eq!(location, ["rd", "863000000000001"]);
    assert_eq!(server.status(&device_id).await, "ONLINE");
    device.accept_observe().await;

    device.notify(&[0x00, 0x02, 0xFF, 0x38]).await;
    let answer = device.next_write().await;
    assert_eq!(
        answer.payload,
        vec![0xAA, 0xAA, 0x00, 0x00],
        "the codec's report response"
    );
    device.ack_write(&answer).await;
    server
        .wait_reported(&device_id, json!({"level": 2, "temperature": -20.0}))
        .await;
    device.notify(&[0x55]).await;
    server.wait_trace(&device_id, "codec_failed").await;

    let synchronous = server
        .post(
            &format!("/devices/{device_id}/commands"),
            json!({"service_id": "Smoke", "command_name": "SET_ALARM", "paras": {"value": 1}}),
        )
        .await;
    assert_eq!(synchronous.status, 400, "{}", synchronous.body);
    assert!(
        synchronous.body["error_msg"]
            .as_str()
            .unwrap()
            .contains("asynchronous commands only")
    );

    let first = create_command(&server, &device_id, 1).await;
    let second = create_command(&server, &device_id, 0).await;
    let put = device.next_write().await;
    let mid = [put.payload[1], put.payload[2]];
    assert_eq!(put.payload[0], 0x01, "SET_ALARM's msgid");
    assert_eq!(
        &put.payload[3..],
        &[0x01, 0x00, 0x00, 0x03, 0xE8],
        "value, then the default threshold"
    );
    assert_eq!(
        command_status(&server, &device_id, &first).await["status"],
        "SENT"
    );
    device.ack_write(&put).await;
    eventually("DELIVERED on the CoAP ACK", || async {
        command_status(&server, &device_id, &first).await["status"] == "DELIVERED"
    })
    .await;
    device.quiet(700).await; // The second command waits for the first one's answer.
    assert_eq!(
        command_status(&server, &device_id, &second).await["status"],
        "PENDING",
        "not sent before the first is answered"
    );

    device.notify(&[0x02, mid[0], mid[1], 0x00, 0x01]).await;
    eventually("SUCCESSFUL on the response carrying the mid", || async {
        command_status(&server, &device_id, &first).await["status"] == "SUCCESSFUL"
    })
    .await;
    let result = command_status(&server, &device_id, &first).await;
    assert_eq!(result["result"]["paras"], json!({"result": 1}), "{result}");

    let put = device.next_write().await;
    assert_eq!(&put.payload[3..4], &[0x00], "then the second command");
    let mid = [put.payload[1], put.payload[2]];
    device.ack_write(&put).await;
    device.notify(&[0x02, mid[0], mid[1], 0x07, 0x00]).await;
    eventually("FAILED when the device's errcode is not 0", || async {
        command_status(&server, &device_id, &second).await["status"] == "FAILED"
    })
    .await;

    device
        .call_expecting(
            ResponseType::Deleted,
            RequestType::Delete,
            &["rd", "863000000000001"],
            &[],
            &[],
        )
        .await;
    server.wait_status(&device_id, "OFFLINE").await;
    server.stop().await;
}

#[tokio::test]
async fn queue_mode_holds_commands_until_the_device_talks_and_lifetimes_expire() {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let server = server_on(
        tempfile::tempdir().unwrap(),
        |c| c.signature_window_ms = i64::MAX / 4,
        clock.clone(),
    )
    .await;
    let product = nb_product(&server).await;
    let (device_id, _) = server.device(&product, "863000000000002").await;
    let mut device = NbDevice::new(coap_addr(&server)).await;
    let created = device.register("863000000000002", 120, "UQ").await;
    assert_eq!(
        created.header.code,
        MessageClass::Response(ResponseType::Created)
    );
    device.accept_observe().await;

    clock.advance(60_000); // The module went back to sleep.
    let command = create_command(&server, &device_id, 1).await;
    device.quiet(700).await;
    assert_eq!(
        command_status(&server, &device_id, &command).await["status"],
        "PENDING",
        "not sent while the device sleeps"
    );
    device
        .call_expecting(
            ResponseType::Changed,
            RequestType::Post,
            &["rd", "863000000000002"],
            &[],
            &[],
        )
        .await;
    let put = device.next_write().await;
    device.ack_write(&put).await;
    eventually("DELIVERED once the awake device acknowledged", || async {
        command_status(&server, &device_id, &command).await["status"] == "DELIVERED"
    })
    .await;

    clock.advance(121_000); // No update within the lifetime.
    server.running.as_ref().unwrap().lwm2m.sweep();
    server
        .wait_trace(&device_id, "lwm2m_lifetime_expired")
        .await;
    let stale = device
        .call(RequestType::Post, &["rd", "863000000000002"], &[], &[])
        .await;
    assert_eq!(
        stale.header.code,
        MessageClass::Response(ResponseType::NotFound),
        "a lapsed registration must register again"
    );

    // The status follows the data, not the registration: ONLINE until 25 h of silence, ABNORMAL
    // until 49 h, then OFFLINE; data makes it ONLINE again. The timers survive a restart.
    let platform = server.platform().clone();
    platform.tick().await.unwrap();
    assert_eq!(server.status(&device_id).await, "ONLINE");
    clock.advance(25 * 3_600_000);
    platform.tick().await.unwrap();
    assert_eq!(server.status(&device_id).await, "ABNORMAL");
    drop(platform);
    let dir = server.stop_keep_dir().await;
    let server = server_on(dir, |c| c.signature_window_ms = i64::MAX / 4, clock.clone()).await;
    clock.advance(24 * 3_600_000);
    server.platform().tick().await.unwrap();
    assert_eq!(server.status(&device_id).await, "OFFLINE");
    let mut device = NbDevice::new(coap_addr(&server)).await;
    let again = device.register("863000000000002", 120, "UQ").await;
    assert_eq!(
        again.header.code,
        MessageClass::Response(ResponseType::Created)
    );
    device.accept_observe().await;
    device.notify(&[0x00, 0x01, 0x00, 0x10]).await;
    server.wait_status(&device_id, "ONLINE").await;
    server.stop().await;
}

#[tokio::test]
async fn bad_datagrams_and_unknown_endpoints_are_refused() {
    let (server, device_id, mut device) = nb_setup("863000000000003").await;

    let unknown = device.register("999999999999999", 300, "U").await;
    assert_eq!(
        unknown.header.code,
        MessageClass::Response(ResponseType::Forbidden)
    );
    device
        .call_expecting(
            ResponseType::BadRequest,
            RequestType::Post,
            &["rd"],
            &["lt=300"],
            &[],
        )
        .await;
    device
        .call_expecting(
            ResponseType::BadRequest,
            RequestType::Post,
            &["rd"],
            &["ep=863000000000003", "lt=soon"],
            &[],
        )
        .await;
    device
        .call_expecting(
            ResponseType::NotFound,
            RequestType::Get,
            &["nothing", "here"],
            &[],
            &[],
        )
        .await;

    // A confirmable header with a reserved token length is reset; what is not CoAP version 1
    // gets no answer at all.
    device
        .socket
        .send_to(&[0x49, 0x01, 0x12, 0x34], device.server)
        .await
        .unwrap();
    let reset = device.recv().await;
    assert_eq!(
        (reset.header.get_type(), reset.header.message_id),
        (MessageType::Reset, 0x1234)
    );
    device
        .socket
        .send_to(b"\xff\xfe not coap", device.server)
        .await
        .unwrap();
    device.quiet(300).await;

    // A critical option the server does not know (Proxy-Uri here) is refused, not ignored.
    device.mid += 1;
    let mut proxied = Packet::new();
    proxied.header.set_type(MessageType::Confirmable);
    proxied.header.code = MessageClass::Request(RequestType::Post);
    proxied.header.message_id = device.mid;
    proxied.add_option(CoapOption::UriPath, b"rd".to_vec());
    proxied.add_option(CoapOption::ProxyUri, b"coap://elsewhere/rd".to_vec());
    device.send(&proxied).await;
    let bad_option = device.recv().await;
    assert_eq!(
        bad_option.header.code,
        MessageClass::Response(ResponseType::BadOption)
    );

    let huge = device
        .call(
            RequestType::Post,
            &["rd"],
            &["ep=863000000000003", "lt=18446744073709551615"],
            &[],
        )
        .await;
    assert_eq!(
        huge.header.code,
        MessageClass::Response(ResponseType::BadRequest),
        "lifetimes are bounded"
    );

    // A confirmable notification for no observation is reset, so the device stops sending it.
    device.mid += 1;
    let mut stray = Packet::new();
    stray.header.set_type(MessageType::Confirmable);
    stray.header.code = MessageClass::Response(ResponseType::Content);
    stray.header.message_id = device.mid;
    stray.set_token(vec![9, 9, 9]);
    stray.payload = vec![1, 2, 3];
    device.send(&stray).await;
    let reset = device.recv().await;
    assert_eq!(
        (reset.header.get_type(), reset.header.message_id),
        (MessageType::Reset, device.mid)
    );

    // Frozen devices may not register.
    let frozen = server
        .post(&format!("/devices/{device_id}/freeze"), json!({}))
        .await;
    assert!(frozen.status < 300, "{}", frozen.body);
    let refused = device.register("863000000000003", 300, "U").await;
    assert_eq!(
        refused.header.code,
        MessageClass::Response(ResponseType::Forbidden)
    );
    assert!(
        server
            .trace_kinds(&device_id)
            .await
            .contains(&"connect_refused".to_owned())
    );
    server.stop().await;
}

/// Registers with libcoap's `coap-client` (`POST url` with an object list), with a PSK identity
/// and key for `coaps://`.
async fn coap_client_register(
    client: &'static str,
    url: String,
    psk: Option<(&'static str, &'static str)>,
) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(client);
        command.args(["-m", "post", "-B", "5", "-e", "</19/0>,</19/1>"]);
        if let Some((identity, key)) = psk {
            command.args(["-u", identity, "-k", key]);
        }
        command.arg(&url).output().unwrap()
    })
    .await
    .unwrap()
}

/// libcoap's command-line client, a real peer that is not ours.
fn coap_client() -> Option<&'static str> {
    let found = ["coap-client-notls", "coap-client-openssl", "coap-client"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("-h").output().is_ok());
    if found.is_none() {
        assert!(std::env::var("CI").is_err(), "CI installs libcoap3-bin");
        eprintln!("skipped: coap-client not installed (apt-get install libcoap3-bin)");
    }
    found
}

#[tokio::test]
async fn libcoap_coap_client_registers_and_is_refused_when_unknown() {
    let Some(client) = coap_client() else { return };
    let server = server().await;
    let product = nb_product(&server).await;
    let (device_id, _) = server.device(&product, "863000000000004").await;
    let port = coap_addr(&server).port();
    let run = |ep: &str| {
        let url = format!("coap://127.0.0.1:{port}/rd?ep={ep}&lt=300&b=U");
        coap_client_register(client, url, None)
    };
    let registered = run("863000000000004").await;
    assert!(registered.status.success(), "{registered:?}");
    assert_eq!(server.status(&device_id).await, "ONLINE");
    assert!(
        server
            .trace_kinds(&device_id)
            .await
            .contains(&"lwm2m_registered".to_owned())
    );

    let refused = run("000").await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        said.contains("4.03"),
        "coap-client should report 4.03 Forbidden: {said}"
    );
    server.stop().await;
}

/// A device whose secret is IoTDA's PSK form (hex): `6162636465666768` is the key `abcdefgh`.
async fn psk_device(server: &TestServer, product: &str, node: &str) -> String {
    let body = json!({"node_id": node, "product_id": product, "auth_info": {"secret": "6162636465666768", "secure_access": true}});
    let r = server.post("/devices", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["device_id"].as_str().unwrap().to_owned()
}

fn coaps_addr(server: &TestServer) -> SocketAddr {
    server.running.as_ref().unwrap().coaps_addr
}

/// OpenSSL's own client completes a DTLS 1.2 PSK handshake with `cipher`, or fails (bounded by
/// `timeout`, so a server that stops answering fails the test instead of hanging it).
fn openssl_handshake(port: u16, identity: &str, key_hex: &str, cipher: &str) -> bool {
    let output = std::process::Command::new("timeout")
        .args([
            "4",
            "openssl",
            "s_client",
            "-dtls1_2",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-psk_identity",
            identity,
            "-psk",
            key_hex,
            "-cipher",
            &format!("{cipher}:@SECLEVEL=0"),
            "-no_ign_eof",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // A refused identity ends in an alert; a wrong key makes DTLS drop the client's Finished
    // silently (RFC 6347), so the client never sees the server's and gives up at the timeout.
    said.contains(&format!("Cipher is {cipher}"))
        && !said.contains("alert")
        && !said.contains(":error:")
}

#[tokio::test]
async fn dtls_psk_offers_both_iotda_cipher_suites_and_refuses_wrong_keys() {
    let server = server().await;
    let product = nb_product(&server).await;
    psk_device(&server, &product, "863000000000005").await;
    let port = coaps_addr(&server).port();
    for cipher in ["PSK-AES128-CCM8", "PSK-AES128-CBC-SHA256"] {
        let done = tokio::task::spawn_blocking(move || {
            openssl_handshake(port, "863000000000005", "6162636465666768", cipher)
        })
        .await
        .unwrap();
        assert!(done, "{cipher} must complete");
    }
    let wrong = tokio::task::spawn_blocking(move || {
        openssl_handshake(port, "863000000000005", "00112233", "PSK-AES128-CCM8")
    })
    .await
    .unwrap();
    assert!(!wrong, "a wrong key must not complete the handshake");
    let unknown = tokio::task::spawn_blocking(move || {
        openssl_handshake(port, "nobody", "6162636465666768", "PSK-AES128-CCM8")
    })
    .await
    .unwrap();
    assert!(
        !unknown,
        "an unknown identity must not complete the handshake"
    );
    let other = tokio::task::spawn_blocking(move || {
        openssl_handshake(
            port,
            "863000000000005",
            "6162636465666768",
            "PSK-AES128-GCM-SHA256",
        )
    })
    .await
    .unwrap();
    assert!(!other, "only IoTDA's two suites are offered");
    server.stop().await;
}

#[tokio::test]
async fn libcoap_registers_over_dtls_with_each_suite_and_secure_devices_may_not_use_plain_coap() {
    if std::process::Command::new("coap-client-openssl")
        .arg("-h")
        .output()
        .is_err()
    {
        assert!(std::env::var("CI").is_err(), "CI installs libcoap3-bin");
        return;
    }
    let run = |url: String, key: &'static str| {
        coap_client_register("coap-client-openssl", url, Some(("863000000000006", key)))
    };
    for (suite, other) in [
        ("PSK-AES128-CCM8", "PSK-AES128-CBC-SHA256"),
        ("PSK-AES128-CBC-SHA256", "PSK-AES128-CCM8"),
    ] {
        // A server offering one suite only, so libcoap (which takes what it is offered) uses it.
        let server = server_with(|c| c.coaps_ciphers = vec![suite.to_owned()]).await;
        let product = nb_product(&server).await;
        let device_id = psk_device(&server, &product, "863000000000006").await;
        let coaps = coaps_addr(&server).port();
        let plain = coap_addr(&server).port();

        let refused = run(
            format!("coap://127.0.0.1:{plain}/rd?ep=863000000000006&lt=300"),
            "abcdefgh",
        )
        .await;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&refused.stdout),
            String::from_utf8_lossy(&refused.stderr)
        );
        assert!(
            said.contains("4.03"),
            "secure_access devices must use CoAPS: {said}"
        );
        assert_ne!(server.status(&device_id).await, "ONLINE");

        let registered = run(
            format!("coaps://127.0.0.1:{coaps}/rd?ep=863000000000006&lt=300"),
            "abcdefgh",
        )
        .await;
        assert!(registered.status.success(), "{suite}: {registered:?}");
        eventually("ONLINE over CoAPS", || async {
            server.status(&device_id).await == "ONLINE"
        })
        .await;
        let trace = server.get(&format!("/devices/{device_id}/trace")).await;
        assert!(
            trace["entries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "lwm2m_registered"),
            "{trace}"
        );

        // Nobody without the DTLS identity may update or remove the registration.
        let mut intruder = NbDevice::new(coap_addr(&server)).await;
        intruder
            .call_expecting(
                ResponseType::Forbidden,
                RequestType::Post,
                &["rd", "863000000000006"],
                &[],
                &[],
            )
            .await;
        intruder
            .call_expecting(
                ResponseType::Forbidden,
                RequestType::Delete,
                &["rd", "863000000000006"],
                &[],
                &[],
            )
            .await;
        assert_eq!(server.status(&device_id).await, "ONLINE");

        let offered = tokio::task::spawn_blocking(move || {
            openssl_handshake(coaps, "863000000000006", "6162636465666768", suite)
        })
        .await
        .unwrap();
        assert!(offered, "{suite} is offered");
        let not_offered = tokio::task::spawn_blocking(move || {
            openssl_handshake(coaps, "863000000000006", "6162636465666768", other)
        })
        .await
        .unwrap();
        assert!(!not_offered, "{other} is not offered by this server");
        server.stop().await;
    }
}

#[tokio::test]
async fn large_payloads_go_block_wise_both_ways() {
    let (server, device_id, mut device) = nb_setup("863000000000007").await;

    // A registration whose object list needs two blocks (Block1).
    let links: String = (0..120).map(|i| format!("</{}/0>,", 3000 + i)).collect();
    let links = format!("{links}</19/0>,</19/1>");
    assert!(links.len() > 1024);
    let parts = ioda_coap::blockwise::split(links.as_bytes(), 6);
    let mut last = None;
    for (block, part) in &parts {
        device.mid += 1;
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = device.mid;
        p.set_token(vec![0xB1, block.num as u8]);
        p.add_option(CoapOption::UriPath, b"rd".to_vec());
        p.add_option(CoapOption::UriQuery, b"ep=863000000000007".to_vec());
        p.add_option(CoapOption::UriQuery, b"lt=300".to_vec());
        block.set(&mut p, CoapOption::Block1);
        p.payload = part.to_vec();
        device.send(&p).await;
        let answer = device.recv().await;
        let expected = if block.more {
            ResponseType::Continue
        } else {
            ResponseType::Created
        };
        assert_eq!(
            answer.header.code,
            MessageClass::Response(expected),
            "block {}",
            block.num
        );
        last = Some(answer);
    }
    assert!(last.is_some());
    device.accept_observe().await;
    let trace = server.get(&format!("/devices/{device_id}/trace")).await;
    let registered = trace["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "lwm2m_registered")
        .cloned()
        .unwrap();
    assert_eq!(
        registered["detail"]["objects"].as_array().unwrap().len(),
        122,
        "{registered}"
    );

    // A report larger than a datagram (Block2 notification, the rest fetched by the platform).
    let mut report = vec![
        0x03, b'L', b'A', b'B', 0x00, 0x00, 0x01, 0x02, 0x03, 0x07, 0xD0,
    ];
    report.extend(std::iter::repeat_n(0x5A, 2000));
    device.notify_blockwise(&report).await;
    eventually("the whole 2011-byte report was decoded", || async {
        let trace = server.get(&format!("/devices/{device_id}/trace")).await;
        trace["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "property_rejected" && e["detail"]["property"] == "blob")
    })
    .await;
    assert!(
        !server
            .trace_kinds(&device_id)
            .await
            .contains(&"codec_failed".to_owned())
    );

    // A downlink larger than a datagram (Block1 PUT).
    let content = "y".repeat(3000);
    let sent = server
        .post(
            &format!("/devices/{device_id}/messages"),
            json!({"message": content}),
        )
        .await;
    assert!(sent.status < 300, "{}", sent.body);
    let body = device.receive_blockwise_write().await;
    assert!(
        String::from_utf8_lossy(&body).contains(&content),
        "the whole message arrived"
    );

    // Two short messages are two writes (only a command's resends share a topic).
    for text in ["first", "second"] {
        let sent = server
            .post(
                &format!("/devices/{device_id}/messages"),
                json!({"message": text}),
            )
            .await;
        assert!(sent.status < 300, "{}", sent.body);
    }
    for text in ["first", "second"] {
        let write = device.next_write().await;
        assert!(
            String::from_utf8_lossy(&write.payload).contains(text),
            "{write:?}"
        );
        device.ack_write(&write).await;
    }

    // A device that answers the platform's block fetch with empty "more" blocks forever is given
    // up on after one answer, and its next data still arrives.
    device.mid += 1;
    let mut first = Packet::new();
    first.header.set_type(MessageType::NonConfirmable);
    first.header.code = MessageClass::Response(ResponseType::Content);
    first.header.message_id = device.mid;
    first.set_token(device.observe.clone().unwrap());
    Block {
        num: 0,
        more: true,
        szx: 6,
    }
    .set(&mut first, CoapOption::Block2);
    first.payload = vec![0x03; 1024];
    device.send(&first).await;
    let get = device.recv().await;
    assert_eq!(Block::of(&get, CoapOption::Block2).map(|b| b.num), Some(1));
    let mut endless = Packet::new();
    endless.header.set_type(MessageType::Acknowledgement);
    endless.header.code = MessageClass::Response(ResponseType::Content);
    endless.header.message_id = get.header.message_id;
    endless.set_token(get.get_token().to_vec());
    Block {
        num: 1,
        more: true,
        szx: 6,
    }
    .set(&mut endless, CoapOption::Block2);
    device.send(&endless).await;
    device.quiet(500).await;
    device.notify(&[0x00, 0x05, 0x00, 0x0A]).await;
    let answer = device.next_write().await;
    device.ack_write(&answer).await;
    server
        .wait_reported(&device_id, json!({"level": 5, "temperature": 1.0}))
        .await;
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_cipher_suite_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ioda::config::ServeConfig::ephemeral(dir.path());
    config.coaps_ciphers = vec!["PSK-AES128-CCM8".into(), "RC4-MD5".into()];
    let error = ioda::serve::start(config).await.expect_err("refused");
    assert!(
        format!("{error:#}").contains("cipher suite RC4-MD5 is not offered"),
        "{error:#}"
    );
}
