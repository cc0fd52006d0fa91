//! MQTT over WebSocket (`wss://…/mqtt` with TLS as on MQTTS, and `ws://…/mqtt`): a device driven
//! frame by frame from tungstenite's client, and every kind of bad upgrade and frame refused
//! without harm to the listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{TestServer, hour_stamp, server, server_with, tls_handshake};
use futures_util::{SinkExt, StreamExt};
use ioda_mqtt::client::{ServerPacket, decode_server, encode_connect, encode_subscribe};
use ioda_mqtt::{Protocol, QoS};
use openssl::ssl::SslVersion;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

fn wss_port(server: &TestServer) -> u16 {
    server.running.as_ref().unwrap().wss_addr.unwrap().port()
}

fn ws_port(server: &TestServer) -> u16 {
    server.running.as_ref().unwrap().ws_addr.unwrap().port()
}

async fn server_with_ws() -> TestServer {
    server_with(|c| c.ws_addr = Some("127.0.0.1:0".parse().unwrap())).await
}

/// The WebSocket client handshake on `stream`, for `path`, offering `subprotocol` if given.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    path: &str,
    subprotocol: Option<&str>,
) -> Result<(WebSocketStream<S>, Option<String>), WsError> {
    let mut request = format!("ws://localhost{path}").into_client_request()?;
    if let Some(subprotocol) = subprotocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", subprotocol.parse().unwrap());
    }
    let (socket, response) = tokio_tungstenite::client_async(request, stream).await?;
    let chosen = response
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    Ok((socket, chosen))
}

/// A device's side of MQTT over WebSocket, frame by frame.
struct WsDevice<S> {
    socket: WebSocketStream<S>,
    received: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsDevice<S> {
    async fn send(&mut self, bytes: &[u8]) {
        let frame = Message::Binary(Bytes::copy_from_slice(bytes));
        self.socket.send(frame).await.unwrap();
    }

    /// The next MQTT packet, whichever frames carried it.
    async fn next_packet(&mut self) -> ServerPacket {
        loop {
            if let Some(packet) = decode_server(&mut self.received, Protocol::V3).unwrap() {
                return packet;
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), self.socket.next())
                .await
                .expect("a frame in time")
                .expect("the connection open")
                .unwrap();
            match frame {
                Message::Binary(data) => self.received.extend_from_slice(&data),
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }

    /// Connects as an IoTDA device, the CONNECT split over two frames; the CONNACK code.
    async fn connect(&mut self, device_id: &str, secret: &str) -> u8 {
        let ts = hour_stamp();
        let password = ioda_engine::auth::device_password(secret, &ts);
        let mut connect = BytesMut::new();
        let client_id = format!("{device_id}_0_0_{ts}");
        encode_connect(
            &mut connect,
            Protocol::V3,
            &client_id,
            device_id,
            &password,
            30,
        );
        self.send(&connect[..3]).await;
        self.send(&connect[3..]).await;
        match self.next_packet().await {
            ServerPacket::ConnAck { code } => code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Whether the server ends the connection (a close frame, the end, or an error) within 5 s.
    async fn closed_by_server(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.socket.next()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

async fn ws_device(port: u16) -> WsDevice<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (socket, _) = upgrade(tcp, "/mqtt", Some("mqtt")).await.unwrap();
    WsDevice {
        socket,
        received: BytesMut::new(),
    }
}

fn report(device_id: &str, pkid: u16, properties: serde_json::Value) -> BytesMut {
    let body = json!({"services": [{"service_id": "Temperature", "properties": properties}]});
    let mut out = BytesMut::new();
    ioda_mqtt::codec::encode_publish(
        &mut out,
        Protocol::V3,
        &format!("$oc/devices/{device_id}/sys/properties/report"),
        QoS::AtLeastOnce,
        pkid,
        body.to_string().as_bytes(),
    );
    out
}

#[tokio::test]
async fn a_device_reports_and_receives_a_message_over_wss() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "wss-1").await;
    let ca = server.dir.path().join("tls/ca.pem");
    let tls = tls_handshake(wss_port(&server), &ca, SslVersion::TLS1_2, None)
        .await
        .expect("TLS 1.2, verified with ioda's CA");
    let (socket, chosen) = upgrade(tls, "/mqtt", Some("mqtt")).await.unwrap();
    assert_eq!(
        chosen.as_deref(),
        Some("mqtt"),
        "the MQTT subprotocol chosen"
    );
    let mut device = WsDevice {
        socket,
        received: BytesMut::new(),
    };
    assert_eq!(device.connect(&device_id, &secret).await, 0);
    server.wait_status(&device_id, "ONLINE").await;

    // A SUBSCRIBE and a report in one frame: MQTT's bytes, not frames, delimit packets.
    let mut both = BytesMut::new();
    let filter = format!("$oc/devices/{device_id}/sys/messages/down");
    encode_subscribe(&mut both, Protocol::V3, 1, &filter, QoS::AtLeastOnce);
    both.extend_from_slice(&report(&device_id, 2, json!({"temp": 18.5})));
    device.send(&both).await;
    let mut answers = vec![device.next_packet().await, device.next_packet().await];
    answers.sort_by_key(|p| matches!(p, ServerPacket::PubAck { .. }));
    assert!(
        matches!(&answers[0], ServerPacket::SubAck { pkid: 1, codes } if codes[..] == [1]),
        "{answers:?}"
    );
    assert_eq!(answers[1], ServerPacket::PubAck { pkid: 2, reason: 0 });
    server
        .wait_reported(&device_id, json!({"temp": 18.5}))
        .await;

    // A WebSocket ping is answered with a pong carrying its payload.
    device
        .socket
        .send(Message::Ping(Bytes::from_static(b"still there?")))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), device.socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"still there?")));

    let sent = server
        .post(
            &format!("/devices/{device_id}/messages"),
            json!({"message": {"hello": "over wss"}}),
        )
        .await;
    assert_eq!(sent.status, 201, "{}", sent.body);
    let ServerPacket::Publish { topic, payload, .. } = device.next_packet().await else {
        panic!("expected the message");
    };
    assert_eq!(topic, filter);
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(payload["content"], json!({"hello": "over wss"}));

    // A close frame ends the MQTT connection as a TCP close would.
    device.socket.close(None).await.unwrap();
    server.wait_status(&device_id, "OFFLINE").await;
    server.stop().await;
}

#[tokio::test]
async fn plain_ws_is_off_unless_asked_for_and_then_serves_clients_offering_no_subprotocol() {
    let default = server().await;
    assert_eq!(default.running.as_ref().unwrap().ws_addr, None);
    default.stop().await;

    let server = server_with_ws().await;
    let listeners: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.dir.path().join("listeners.json")).unwrap())
            .unwrap();
    assert_eq!(
        listeners["ws"],
        json!(
            server
                .running
                .as_ref()
                .unwrap()
                .ws_addr
                .unwrap()
                .to_string()
        )
    );
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "ws-1").await;
    let tcp = TcpStream::connect(("127.0.0.1", ws_port(&server)))
        .await
        .unwrap();
    // Some embedded WebSocket stacks name no subprotocol: served, none chosen.
    let (socket, chosen) = upgrade(tcp, "/mqtt", None).await.unwrap();
    assert_eq!(chosen, None);
    let mut device = WsDevice {
        socket,
        received: BytesMut::new(),
    };
    assert_eq!(device.connect(&device_id, &secret).await, 0);
    device
        .send(&report(&device_id, 7, json!({"temp": 3.0})))
        .await;
    assert_eq!(
        device.next_packet().await,
        ServerPacket::PubAck { pkid: 7, reason: 0 }
    );
    // A wrong password is told so in a CONNACK, over the WebSocket.
    let mut impostor = ws_device(ws_port(&server)).await;
    assert_eq!(impostor.connect(&device_id, "not-the-secret").await, 4);
    assert!(impostor.closed_by_server().await);
    server.stop().await;
}

/// An upgrade the server answers with an HTTP error: its status and body.
async fn refused_upgrade(port: u16, path: &str, subprotocol: Option<&str>) -> (u16, String) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    match upgrade(tcp, path, subprotocol).await {
        Err(WsError::Http(response)) => (
            response.status().as_u16(),
            String::from_utf8(response.body().clone().unwrap_or_default()).unwrap(),
        ),
        other => panic!("expected an HTTP refusal, got {:?}", other.map(|(_, c)| c)),
    }
}

#[tokio::test]
async fn bad_upgrades_and_frames_are_refused_and_the_listener_keeps_serving() {
    let server = server_with(|c| {
        c.ws_addr = Some("127.0.0.1:0".parse().unwrap());
        c.engine.max_payload = 1024;
    })
    .await;
    let port = ws_port(&server);

    let (status, body) = refused_upgrade(port, "/ws", Some("mqtt")).await;
    assert_eq!(status, 404);
    assert!(body.contains("/mqtt"), "{body}");
    let (status, body) = refused_upgrade(port, "/mqtt", Some("stomp, wamp")).await;
    assert_eq!(status, 400);
    assert!(body.contains("\"mqtt\""), "{body}");

    // Not HTTP at all, and MQTT without the upgrade: dropped.
    for bytes in [
        b"hello\r\n\r\n".to_vec(),
        common::raw_connect("x_0_0_2026112800", "x", "y", 30),
    ] {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
            .await
            .expect("closed in time");
        // Closed (or reset) without an upgrade, whichever way the read ended.
        drop(read);
        assert!(!answer.starts_with(b"HTTP/1.1 101"), "{answer:?}");
    }

    // MQTT in a text frame: the connection is closed (MQTT 5.0 §6.0).
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "ws-bad").await;
    let mut texting = ws_device(port).await;
    let mut connect = BytesMut::new();
    encode_connect(&mut connect, Protocol::V3, "t_0_0_2026112800", "t", "p", 30);
    let as_text = String::from_utf8_lossy(&connect).into_owned();
    texting.socket.send(Message::text(as_text)).await.unwrap();
    assert!(texting.closed_by_server().await, "a text frame closes");

    // A message larger than the largest packet, though every packet in it is a good PINGREQ:
    // closed before it is taken whole.
    let mut flooding = ws_device(port).await;
    assert_eq!(flooding.connect(&device_id, &secret).await, 0);
    let huge = [0xC0u8, 0x00].repeat((1024 + 64 * 1024) / 2 + 1);
    let _ = flooding.socket.send(Message::Binary(huge.into())).await;
    assert!(
        flooding.closed_by_server().await,
        "an oversized message closes"
    );

    // Garbage inside binary frames is MQTT's own error: the connection closes.
    let mut garbling = ws_device(port).await;
    garbling.send(&[0xF0, 0x00]).await;
    assert!(
        garbling.closed_by_server().await,
        "a reserved packet type closes"
    );

    let mut good = ws_device(port).await;
    assert_eq!(good.connect(&device_id, &secret).await, 0);
    good.send(&report(&device_id, 9, json!({"temp": 4.0})))
        .await;
    assert_eq!(
        good.next_packet().await,
        ServerPacket::PubAck { pkid: 9, reason: 0 }
    );
    server.stop().await;
}
