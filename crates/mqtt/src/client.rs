//! The client side of the wire format: what a client sends and how it reads the server's answers.
//! ioda's load generator speaks MQTT through this (pure, like the server codec).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::MqttError;
use crate::codec::{Protocol, QoS, put_varint};

/// A packet a server sends, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerPacket {
    ConnAck {
        code: u8,
    },
    PubAck {
        pkid: u16,
        reason: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    Publish {
        topic: String,
        qos: QoS,
        pkid: u16,
        payload: Bytes,
    },
    PingResp,
    Disconnect {
        reason: u8,
    },
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

fn finish(out: &mut BytesMut, first: u8, body: &[u8]) {
    out.put_u8(first);
    put_varint(out, body.len());
    out.put_slice(body);
}

/// CONNECT with a clean session, username and password.
pub fn encode_connect(
    out: &mut BytesMut,
    protocol: Protocol,
    client_id: &str,
    username: &str,
    password: &str,
    keep_alive: u16,
) {
    encode_connect_as(
        out,
        protocol,
        client_id,
        Some((username, Some(password))),
        keep_alive,
    );
}

/// CONNECT with a clean session and, where given, a username and a password (MQTT has no
/// password without a username).
pub fn encode_connect_as(
    out: &mut BytesMut,
    protocol: Protocol,
    client_id: &str,
    credentials: Option<(&str, Option<&str>)>,
    keep_alive: u16,
) {
    let (username, password) = match credentials {
        Some((username, password)) => (Some(username), password),
        None => (None, None),
    };
    let mut body = BytesMut::with_capacity(
        64 + client_id.len() + username.map_or(0, str::len) + password.map_or(0, str::len),
    );
    put_str(&mut body, b"MQTT");
    body.put_u8(if protocol == Protocol::V5 { 5 } else { 4 });
    let mut flags = 0x02;
    if username.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    body.put_u8(flags);
    body.put_u16(keep_alive);
    if protocol == Protocol::V5 {
        body.put_u8(0);
    }
    put_str(&mut body, client_id.as_bytes());
    for field in [username, password].into_iter().flatten() {
        put_str(&mut body, field.as_bytes());
    }
    finish(out, 0x10, &body);
}

/// SUBSCRIBE to one filter.
pub fn encode_subscribe(out: &mut BytesMut, protocol: Protocol, pkid: u16, filter: &str, qos: QoS) {
    let mut body = BytesMut::new();
    body.put_u16(pkid);
    if protocol == Protocol::V5 {
        body.put_u8(0);
    }
    put_str(&mut body, filter.as_bytes());
    body.put_u8(qos as u8);
    finish(out, 0x82, &body);
}

/// PUBACK for a QoS 1 publish the client received.
pub fn encode_client_puback(out: &mut BytesMut, pkid: u16) {
    out.put_slice(&[0x40, 2]);
    out.put_u16(pkid);
}

pub fn encode_pingreq(out: &mut BytesMut) {
    out.put_slice(&[0xC0, 0]);
}

/// DISCONNECT (normal) in either version.
pub fn encode_client_disconnect(out: &mut BytesMut) {
    out.put_slice(&[0xE0, 0]);
}

fn remaining(buf: &[u8]) -> Result<Option<(usize, usize)>, MqttError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, 2 + i)));
        }
    }
    Err(MqttError::Malformed("remaining length longer than 4 bytes"))
}

fn need(b: &Bytes, n: usize) -> Result<(), MqttError> {
    if b.remaining() < n {
        Err(MqttError::Malformed("truncated"))
    } else {
        Ok(())
    }
}

fn skip_properties(b: &mut Bytes) -> Result<(), MqttError> {
    let mut len = 0usize;
    for i in 0..4 {
        need(b, 1)?;
        let byte = b.get_u8();
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            need(b, len)?;
            b.advance(len);
            return Ok(());
        }
    }
    Err(MqttError::Malformed("property length longer than 4 bytes"))
}

/// Decodes one packet from the server; `Ok(None)` when more bytes are needed.
pub fn decode_server(
    buf: &mut BytesMut,
    protocol: Protocol,
) -> Result<Option<ServerPacket>, MqttError> {
    let Some((len, header)) = remaining(buf)? else {
        return Ok(None);
    };
    if buf.len() < header + len {
        return Ok(None);
    }
    let first = buf[0];
    buf.advance(header);
    let mut b = buf.split_to(len).freeze();
    let v5 = protocol == Protocol::V5;
    let packet = match first >> 4 {
        2 => {
            need(&b, 2)?;
            b.advance(1);
            ServerPacket::ConnAck { code: b.get_u8() }
        }
        3 => {
            let qos = if (first >> 1) & 3 == 1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            need(&b, 2)?;
            let topic_len = usize::from(b.get_u16());
            need(&b, topic_len)?;
            let topic = String::from_utf8_lossy(&b.split_to(topic_len)).into_owned();
            let pkid = if qos == QoS::AtLeastOnce {
                need(&b, 2)?;
                b.get_u16()
            } else {
                0
            };
            if v5 {
                skip_properties(&mut b)?;
            }
            ServerPacket::Publish {
                topic,
                qos,
                pkid,
                payload: b,
            }
        }
        4 => {
            need(&b, 2)?;
            let pkid = b.get_u16();
            let reason = if b.has_remaining() { b.get_u8() } else { 0 };
            ServerPacket::PubAck { pkid, reason }
        }
        9 => {
            need(&b, 2)?;
            let pkid = b.get_u16();
            if v5 {
                skip_properties(&mut b)?;
            }
            ServerPacket::SubAck {
                pkid,
                codes: b.to_vec(),
            }
        }
        13 => ServerPacket::PingResp,
        14 => ServerPacket::Disconnect {
            reason: if b.has_remaining() { b.get_u8() } else { 0 },
        },
        _ => return Err(MqttError::Malformed("packet type not sent by servers")),
    };
    Ok(Some(packet))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, Packet};

    #[test]
    fn client_packets_decode_on_the_server_side() {
        let mut out = BytesMut::new();
        encode_connect(
            &mut out,
            Protocol::V3,
            "dev_0_0_2025041401",
            "dev",
            "pw",
            60,
        );
        let Ok(Some(Packet::Connect(connect))) = codec::decode(&mut out, None, 1024) else {
            panic!("connect")
        };
        assert_eq!(
            (connect.client_id.as_str(), connect.keep_alive),
            ("dev_0_0_2025041401", 60)
        );
        let mut out = BytesMut::new();
        encode_subscribe(&mut out, Protocol::V5, 7, "a/#", QoS::AtLeastOnce);
        let decoded = codec::decode(&mut out, Some(Protocol::V5), 1024);
        assert!(
            matches!(decoded, Ok(Some(Packet::Subscribe { pkid: 7, .. }))),
            "{decoded:?}"
        );
    }

    #[test]
    fn a_connect_carries_exactly_the_credentials_given() {
        let cases: [(Option<(&str, Option<&str>)>, Option<&str>, Option<&[u8]>); 3] = [
            (None, None, None),
            (Some(("user", None)), Some("user"), None),
            (Some(("user", Some("pw"))), Some("user"), Some(b"pw")),
        ];
        for (credentials, username, password) in cases {
            let mut out = BytesMut::new();
            encode_connect_as(&mut out, Protocol::V3, "fwd-1", credentials, 60);
            let Ok(Some(Packet::Connect(connect))) = codec::decode(&mut out, None, 1024) else {
                panic!("connect with {credentials:?}")
            };
            assert_eq!(connect.client_id, "fwd-1");
            assert_eq!(connect.username.as_deref(), username, "{credentials:?}");
            assert_eq!(connect.password.as_deref(), password, "{credentials:?}");
        }
    }

    #[test]
    fn server_packets_decode_on_the_client_side() {
        let mut out = BytesMut::new();
        codec::encode_connack(&mut out, Protocol::V3, 0, None);
        codec::encode_puback(&mut out, Protocol::V5, 9, 0x97);
        codec::encode_suback(&mut out, Protocol::V5, 3, &[1, 0x80]);
        codec::encode_publish(&mut out, Protocol::V5, "t/x", QoS::AtLeastOnce, 4, b"hi");
        codec::encode_pingresp(&mut out);
        let mut got = Vec::new();
        while let Some(p) = decode_server(&mut out, Protocol::V5).unwrap_or(None) {
            got.push(p);
        }
        assert_eq!(
            got,
            vec![
                ServerPacket::ConnAck { code: 0 },
                ServerPacket::PubAck {
                    pkid: 9,
                    reason: 0x97
                },
                ServerPacket::SubAck {
                    pkid: 3,
                    codes: vec![1, 0x80]
                },
                ServerPacket::Publish {
                    topic: "t/x".into(),
                    qos: QoS::AtLeastOnce,
                    pkid: 4,
                    payload: Bytes::from_static(b"hi")
                },
                ServerPacket::PingResp,
            ]
        );
        let mut partial = BytesMut::from(&[0x40u8, 2, 0][..]);
        assert_eq!(decode_server(&mut partial, Protocol::V3), Ok(None));
    }
}
