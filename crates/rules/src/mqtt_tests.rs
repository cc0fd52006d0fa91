//! The MQTT sink against a scripted broker on a loopback port: what it writes, and what it makes
//! of each answer (acknowledgements in any order, a connection lost mid-batch, a refusal, bytes
//! that are not MQTT, silence).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use ioda_mqtt::codec::{self, Packet};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(5);

fn spec_for(port: u16, qos: u8, credentials: Option<(&str, Option<&str>)>) -> MqttSpec {
    MqttSpec {
        host: "127.0.0.1".into(),
        port,
        topic: "fwd/out".into(),
        qos,
        username: credentials.map(|(u, _)| u.to_owned()),
        password: credentials.and_then(|(_, p)| p.map(str::to_owned)),
    }
}

/// The broker's end of one connection.
struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

impl Peer {
    async fn accept(listener: &TcpListener) -> Peer {
        let (stream, _) = listener.accept().await.unwrap();
        Peer {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn packet(&mut self, protocol: Option<Protocol>) -> Option<Packet> {
        loop {
            if let Some(packet) = codec::decode(&mut self.buf, protocol, 1 << 20).unwrap() {
                return Some(packet);
            }
            if self.stream.read_buf(&mut self.buf).await.unwrap() == 0 {
                return None;
            }
        }
    }

    /// Takes the CONNECT and answers it with `code`.
    async fn handshake(&mut self, code: u8) -> codec::Connect {
        let Some(Packet::Connect(connect)) = self.packet(None).await else {
            panic!("expected CONNECT")
        };
        self.send(|out| codec::encode_connack(out, Protocol::V3, code, None))
            .await;
        *connect
    }

    async fn publishes(&mut self, count: usize) -> Vec<codec::Publish> {
        let mut got = Vec::new();
        while got.len() < count {
            match self.packet(Some(Protocol::V3)).await {
                Some(Packet::Publish(publish)) => got.push(publish),
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        got
    }

    async fn send(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        let mut out = BytesMut::new();
        encode(&mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn ack(&mut self, pkids: impl IntoIterator<Item = u16>) {
        let mut out = BytesMut::new();
        for pkid in pkids {
            codec::encode_puback(&mut out, Protocol::V3, pkid, 0);
        }
        self.stream.write_all(&out).await.unwrap();
    }
}

async fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

const BATCH: [&str; 5] = ["m0", "m1", "m2", "m3", "m4"];

#[tokio::test]
async fn a_batch_is_confirmed_by_its_pubacks_in_whatever_order_they_come() {
    let (listener, port) = listener().await;
    let broker = tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        peer.handshake(0).await;
        let publishes = peer.publishes(BATCH.len()).await;
        let mut pkids: Vec<u16> = publishes.iter().map(|p| p.pkid).collect();
        pkids.reverse();
        peer.ack(pkids).await;
        publishes
    });
    let mut sink = MqttSink::open(&spec_for(port, 1, None), LIMIT)
        .await
        .unwrap();
    assert_eq!(sink.publish_all(&BATCH, LIMIT).await, Ok(()));
    let publishes = broker.await.unwrap();
    let payloads: Vec<&[u8]> = publishes.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, BATCH.map(str::as_bytes).to_vec(), "in order");
    assert!(publishes.iter().all(|p| p.topic == "fwd/out"));
    assert!(publishes.iter().all(|p| p.qos == QoS::AtLeastOnce));
    let pkids: std::collections::HashSet<u16> = publishes.iter().map(|p| p.pkid).collect();
    assert_eq!(pkids.len(), BATCH.len(), "distinct packet ids: {pkids:?}");
}

/// Sends `BATCH` at QoS 1 to a broker that acknowledges the given messages of it (by index;
/// `None`: a packet id never sent), then closes the connection or keeps it open.
async fn batch_answered(acks: &[Option<usize>], close: bool) -> Result<(), BatchFailure> {
    let (listener, port) = listener().await;
    let acks_all = (0..BATCH.len()).all(|i| acks.contains(&Some(i)));
    let acks = acks.to_vec();
    let broker = tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        peer.handshake(0).await;
        let pkids: Vec<u16> = peer
            .publishes(BATCH.len())
            .await
            .iter()
            .map(|p| p.pkid)
            .collect();
        peer.ack(acks.iter().map(|at| at.map_or(999, |at| pkids[at])))
            .await;
        if !close {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    let mut sink = MqttSink::open(&spec_for(port, 1, None), LIMIT)
        .await
        .unwrap();
    // A batch left open has to time out; the others end as soon as the broker has answered,
    // however long a loaded machine takes to run it.
    let deadline = if close || acks_all {
        LIMIT
    } else {
        Duration::from_secs(1)
    };
    let outcome = sink.publish_all(&BATCH, deadline).await;
    broker.abort();
    outcome
}

#[tokio::test]
async fn a_batch_counts_as_confirmed_the_acknowledged_prefix_only() {
    let cases: [(&str, &[Option<usize>], bool, Result<(), (usize, &str)>); 5] = [
        (
            "all, out of order",
            &[Some(2), Some(0), Some(4), Some(1), Some(3)],
            false,
            Ok(()),
        ),
        (
            "all but the third, open",
            &[Some(4), Some(0), Some(3), Some(1)],
            false,
            Err((2, "in time")),
        ),
        (
            "an unknown id, the second, the first twice, the fourth; closed",
            &[None, Some(1), Some(0), Some(0), Some(3)],
            true,
            Err((2, "closed")),
        ),
        ("none, open", &[], false, Err((0, "in time"))),
        ("none, closed", &[], true, Err((0, "closed"))),
    ];
    for (case, acks, close, expected) in cases {
        match (batch_answered(acks, close).await, expected) {
            (Ok(()), Ok(())) => {}
            (Err(failure), Err((confirmed, error))) => {
                assert_eq!(failure.confirmed, confirmed, "{case}: {failure:?}");
                assert!(failure.error.contains(error), "{case}: {failure:?}");
            }
            (outcome, expected) => panic!("{case}: {outcome:?}, expected {expected:?}"),
        }
    }
}

#[tokio::test]
async fn qos_0_counts_once_written() {
    let (listener, port) = listener().await;
    let broker = tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        peer.handshake(0).await;
        peer.publishes(BATCH.len()).await
    });
    let mut sink = MqttSink::open(&spec_for(port, 0, None), LIMIT)
        .await
        .unwrap();
    assert_eq!(sink.publish_all(&BATCH, LIMIT).await, Ok(()));
    let publishes = broker.await.unwrap();
    assert!(
        publishes
            .iter()
            .all(|p| p.qos == QoS::AtMostOnce && p.pkid == 0)
    );
}

#[tokio::test]
async fn the_connect_carries_the_actions_credentials_and_a_refusal_says_why() {
    let cases: [(Option<(&str, Option<&str>)>, u8); 3] = [
        (None, 0),
        (Some(("app", Some("secret"))), 0),
        (Some(("app", None)), 5),
    ];
    for (credentials, code) in cases {
        let (listener, port) = listener().await;
        let broker = tokio::spawn(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.handshake(code).await
        });
        let opened = MqttSink::open(&spec_for(port, 1, credentials), LIMIT).await;
        let connect = broker.await.unwrap();
        assert_eq!(
            connect.username.as_deref(),
            credentials.map(|(u, _)| u),
            "{credentials:?}"
        );
        assert_eq!(
            connect.password.as_deref(),
            credentials.and_then(|(_, p)| p).map(str::as_bytes),
            "{credentials:?}"
        );
        assert!(connect.clean_start);
        match (code, opened) {
            (0, Ok(_)) => {}
            (5, Err(error)) => assert!(error.contains("not authorized"), "{error}"),
            (code, other) => panic!("CONNACK {code} gave {other:?}"),
        }
    }
}

#[tokio::test]
async fn bytes_that_are_not_mqtt_fail_the_batch_instead_of_hanging_it() {
    let (listener, port) = listener().await;
    tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        peer.handshake(0).await;
        peer.publishes(BATCH.len()).await;
        // Packet type 15 with a body: AUTH, which no MQTT 3.1.1 broker sends.
        peer.stream.write_all(&[0xF0, 2, 0, 0]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let mut sink = MqttSink::open(&spec_for(port, 1, None), LIMIT)
        .await
        .unwrap();
    let failure = sink.publish_all(&BATCH, LIMIT).await.unwrap_err();
    assert_eq!(failure.confirmed, 0);
    assert!(failure.error.contains("malformed"), "{failure:?}");
}

#[tokio::test]
async fn a_connection_quiet_past_the_keep_alive_is_started_over_before_it_is_used() {
    let (listener, port) = listener().await;
    let broker = tokio::spawn(async move {
        let mut first = Peer::accept(&listener).await;
        let first_id = first.handshake(0).await.client_id;
        let mut second = Peer::accept(&listener).await;
        let second_id = second.handshake(0).await.client_id;
        let publishes = second.publishes(1).await;
        second.ack([publishes[0].pkid]).await;
        (first_id, second_id, first.packet(Some(Protocol::V3)).await)
    });
    let mut sink = MqttSink::open(&spec_for(port, 1, None), LIMIT)
        .await
        .unwrap();
    sink.quiet_limit = Duration::ZERO;
    assert_eq!(sink.publish_all(&["late"], LIMIT).await, Ok(()));
    drop(sink);
    let (first_id, second_id, on_first) = broker.await.unwrap();
    assert_ne!(
        first_id, second_id,
        "each connection has a client id of its own"
    );
    assert_eq!(on_first, None, "nothing went to the quiet connection");
}

#[test]
fn a_channel_detail_is_checked_when_the_action_is_created() {
    let cases = [
        (json!({"host": "b", "topic": "t"}), Ok((1883, 1))),
        (
            json!({"host": "b", "port": 8883, "topic": "t", "qos": 0}),
            Ok((8883, 0)),
        ),
        (json!({"topic": "t"}), Err("host is required")),
        (
            json!({"host": "b", "topic": "t/#"}),
            Err("without wildcards"),
        ),
        (
            json!({"host": "b", "topic": "t", "qos": 2}),
            Err("qos must be 0 or 1"),
        ),
        (
            json!({"host": "b", "topic": "t", "port": 0}),
            Err("port must be"),
        ),
        (
            json!({"host": "b", "topic": "t", "password": "p"}),
            Err("needs a username"),
        ),
    ];
    for (detail, expected) in cases {
        let parsed = spec(&json!({ "mqtt_forwarding": detail }));
        match (parsed, expected) {
            (Ok(spec), Ok((port, qos))) => assert_eq!((spec.port, spec.qos), (port, qos)),
            (Err(error), Err(part)) => assert!(error.contains(part), "{error}"),
            (other, expected) => panic!("{detail}: {other:?}, expected {expected:?}"),
        }
    }
}

#[tokio::test]
async fn a_connection_the_broker_closed_is_started_over_before_it_is_used() {
    let (listener, port) = listener().await;
    let (closed, was_closed) = tokio::sync::oneshot::channel();
    let broker = tokio::spawn(async move {
        let mut first = Peer::accept(&listener).await;
        first.handshake(0).await;
        drop(first);
        let _ = closed.send(());
        let mut second = Peer::accept(&listener).await;
        second.handshake(0).await;
        second.publishes(BATCH.len()).await
    });
    // QoS 0: nothing read back would have shown the batch went into a closed connection.
    let mut sink = MqttSink::open(&spec_for(port, 0, None), LIMIT)
        .await
        .unwrap();
    was_closed.await.unwrap();
    // The broker's FIN reaches the sink's socket.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(sink.publish_all(&BATCH, LIMIT).await, Ok(()));
    let publishes = tokio::time::timeout(LIMIT, broker)
        .await
        .expect("no second connection: the batch went into the closed one")
        .unwrap();
    assert_eq!(
        publishes.len(),
        BATCH.len(),
        "the batch went to the new connection"
    );
}
