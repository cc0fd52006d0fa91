//! MQTTS: devices over TLS, verified with the CA ioda makes (or a certificate given to it), and
//! what is not a TLS handshake dropped without harm to the listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{
    TestServer, device_options, drive, raw_connect, report_acked, server, server_on, server_with,
    tls_handshake,
};
use ioda::config::ServeConfig;
use ioda_engine::SystemClock;
use openssl::ssl::SslVersion;
use rumqttc::{Event, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn mqtts_port(server: &TestServer) -> u16 {
    server.running.as_ref().unwrap().mqtts_addr.unwrap().port()
}

fn made_ca(server: &TestServer) -> PathBuf {
    server.dir.path().join("tls/ca.pem")
}

/// A rustls client configuration that trusts only `ca`.
fn trusting(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// An IoTDA device on rumqttc over TLS (rustls), checking the server against `ca` and 127.0.0.1.
fn tls_device_options(port: u16, device_id: &str, secret: &str, ca: &Path) -> rumqttc::MqttOptions {
    let mut options = device_options(port, device_id, secret, 30);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        trusting(ca),
    )));
    options
}

#[tokio::test]
async fn a_device_reports_and_receives_messages_over_mqtts() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "tls-1").await;
    let options = tls_device_options(mqtts_port(&server), &device_id, &secret, &made_ca(&server));
    let (client, mut events) = common::connect(options).await.expect("MQTTS CONNACK");
    server.wait_status(&device_id, "ONLINE").await;

    client
        .subscribe(
            format!("$oc/devices/{device_id}/sys/messages/down"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    drive(&mut events, 5, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    .unwrap();
    report_acked(
        &client,
        &mut events,
        &device_id,
        json!({"temp": 19.5, "mode": "manual"}),
    )
    .await;
    server
        .wait_reported(&device_id, json!({"temp": 19.5, "mode": "manual"}))
        .await;

    let sent = server
        .post(
            &format!("/devices/{device_id}/messages"),
            json!({"message": {"hello": "over tls"}}),
        )
        .await;
    assert_eq!(sent.status, 201, "{}", sent.body);
    let got = drive(&mut events, 5, |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await
    .expect("the message delivered over TLS");
    let Event::Incoming(Packet::Publish(message)) = got else {
        unreachable!()
    };
    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(body["content"], json!({"hello": "over tls"}), "{body}");
    let _ = client.disconnect().await;
    server.stop().await;
}

#[tokio::test]
async fn tls_below_1_2_is_refused_and_iotdas_tls_1_2_suites_are_offered() {
    let server = server().await;
    let (port, ca) = (mqtts_port(&server), made_ca(&server));
    // The client allows TLS 1.1 at OpenSSL's lowest security level, so it does offer it.
    let old = tls_handshake(port, &ca, SslVersion::TLS1_1, Some("DEFAULT:@SECLEVEL=0")).await;
    let error = old.expect_err("a TLS 1.1 handshake must fail");
    assert!(error.contains("protocol version"), "{error}");
    for suite in [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-ECDSA-AES256-SHA",
    ] {
        let stream = tls_handshake(port, &ca, SslVersion::TLS1_2, Some(suite))
            .await
            .unwrap_or_else(|e| panic!("{suite}: {e}"));
        assert_eq!(stream.ssl().current_cipher().unwrap().name(), suite);
    }
    let newest = tls_handshake(port, &ca, SslVersion::TLS1_3, None)
        .await
        .unwrap();
    assert_eq!(newest.ssl().version_str(), "TLSv1.3");
    server.stop().await;
}

#[tokio::test]
async fn what_is_not_a_tls_handshake_is_dropped_and_the_listener_keeps_serving() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "tls-2").await;
    let port = mqtts_port(&server);
    // Says nothing at all: a shutdown does not wait out its handshake's 10 s.
    let _silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let plain_connect = raw_connect("c", &device_id, "x", 30);
    let garbage = vec![0xFFu8; 4096];
    for bytes in [plain_connect, garbage] {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection");
        // A TLS alert at most (content type 21), never an MQTT CONNACK (0x20).
        assert!(
            read.is_err() || answer.is_empty() || answer[0] == 21,
            "{answer:?}"
        );
    }
    let options = tls_device_options(port, &device_id, &secret, &made_ca(&server));
    let (client, _events) = common::connect(options).await.expect("MQTTS still serves");
    server.wait_status(&device_id, "ONLINE").await;
    let _ = client.disconnect().await;
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("stopped without waiting for the silent peer's handshake");
}

#[tokio::test]
async fn the_made_ca_stays_and_the_server_certificate_follows_the_names() {
    let first = server().await;
    let tls = first.dir.path().join("tls");
    let (ca, cert) = (tls.join("ca.pem"), tls.join("server.pem"));
    let (ca_before, cert_before) = (std::fs::read(&ca).unwrap(), std::fs::read(&cert).unwrap());
    let dir = first.stop_keep_dir().await;

    let names = vec!["iot.example.com".to_owned(), "10.1.2.3".to_owned()];
    let with_names = |c: &mut ServeConfig| c.tls.names = names.clone();
    let second = server_on(dir, with_names, Arc::new(SystemClock)).await;
    assert_eq!(
        std::fs::read(&ca).unwrap(),
        ca_before,
        "the CA devices trust stays"
    );
    let reissued = std::fs::read(&cert).unwrap();
    assert_ne!(reissued, cert_before, "re-issued for the new names");
    let leaf = openssl::x509::X509::from_pem(&reissued).unwrap();
    let alt = leaf.subject_alt_names().unwrap();
    assert!(alt.iter().any(|n| n.dnsname() == Some("iot.example.com")));
    assert!(
        alt.iter()
            .any(|n| n.ipaddress() == Some(&[10, 1, 2, 3][..]))
    );
    assert!(alt.iter().any(|n| n.dnsname() == Some("localhost")));
    let port = mqtts_port(&second);
    tls_handshake(port, &ca, SslVersion::TLS1_3, None)
        .await
        .expect("the re-issued certificate verifies with the same CA");
    let dir = second.stop_keep_dir().await;

    let third = server_on(dir, |c| c.tls.names = names, Arc::new(SystemClock)).await;
    assert_eq!(
        std::fs::read(&cert).unwrap(),
        reissued,
        "names covered: kept"
    );
    third.stop().await;
}

#[tokio::test]
async fn a_broken_server_certificate_is_reissued_and_a_ca_without_its_key_stops_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    // A temporary file left by a crash, readable by all: the key must not inherit its mode.
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("server.key.tmp"), "stale").unwrap();
    std::fs::set_permissions(
        tls.join("server.key.tmp"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let first = server_on(dir, |_| {}, Arc::new(SystemClock)).await;
    let mode = std::fs::metadata(tls.join("server.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the server key is private");
    let ca_before = std::fs::read(tls.join("ca.pem")).unwrap();
    let other = server().await;
    let dir = first.stop_keep_dir().await;

    // A key that is not the certificate's (a crash between the two writes): made again.
    std::fs::copy(
        other.dir.path().join("tls/server.key"),
        tls.join("server.key"),
    )
    .unwrap();
    let second = server_on(dir, |_| {}, Arc::new(SystemClock)).await;
    assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), ca_before);
    tls_handshake(
        mqtts_port(&second),
        &tls.join("ca.pem"),
        SslVersion::TLS1_3,
        None,
    )
    .await
    .expect("the re-issued certificate is served");
    let dir = second.stop_keep_dir().await;

    // The CA devices trust is never replaced behind their back.
    std::fs::remove_file(tls.join("ca.key")).unwrap();
    let mut config = ServeConfig::ephemeral(dir.path());
    config.tls.names = vec!["new.example.com".into()];
    let error = ioda::serve::start(config)
        .await
        .expect_err("a CA without its key");
    assert!(
        format!("{error:#}").contains("without its key"),
        "{error:#}"
    );
    assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), ca_before);
    other.stop().await;
}

#[tokio::test]
async fn the_tls_listeners_can_be_switched_off() {
    let off: ioda::config::ListenAddr = "off".parse().unwrap();
    assert_eq!(off.0, None);
    let wrong = "8883".parse::<ioda::config::ListenAddr>().unwrap_err();
    assert!(wrong.contains("nor off"), "{wrong}");
    let listeners_of = |server: &TestServer| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(server.dir.path().join("listeners.json")).unwrap())
            .unwrap()
    };

    let wss_only = server_with(|c| c.mqtts_addr = off.0).await;
    let running = wss_only.running.as_ref().unwrap();
    assert_eq!(running.mqtts_addr, None);
    assert!(running.wss_addr.is_some(), "wss keeps the certificate");
    assert!(made_ca(&wss_only).exists());
    let listeners = listeners_of(&wss_only);
    assert!(listeners.get("mqtts").is_none(), "{listeners}");
    assert!(listeners.get("wss").is_some(), "{listeners}");
    wss_only.stop().await;

    let server = server_with(|c| {
        c.mqtts_addr = off.0;
        c.wss_addr = off.0;
        c.https_addr = off.0;
    })
    .await;
    assert_eq!(server.running.as_ref().unwrap().wss_addr, None);
    assert!(
        !server.dir.path().join("tls").exists(),
        "no certificate made"
    );
    let listeners = listeners_of(&server);
    assert!(listeners.get("wss").is_none(), "{listeners}");
    assert!(listeners.get("https").is_none(), "{listeners}");
    assert!(listeners.get("mqtt").is_some(), "{listeners}");
    server.stop().await;
}

#[tokio::test]
async fn a_given_certificate_is_served_and_a_bad_pair_is_refused_at_start() {
    let made = server().await;
    let tls = made.dir.path().join("tls");
    let (ca, cert, key) = (
        tls.join("ca.pem"),
        tls.join("server.pem"),
        tls.join("server.key"),
    );
    let other = server().await;
    let other_key = other.dir.path().join("tls/server.key");

    let (given_cert, given_key) = (cert.clone(), key.clone());
    let given = server_with(|c| {
        c.tls.cert = Some(given_cert);
        c.tls.key = Some(given_key);
    })
    .await;
    assert!(!given.dir.path().join("tls").exists(), "nothing made");
    assert_eq!(given.running.as_ref().unwrap().tls_ca_file, None);
    tls_handshake(mqtts_port(&given), &ca, SslVersion::TLS1_3, None)
        .await
        .expect("the given certificate is served");

    for (cert, key, why) in [
        (Some(cert.clone()), Some(other_key), "does not belong"),
        (Some(cert.clone()), None, "both or neither"),
        (
            Some(PathBuf::from("/nonexistent/cert.pem")),
            Some(key),
            "reading the TLS certificate",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServeConfig::ephemeral(dir.path());
        config.tls.cert = cert;
        config.tls.key = key;
        let error = ioda::serve::start(config).await.expect_err(why);
        assert!(format!("{error:#}").contains(why), "{error:#}");
    }
    for server in [made, other, given] {
        server.stop().await;
    }
}
