//! The LwM2M server side IoTDA uses, as pure functions over CoAP packets: registration, update
//! and de-registration on `/rd`, the observation of `/19/0/0` (uplink data) and writes to
//! `/19/1/0` (downlink data).

use coap_lite::{CoapOption, ContentFormat, MessageClass, Packet, RequestType, ResponseType};

/// What a registration (`POST /rd?ep=..&lt=..&b=..`) or an update carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The endpoint name: the device's node id (`urn:imei:` prefixes are removed).
    pub endpoint: String,
    /// Seconds the registration lasts without an update.
    pub lifetime_s: u64,
    /// The binding: `U`, or `UQ` for queue mode (the device sleeps between its messages).
    pub binding: String,
    /// The LwM2M version the device speaks, when it says.
    pub version: Option<String>,
    /// The objects the device offers (`</19/0>,</19/1>` …).
    pub objects: Vec<String>,
    /// The PSK identity the peer proved over DTLS (`None` over plain CoAP).
    pub identity: Option<String>,
}

impl Registration {
    /// Whether the device is reachable only just after it talks (LwM2M queue mode).
    pub fn queue_mode(&self) -> bool {
        self.binding.contains('Q')
    }
}

/// What an `/rd` request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdRequest {
    Register(Registration),
    /// `POST /rd/{location}`, with a new lifetime or binding if given.
    Update {
        location: String,
        lifetime_s: Option<u64>,
        binding: Option<String>,
    },
    /// `DELETE /rd/{location}`.
    Deregister {
        location: String,
    },
}

/// The longest lifetime accepted (ten years): beyond, milliseconds would not fit the clock.
pub const MAX_LIFETIME_S: u64 = 10 * 365 * 86_400;

/// LwM2M's default lifetime when a registration gives none.
pub const DEFAULT_LIFETIME_S: u64 = 86_400;

/// The path of a request.
pub fn path(packet: &Packet) -> Vec<String> {
    packet
        .get_option(CoapOption::UriPath)
        .map(|parts| {
            parts
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn queries(packet: &Packet) -> Vec<(String, String)> {
    packet
        .get_option(CoapOption::UriQuery)
        .map(|parts| {
            parts
                .iter()
                .map(|q| {
                    let q = String::from_utf8_lossy(q);
                    match q.split_once('=') {
                        Some((k, v)) => (k.to_owned(), v.to_owned()),
                        None => (q.into_owned(), String::new()),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads an `/rd` request; the error is the reason for a 4.00 Bad Request.
pub fn parse_rd(packet: &Packet) -> Result<RdRequest, String> {
    let path = path(packet);
    let query = queries(packet);
    let get = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let lifetime = |v: Option<String>| -> Result<Option<u64>, String> {
        v.map(|v| {
            v.parse::<u64>()
                .ok()
                .filter(|l| (1..=MAX_LIFETIME_S).contains(l))
                .ok_or_else(|| format!("lt={v} is not a lifetime in seconds"))
        })
        .transpose()
    };
    match (&packet.header.code, path.as_slice()) {
        (MessageClass::Request(RequestType::Post), [rd]) if rd == "rd" => {
            let endpoint = get("ep")
                .filter(|e| !e.is_empty())
                .ok_or("registration needs ep=<node id>")?;
            let endpoint = endpoint
                .strip_prefix("urn:imei:")
                .unwrap_or(&endpoint)
                .to_owned();
            let payload = String::from_utf8_lossy(&packet.payload);
            Ok(RdRequest::Register(Registration {
                endpoint,
                lifetime_s: lifetime(get("lt"))?.unwrap_or(DEFAULT_LIFETIME_S),
                binding: get("b").unwrap_or_else(|| "U".to_owned()),
                version: get("lwm2m"),
                objects: payload
                    .split(',')
                    .filter_map(|link| link.trim().strip_prefix('<')?.split('>').next())
                    .map(str::to_owned)
                    .collect(),
                identity: None,
            }))
        }
        (MessageClass::Request(RequestType::Post), [rd, location]) if rd == "rd" => {
            Ok(RdRequest::Update {
                location: location.clone(),
                lifetime_s: lifetime(get("lt"))?,
                binding: get("b"),
            })
        }
        (MessageClass::Request(RequestType::Delete), [rd, location]) if rd == "rd" => {
            Ok(RdRequest::Deregister {
                location: location.clone(),
            })
        }
        _ => Err(format!("no such LwM2M resource: /{}", path.join("/"))),
    }
}

/// Critical options (odd numbers, RFC 7252 §5.4.1) this server understands or safely ignores:
/// If-Match, Uri-Host, If-None-Match, Uri-Port, Uri-Path, Uri-Query, Accept, Block2, Block1.
const UNDERSTOOD_CRITICAL: &[u16] = &[1, 3, 5, 7, 11, 15, 17, 23, 27];

/// A critical option the request carries that this server does not understand; such a request
/// is answered 4.02 Bad Option rather than half understood.
pub fn unknown_critical_option(packet: &Packet) -> Option<u16> {
    packet
        .options()
        .map(|(number, _)| *number)
        .find(|n| n % 2 == 1 && !UNDERSTOOD_CRITICAL.contains(n))
}

/// A response with a code and, for a registration, its location (`/rd/{endpoint}`).
pub fn response(code: ResponseType, location: Option<&str>) -> Packet {
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Response(code);
    if let Some(location) = location {
        packet.add_option(CoapOption::LocationPath, b"rd".to_vec());
        packet.add_option(CoapOption::LocationPath, location.as_bytes().to_vec());
    }
    packet
}

/// `GET /19/0/0` with `Observe: 0`: the observation that carries the device's data.
pub fn observe_data() -> Packet {
    let mut packet = request(RequestType::Get, &["19", "0", "0"]);
    packet.set_observe_value(0);
    packet.add_option(CoapOption::Accept, vec![42]);
    packet
}

/// `PUT /19/1/0` with opaque bytes: data for the device (a command, a message, a report's answer).
pub fn write_data(payload: Vec<u8>) -> Packet {
    let mut packet = request(RequestType::Put, &["19", "1", "0"]);
    packet.set_content_format(ContentFormat::ApplicationOctetStream);
    packet.payload = payload;
    packet
}

fn request(method: RequestType, path: &[&str]) -> Packet {
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Request(method);
    for part in path {
        packet.add_option(CoapOption::UriPath, part.as_bytes().to_vec());
    }
    packet
}
