//! The MQTT wire format: decoding what clients send and encoding what a server answers.
//!
//! Pure: no sockets, no clock. The decoder checks the declared packet size against a limit before
//! buffering the body, so an oversized packet costs no memory.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::MqttError;

/// The protocol level a client connected with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1 (level 3, "MQIsdp") and 3.1.1 (level 4) share every packet layout we need.
    V3,
    V5,
}

/// Quality of service. QoS 2 is not offered (IoTDA does not support it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
}

/// MQTT 5 properties a client may put on CONNECT that the server acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub user_properties: Vec<(String, String)>,
    pub auth_method: Option<String>,
}

/// A CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: Protocol,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub keep_alive: u16,
    pub clean_start: bool,
    /// Whether a Will message was set (IoTDA does not support Wills).
    pub has_will: bool,
    pub properties: ConnectProperties,
}

/// MQTT 5 properties of a PUBLISH that travel with the message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    pub payload_format_utf8: Option<bool>,
    pub message_expiry: Option<u32>,
    pub topic_alias: Option<u16>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

/// A PUBLISH packet, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    /// Zero for QoS 0.
    pub pkid: u16,
    pub payload: Bytes,
    pub properties: PublishProperties,
}

/// One topic filter of a SUBSCRIBE with its requested maximum QoS (0, 1 or 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub filter: String,
    pub qos: u8,
}

/// A packet received from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck {
        pkid: u16,
        reason: u8,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<SubscribeFilter>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
    },
}

/// MQTT 5 reason codes the server sends (MQTT 3.1.1 uses the CONNACK subset 0–5).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const UNSUPPORTED_VERSION: u8 = 0x84;
    pub const CLIENT_ID_INVALID: u8 = 0x85;
    pub const BAD_CREDENTIALS: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEPALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
}

type Result<T> = std::result::Result<T, MqttError>;

fn malformed(what: &'static str) -> MqttError {
    MqttError::Malformed(what)
}

/// Reads the fixed header's remaining length; `Ok(None)` when more bytes are needed.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>> {
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
    Err(malformed("remaining length longer than 4 bytes"))
}

/// Decodes one packet from `buf`, consuming it; `Ok(None)` when the packet is not complete yet.
///
/// `protocol` is `None` until CONNECT has been read; `max_size` bounds the whole packet.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Option<Protocol>,
    max_size: usize,
) -> Result<Option<Packet>> {
    // Judge the packet type from its first byte, so a client speaking another protocol (or
    // skipping CONNECT) is refused at once instead of after its claimed length has arrived.
    match (buf.first().map(|b| b >> 4), protocol) {
        (None, _) => return Ok(None),
        (Some(1), None) => {}
        (Some(_), None) => return Err(MqttError::Violation("first packet must be CONNECT")),
        (Some(0), Some(_)) => return Err(malformed("reserved packet type 0")),
        _ => {}
    }
    let Some((len, header_len)) = remaining_length(buf)? else {
        return Ok(None);
    };
    let total = header_len + len;
    if total > max_size {
        return Err(MqttError::PacketTooLarge {
            size: total,
            limit: max_size,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let first = buf[0];
    buf.advance(header_len);
    let mut body = buf.split_to(len).freeze();
    let v5 = protocol == Some(Protocol::V5);
    let packet = match (first >> 4, protocol) {
        (1, None) => Packet::Connect(Box::new(decode_connect(&mut body)?)),
        (1, Some(_)) => return Err(MqttError::Violation("second CONNECT")),
        (_, None) => return Err(MqttError::Violation("first packet must be CONNECT")),
        (3, Some(_)) => Packet::Publish(decode_publish(first, body, v5)?),
        (4, Some(_)) => decode_puback(&mut body, v5)?,
        (8, Some(_)) => decode_subscribe(first, &mut body, v5)?,
        (10, Some(_)) => decode_unsubscribe(first, &mut body, v5)?,
        (12, Some(_)) => Packet::PingReq,
        (14, Some(_)) => Packet::Disconnect {
            reason: if v5 && body.has_remaining() {
                body.get_u8()
            } else {
                0
            },
        },
        (5..=7, Some(_)) => return Err(MqttError::Violation("QoS 2 is not supported")),
        (15, Some(_)) => return Err(MqttError::Violation("AUTH is not supported")),
        _ => return Err(malformed("packet type not sent by clients")),
    };
    Ok(Some(packet))
}

fn u8_of(b: &mut Bytes) -> Result<u8> {
    if b.remaining() < 1 {
        return Err(malformed("truncated"));
    }
    Ok(b.get_u8())
}

fn u16_of(b: &mut Bytes) -> Result<u16> {
    if b.remaining() < 2 {
        return Err(malformed("truncated"));
    }
    Ok(b.get_u16())
}

fn u32_of(b: &mut Bytes) -> Result<u32> {
    if b.remaining() < 4 {
        return Err(malformed("truncated"));
    }
    Ok(b.get_u32())
}

fn varint_of(b: &mut Bytes) -> Result<usize> {
    let mut value = 0usize;
    for i in 0..4 {
        let byte = u8_of(b)?;
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("variable byte integer longer than 4 bytes"))
}

fn binary_of(b: &mut Bytes) -> Result<Bytes> {
    let len = usize::from(u16_of(b)?);
    if b.remaining() < len {
        return Err(malformed("truncated"));
    }
    Ok(b.split_to(len))
}

fn string_of(b: &mut Bytes) -> Result<String> {
    let raw = binary_of(b)?;
    let s = std::str::from_utf8(&raw).map_err(|_| malformed("string is not UTF-8"))?;
    if s.contains('\0') {
        return Err(malformed("string contains NUL"));
    }
    Ok(s.to_owned())
}

/// One MQTT 5 property, decoded by the type its identifier prescribes.
enum Prop {
    Byte(u8, u8),
    Short(u8, u16),
    Int(u8, u32),
    Str(u8, String),
    Bin(u8, Bytes),
    Pair(String, String),
}

fn properties_of(b: &mut Bytes) -> Result<Vec<Prop>> {
    let len = varint_of(b)?;
    if b.remaining() < len {
        return Err(malformed("truncated properties"));
    }
    let mut block = b.split_to(len);
    let mut props = Vec::new();
    while block.has_remaining() {
        let id = u8_of(&mut block)?;
        let prop = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                Prop::Byte(id, u8_of(&mut block)?)
            }
            0x13 | 0x21 | 0x22 | 0x23 => Prop::Short(id, u16_of(&mut block)?),
            0x02 | 0x11 | 0x18 | 0x27 => Prop::Int(id, u32_of(&mut block)?),
            0x0B => Prop::Int(id, varint_of(&mut block)? as u32),
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => Prop::Str(id, string_of(&mut block)?),
            0x09 | 0x16 => Prop::Bin(id, binary_of(&mut block)?),
            0x26 => Prop::Pair(string_of(&mut block)?, string_of(&mut block)?),
            _ => return Err(malformed("unknown property identifier")),
        };
        props.push(prop);
    }
    Ok(props)
}

fn decode_connect(b: &mut Bytes) -> Result<Connect> {
    let name = string_of(b)?;
    let level = u8_of(b)?;
    let protocol = match (name.as_str(), level) {
        ("MQTT", 4) | ("MQIsdp", 3) => Protocol::V3,
        ("MQTT", 5) => Protocol::V5,
        ("MQTT" | "MQIsdp", other) => return Err(MqttError::UnsupportedProtocol(other)),
        _ => return Err(malformed("unknown protocol name")),
    };
    let flags = u8_of(b)?;
    if flags & 0x01 != 0 {
        return Err(malformed("reserved CONNECT flag set"));
    }
    let keep_alive = u16_of(b)?;
    let mut properties = ConnectProperties::default();
    if protocol == Protocol::V5 {
        for prop in properties_of(b)? {
            match prop {
                Prop::Int(0x11, v) => properties.session_expiry = Some(v),
                Prop::Short(0x21, v) => properties.receive_maximum = Some(v),
                Prop::Int(0x27, v) => properties.maximum_packet_size = Some(v),
                Prop::Pair(k, v) => properties.user_properties.push((k, v)),
                Prop::Str(0x15, v) => properties.auth_method = Some(v),
                _ => {}
            }
        }
    }
    let client_id = string_of(b)?;
    let has_will = flags & 0x04 != 0;
    if has_will {
        if protocol == Protocol::V5 {
            properties_of(b)?;
        }
        string_of(b)?;
        binary_of(b)?;
    }
    let username = if flags & 0x80 != 0 {
        Some(string_of(b)?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(binary_of(b)?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        client_id,
        username,
        password,
        keep_alive,
        clean_start: flags & 0x02 != 0,
        has_will,
        properties,
    })
}

fn decode_publish(first: u8, mut b: Bytes, v5: bool) -> Result<Publish> {
    let qos = match (first >> 1) & 0x03 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => return Err(MqttError::Violation("QoS 2 is not supported")),
        _ => return Err(malformed("QoS 3")),
    };
    let topic = string_of(&mut b)?;
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        u16_of(&mut b)?
    };
    if qos != QoS::AtMostOnce && pkid == 0 {
        return Err(malformed("packet identifier 0"));
    }
    let mut properties = PublishProperties::default();
    if v5 {
        for prop in properties_of(&mut b)? {
            match prop {
                Prop::Byte(0x01, v) => properties.payload_format_utf8 = Some(v == 1),
                Prop::Int(0x02, v) => properties.message_expiry = Some(v),
                Prop::Short(0x23, v) => properties.topic_alias = Some(v),
                Prop::Str(0x08, v) => properties.response_topic = Some(v),
                Prop::Bin(0x09, v) => properties.correlation_data = Some(v),
                Prop::Pair(k, v) => properties.user_properties.push((k, v)),
                Prop::Str(0x03, v) => properties.content_type = Some(v),
                _ => {}
            }
        }
    }
    if topic.contains(['+', '#']) {
        return Err(malformed("wildcard in a PUBLISH topic"));
    }
    Ok(Publish {
        dup: first & 0x08 != 0,
        qos,
        retain: first & 0x01 != 0,
        topic,
        pkid,
        payload: b,
        properties,
    })
}

fn decode_puback(b: &mut Bytes, v5: bool) -> Result<Packet> {
    let pkid = u16_of(b)?;
    let reason = if v5 && b.has_remaining() {
        u8_of(b)?
    } else {
        0
    };
    Ok(Packet::PubAck { pkid, reason })
}

fn decode_subscribe(first: u8, b: &mut Bytes, v5: bool) -> Result<Packet> {
    if first & 0x0f != 0x02 {
        return Err(malformed("SUBSCRIBE flags must be 0010"));
    }
    let pkid = u16_of(b)?;
    if v5 {
        properties_of(b)?;
    }
    let mut filters = Vec::new();
    while b.has_remaining() {
        let filter = string_of(b)?;
        let options = u8_of(b)?;
        filters.push(SubscribeFilter {
            filter,
            qos: options & 0x03,
        });
    }
    if filters.is_empty() {
        return Err(malformed("SUBSCRIBE without filters"));
    }
    Ok(Packet::Subscribe { pkid, filters })
}

fn decode_unsubscribe(first: u8, b: &mut Bytes, v5: bool) -> Result<Packet> {
    if first & 0x0f != 0x02 {
        return Err(malformed("UNSUBSCRIBE flags must be 0010"));
    }
    let pkid = u16_of(b)?;
    if v5 {
        properties_of(b)?;
    }
    let mut filters = Vec::new();
    while b.has_remaining() {
        filters.push(string_of(b)?);
    }
    if filters.is_empty() {
        return Err(malformed("UNSUBSCRIBE without filters"));
    }
    Ok(Packet::Unsubscribe { pkid, filters })
}

pub(crate) fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_header(out: &mut BytesMut, first: u8, len: usize) {
    out.put_u8(first);
    put_varint(out, len);
}

/// Server limits announced in an MQTT 5 CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
}

/// CONNACK. `code` is a 3.1.1 return code (0–5) or an MQTT 5 reason code, per `protocol`.
pub fn encode_connack(
    out: &mut BytesMut,
    protocol: Protocol,
    code: u8,
    limits: Option<ServerLimits>,
) {
    match protocol {
        Protocol::V3 => {
            put_header(out, 0x20, 2);
            out.put_slice(&[0, code]);
        }
        Protocol::V5 => {
            let mut props = BytesMut::new();
            if let Some(l) = limits.filter(|_| code == reason::SUCCESS) {
                props.put_u8(0x21);
                props.put_u16(l.receive_maximum);
                props.put_u8(0x24); // Maximum QoS: 1.
                props.put_u8(1);
                props.put_u8(0x25); // Retain not available.
                props.put_u8(0);
                props.put_u8(0x27);
                props.put_u32(l.maximum_packet_size);
                props.put_u8(0x2A); // Shared subscriptions not available.
                props.put_u8(0);
            }
            let mut prop_len = BytesMut::new();
            put_varint(&mut prop_len, props.len());
            put_header(out, 0x20, 2 + prop_len.len() + props.len());
            out.put_slice(&[0, code]);
            out.put_slice(&prop_len);
            out.put_slice(&props);
        }
    }
}

/// PUBLISH from the server (properties are not forwarded on downlinks yet).
pub fn encode_publish(
    out: &mut BytesMut,
    protocol: Protocol,
    topic: &str,
    qos: QoS,
    pkid: u16,
    payload: &[u8],
) {
    let len = publish_remaining_len(protocol, topic, qos, payload.len());
    put_header(out, 0x30 | ((qos as u8) << 1), len);
    put_str(out, topic);
    if qos != QoS::AtMostOnce {
        out.put_u16(pkid);
    }
    if protocol == Protocol::V5 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

/// The remaining length of the PUBLISH `encode_publish` writes.
fn publish_remaining_len(protocol: Protocol, topic: &str, qos: QoS, payload_len: usize) -> usize {
    let id_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let props_len = usize::from(protocol == Protocol::V5);
    2 + topic.len() + id_len + props_len + payload_len
}

/// The full size on the wire of the PUBLISH `encode_publish` would write, fixed header included,
/// so the server can honour a client's MQTT 5 Maximum Packet Size before encoding.
pub fn publish_packet_size(protocol: Protocol, topic: &str, qos: QoS, payload_len: usize) -> usize {
    let remaining = publish_remaining_len(protocol, topic, qos, payload_len);
    let varint_len = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + varint_len + remaining
}

/// PUBACK; MQTT 3.1.1 cannot carry a reason, so `reason` is only sent to MQTT 5 clients.
pub fn encode_puback(out: &mut BytesMut, protocol: Protocol, pkid: u16, reason: u8) {
    if protocol == Protocol::V5 && reason != reason::SUCCESS {
        put_header(out, 0x40, 3);
        out.put_u16(pkid);
        out.put_u8(reason);
    } else {
        put_header(out, 0x40, 2);
        out.put_u16(pkid);
    }
}

/// SUBACK with one code per filter (granted QoS, or 0x80 / an MQTT 5 failure reason).
pub fn encode_suback(out: &mut BytesMut, protocol: Protocol, pkid: u16, codes: &[u8]) {
    let props_len = usize::from(protocol == Protocol::V5);
    put_header(out, 0x90, 2 + props_len + codes.len());
    out.put_u16(pkid);
    if protocol == Protocol::V5 {
        out.put_u8(0);
    }
    out.put_slice(codes);
}

/// UNSUBACK; MQTT 5 carries one reason per filter.
pub fn encode_unsuback(out: &mut BytesMut, protocol: Protocol, pkid: u16, count: usize) {
    match protocol {
        Protocol::V3 => {
            put_header(out, 0xB0, 2);
            out.put_u16(pkid);
        }
        Protocol::V5 => {
            put_header(out, 0xB0, 3 + count);
            out.put_u16(pkid);
            out.put_u8(0);
            out.put_bytes(reason::SUCCESS, count);
        }
    }
}

pub fn encode_pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xD0, 0x00]);
}

/// DISCONNECT from the server: MQTT 5 only (a 3.1.1 server just closes the connection).
/// The empty property length is written out although the spec allows leaving it off, because some
/// clients (rumqttc among them) require it.
pub fn encode_disconnect(out: &mut BytesMut, reason: u8) {
    put_header(out, 0xE0, 2);
    out.put_u8(reason);
    out.put_u8(0);
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
