//! Tables of packets the codec must decode, refuse and encode.
use super::*;

fn decode_all(bytes: &[u8], protocol: Option<Protocol>) -> Result<Option<Packet>> {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, protocol, 1024)
}

fn connect_v311(client_id: &str, user: &str, pass: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = BytesMut::new();
    put_str(&mut body, "MQTT");
    body.put_u8(4);
    body.put_u8(0xC2);
    body.put_u16(keep_alive);
    put_str(&mut body, client_id);
    put_str(&mut body, user);
    put_str(&mut body, pass);
    let mut out = BytesMut::new();
    put_header(&mut out, 0x10, body.len());
    out.put_slice(&body);
    out.to_vec()
}

#[test]
fn decodes_a_311_connect() {
    let bytes = connect_v311("dev_0_0_2025041401", "dev", "pw", 120);
    let Ok(Some(Packet::Connect(c))) = decode_all(&bytes, None) else {
        panic!("no connect")
    };
    assert_eq!(c.protocol, Protocol::V3);
    assert_eq!(c.client_id, "dev_0_0_2025041401");
    assert_eq!(c.username.as_deref(), Some("dev"));
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
    assert_eq!(c.keep_alive, 120);
    assert!(c.clean_start);
}

#[test]
fn waits_for_partial_packets() {
    let bytes = connect_v311("c", "u", "p", 60);
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(decode(&mut buf, None, 1024), Ok(None), "cut at {cut}");
    }
}

#[test]
fn decode_table() {
    let v3 = Some(Protocol::V3);
    let v5 = Some(Protocol::V5);
    let cases: Vec<(&str, Vec<u8>, Option<Protocol>, Result<Option<Packet>>)> = vec![
        ("pingreq", vec![0xC0, 0], v3, Ok(Some(Packet::PingReq))),
        (
            "disconnect v3",
            vec![0xE0, 0],
            v3,
            Ok(Some(Packet::Disconnect { reason: 0 })),
        ),
        (
            "disconnect v5 reason",
            vec![0xE0, 1, 0x04],
            v5,
            Ok(Some(Packet::Disconnect { reason: 4 })),
        ),
        (
            "puback",
            vec![0x40, 2, 0, 7],
            v3,
            Ok(Some(Packet::PubAck { pkid: 7, reason: 0 })),
        ),
        (
            "publish qos1",
            vec![0x32, 7, 0, 3, b'a', b'/', b'b', 0, 9],
            v3,
            Ok(Some(Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "a/b".into(),
                pkid: 9,
                payload: Bytes::new(),
                properties: PublishProperties::default(),
            }))),
        ),
        (
            "subscribe",
            vec![0x82, 6, 0, 1, 0, 1, b'#', 1],
            v3,
            Ok(Some(Packet::Subscribe {
                pkid: 1,
                filters: vec![SubscribeFilter {
                    filter: "#".into(),
                    qos: 1,
                }],
            })),
        ),
        (
            "publish before connect",
            vec![0x30, 3, 0, 1, b'a'],
            None,
            Err(MqttError::Violation("first packet must be CONNECT")),
        ),
        (
            "qos 2 publish",
            vec![0x34, 5, 0, 1, b'a', 0, 1],
            v3,
            Err(MqttError::Violation("QoS 2 is not supported")),
        ),
        (
            "qos 3 publish",
            vec![0x36, 5, 0, 1, b'a', 0, 1],
            v3,
            Err(MqttError::Malformed("QoS 3")),
        ),
        (
            "pkid zero",
            vec![0x32, 5, 0, 1, b'a', 0, 0],
            v3,
            Err(MqttError::Malformed("packet identifier 0")),
        ),
        (
            "wildcard topic",
            vec![0x30, 3, 0, 1, b'#'],
            v3,
            Err(MqttError::Malformed("wildcard in a PUBLISH topic")),
        ),
        (
            "truncated string",
            vec![0x30, 2, 0, 9],
            v3,
            Err(MqttError::Malformed("truncated")),
        ),
        (
            "bad utf8",
            vec![0x30, 3, 0, 1, 0xff],
            v3,
            Err(MqttError::Malformed("string is not UTF-8")),
        ),
        (
            "bad sub flags",
            vec![0x80, 6, 0, 1, 0, 1, b'#', 1],
            v3,
            Err(MqttError::Malformed("SUBSCRIBE flags must be 0010")),
        ),
        (
            "empty subscribe",
            vec![0x82, 2, 0, 1],
            v3,
            Err(MqttError::Malformed("SUBSCRIBE without filters")),
        ),
        (
            "second connect",
            vec![0x10, 0],
            v3,
            Err(MqttError::Violation("second CONNECT")),
        ),
        (
            "auth",
            vec![0xF0, 0],
            v5,
            Err(MqttError::Violation("AUTH is not supported")),
        ),
        (
            "connack from client",
            vec![0x20, 2, 0, 0],
            v3,
            Err(MqttError::Malformed("packet type not sent by clients")),
        ),
        (
            "5-byte length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            v3,
            Err(MqttError::Malformed("remaining length longer than 4 bytes")),
        ),
        (
            "bad property",
            vec![0x30, 5, 0, 1, b'a', 1, 0x7f],
            v5,
            Err(MqttError::Malformed("unknown property identifier")),
        ),
    ];
    for (name, bytes, protocol, want) in cases {
        assert_eq!(decode_all(&bytes, protocol), want, "{name}");
    }
}

#[test]
fn refuses_oversize_before_buffering() {
    let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x7f][..]);
    assert_eq!(
        decode(&mut buf, Some(Protocol::V3), 1024),
        Err(MqttError::PacketTooLarge {
            size: 2_097_155,
            limit: 1024
        })
    );
}

#[test]
fn decodes_v5_publish_properties() {
    let mut body = BytesMut::new();
    put_str(&mut body, "t");
    body.put_u16(3);
    let mut props = BytesMut::new();
    props.put_u8(0x08);
    put_str(&mut props, "resp");
    props.put_u8(0x09);
    props.put_u16(2);
    props.put_slice(b"42");
    props.put_u8(0x26);
    put_str(&mut props, "k");
    put_str(&mut props, "v");
    put_varint(&mut body, props.len());
    body.put_slice(&props);
    body.put_slice(b"hi");
    let mut out = BytesMut::new();
    put_header(&mut out, 0x32, body.len());
    out.put_slice(&body);
    let Ok(Some(Packet::Publish(p))) = decode_all(&out, Some(Protocol::V5)) else {
        panic!("no publish")
    };
    assert_eq!(p.payload, Bytes::from_static(b"hi"));
    assert_eq!(p.properties.response_topic.as_deref(), Some("resp"));
    assert_eq!(
        p.properties.correlation_data,
        Some(Bytes::from_static(b"42"))
    );
    assert_eq!(
        p.properties.user_properties,
        vec![("k".to_owned(), "v".to_owned())]
    );
}

#[test]
fn encodes_server_packets() {
    type Encoder = Box<dyn Fn(&mut BytesMut)>;
    let cases: Vec<(&str, Encoder, Vec<u8>)> = vec![
        (
            "connack v3",
            Box::new(|o| encode_connack(o, Protocol::V3, 4, None)),
            vec![0x20, 2, 0, 4],
        ),
        (
            "connack v5 refused",
            Box::new(|o| encode_connack(o, Protocol::V5, 0x86, None)),
            vec![0x20, 3, 0, 0x86, 0],
        ),
        (
            "puback v3",
            Box::new(|o| encode_puback(o, Protocol::V3, 5, 0x87)),
            vec![0x40, 2, 0, 5],
        ),
        (
            "puback v5 reason",
            Box::new(|o| encode_puback(o, Protocol::V5, 5, 0x87)),
            vec![0x40, 3, 0, 5, 0x87],
        ),
        (
            "suback v3",
            Box::new(|o| encode_suback(o, Protocol::V3, 1, &[1, 0x80])),
            vec![0x90, 4, 0, 1, 1, 0x80],
        ),
        (
            "suback v5",
            Box::new(|o| encode_suback(o, Protocol::V5, 1, &[0x87])),
            vec![0x90, 4, 0, 1, 0, 0x87],
        ),
        (
            "unsuback v5",
            Box::new(|o| encode_unsuback(o, Protocol::V5, 2, 2)),
            vec![0xB0, 5, 0, 2, 0, 0, 0],
        ),
        ("pingresp", Box::new(encode_pingresp), vec![0xD0, 0]),
        (
            "disconnect",
            Box::new(|o| encode_disconnect(o, 0x8E)),
            vec![0xE0, 2, 0x8E, 0],
        ),
        (
            "publish qos1 v5",
            Box::new(|o| encode_publish(o, Protocol::V5, "a", QoS::AtLeastOnce, 3, b"x")),
            vec![0x32, 7, 0, 1, b'a', 0, 3, 0, b'x'],
        ),
    ];
    for (name, encode, want) in cases {
        let mut out = BytesMut::new();
        encode(&mut out);
        assert_eq!(out.to_vec(), want, "{name}");
    }
}

#[test]
fn publish_packet_size_matches_the_encoded_length() {
    // Payload lengths either side of each remaining-length varint boundary.
    let cases = [
        (Protocol::V3, QoS::AtMostOnce, 0),
        (Protocol::V3, QoS::AtLeastOnce, 120),
        (Protocol::V5, QoS::AtLeastOnce, 121),
        (Protocol::V5, QoS::AtMostOnce, 16_370),
        (Protocol::V3, QoS::AtLeastOnce, 16_380),
        (Protocol::V5, QoS::AtLeastOnce, 2_097_140),
    ];
    for (protocol, qos, payload_len) in cases {
        let payload = vec![7u8; payload_len];
        let mut out = BytesMut::new();
        encode_publish(&mut out, protocol, "t/ab", qos, 9, &payload);
        assert_eq!(
            publish_packet_size(protocol, "t/ab", qos, payload_len),
            out.len(),
            "{protocol:?} {qos:?} payload {payload_len}"
        );
    }
}
