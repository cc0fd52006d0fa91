//! MQTT_FORWARDING: publish messages to a topic on an external MQTT broker (MQTT 3.1.1), at QoS 1
//! (a message counts once the broker's PUBACK for it is read) or QoS 0 (once written).
//!
//! Spoken with the client half of ioda's own MQTT codec, not a client library: a lane's batch is
//! known up front, so it goes out in one write and its PUBACKs are taken in whatever order the
//! broker sends them. rumqttc, used here before, wrote and flushed every publish on its own and
//! was driven one publish-and-PUBACK round trip at a time: 12 000 messages/s at most to a
//! Mosquitto on the same machine, about twice that now (BENCHMARKS.md).

use std::time::{Duration, Instant};

use bytes::BytesMut;
use ioda_mqtt::client::{ServerPacket, decode_server, encode_connect_as};
use ioda_mqtt::codec::{Protocol, QoS, encode_publish};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::connector::BatchFailure;

/// Where and how to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSpec {
    pub host: String,
    pub port: u16,
    pub topic: String,
    pub qos: u8,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Reads `channel_detail.mqtt_forwarding`.
pub fn spec(detail: &Value) -> Result<MqttSpec, String> {
    let d = detail
        .get("mqtt_forwarding")
        .ok_or("channel_detail.mqtt_forwarding is required")?;
    let text = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
    let host = text("host")
        .filter(|h| !h.is_empty())
        .ok_or("mqtt_forwarding.host is required")?;
    let port = d.get("port").and_then(Value::as_u64).unwrap_or(1883);
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or("mqtt_forwarding.port must be 1 to 65535")?;
    let topic = text("topic")
        .filter(|t| !t.is_empty() && !t.contains(['+', '#']))
        .ok_or("mqtt_forwarding.topic must be a topic name without wildcards")?;
    let qos = d.get("qos").and_then(Value::as_u64).unwrap_or(1);
    if qos > 1 {
        return Err("mqtt_forwarding.qos must be 0 or 1".into());
    }
    let username = text("username");
    let password = text("password");
    if password.is_some() && username.is_none() {
        return Err(
            "mqtt_forwarding.password needs a username (MQTT has no password alone)".into(),
        );
    }
    for (field, value) in [
        ("topic", Some(&topic)),
        ("username", username.as_ref()),
        ("password", password.as_ref()),
    ] {
        if value.is_some_and(|v| v.len() > usize::from(u16::MAX)) {
            return Err(format!(
                "mqtt_forwarding.{field} is longer than MQTT's 65 535 bytes"
            ));
        }
    }
    Ok(MqttSpec {
        host,
        port,
        topic,
        qos: qos as u8,
        username,
        password,
    })
}

/// The keep-alive asked for. The connection is written to only when there is something to
/// forward, so a quiet one is started over rather than kept with pings (`QUIET_LIMIT`).
const KEEP_ALIVE_SECONDS: u16 = 60;
/// A connection quiet this long is started over before it is used: the broker closes it after
/// one and a half keep-alives without a packet, and a batch written into a closed connection
/// would fail and wait for its retry.
const QUIET_LIMIT: Duration = Duration::from_secs(45);
/// Bytes a look at a connection's pending input takes at a time (see `closed_by_broker`).
const LOOK_CHUNK: usize = 256;
/// The largest packet taken from the broker: it sends CONNACK, PUBACK and PINGRESP, nothing near
/// this; more is a broker that is not speaking MQTT to us, and the connection is given up.
const MAX_BROKER_PACKET: usize = 64 * 1024;

/// A live connection to the broker.
pub struct MqttSink {
    spec: MqttSpec,
    stream: TcpStream,
    read: BytesMut,
    out: BytesMut,
    next_pkid: u16,
    last_used: Instant,
    /// `QUIET_LIMIT`, but for tests.
    quiet_limit: Duration,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink")
            .field("spec", &self.spec)
            .finish()
    }
}

impl MqttSink {
    /// Connects and waits for a successful CONNACK.
    pub async fn open(spec: &MqttSpec, timeout: Duration) -> Result<MqttSink, String> {
        tokio::time::timeout(timeout, MqttSink::connect(spec))
            .await
            .map_err(|_| format!("MQTT broker {}:{} did not answer", spec.host, spec.port))?
    }

    async fn connect(spec: &MqttSpec) -> Result<MqttSink, String> {
        let broker = format!("MQTT broker {}:{}", spec.host, spec.port);
        let stream = TcpStream::connect((spec.host.as_str(), spec.port))
            .await
            .map_err(|e| format!("{broker}: {e}"))?;
        // Each batch is one write; nothing is gained by holding its tail back.
        stream
            .set_nodelay(true)
            .map_err(|e| format!("{broker}: {e}"))?;
        let mut sink = MqttSink {
            spec: spec.clone(),
            stream,
            read: BytesMut::with_capacity(256),
            out: BytesMut::with_capacity(256),
            next_pkid: 0,
            last_used: Instant::now(),
            quiet_limit: QUIET_LIMIT,
        };
        let credentials = spec
            .username
            .as_deref()
            .map(|user| (user, spec.password.as_deref()));
        encode_connect_as(
            &mut sink.out,
            Protocol::V3,
            &client_id(),
            credentials,
            KEEP_ALIVE_SECONDS,
        );
        sink.write().await.map_err(|e| format!("{broker}: {e}"))?;
        match sink
            .next_packet()
            .await
            .map_err(|e| format!("{broker}: {e}"))?
        {
            ServerPacket::ConnAck { code: 0 } => Ok(sink),
            ServerPacket::ConnAck { code } => Err(format!(
                "{broker} refused the connection: {}",
                connack_refusal(code)
            )),
            other => Err(format!("{broker} answered CONNECT with {other:?}")),
        }
    }

    /// Publishes `payloads` in order, all in one write, and confirms them (QoS 1: by their
    /// PUBACKs, taken in any order; the messages before the first one not acknowledged when the
    /// connection fails count as delivered).
    pub async fn publish_all(
        &mut self,
        payloads: &[&str],
        timeout: Duration,
    ) -> Result<(), BatchFailure> {
        let mut confirmed = 0;
        let work = self.send_and_confirm(payloads, &mut confirmed);
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(BatchFailure { confirmed, error }),
            Err(_) => Err(BatchFailure {
                confirmed,
                error: "MQTT broker did not acknowledge in time".to_owned(),
            }),
        }
    }

    async fn send_and_confirm(
        &mut self,
        payloads: &[&str],
        confirmed: &mut usize,
    ) -> Result<(), String> {
        if self.last_used.elapsed() >= self.quiet_limit || self.closed_by_broker() {
            let quiet_limit = self.quiet_limit;
            *self = MqttSink::connect(&self.spec).await?;
            self.quiet_limit = quiet_limit;
        }
        let qos = if self.spec.qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let mut pkids = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let pkid = if qos == QoS::AtLeastOnce {
                self.allocate_pkid()
            } else {
                0
            };
            encode_publish(
                &mut self.out,
                Protocol::V3,
                &self.spec.topic,
                qos,
                pkid,
                payload.as_bytes(),
            );
            pkids.push(pkid);
        }
        self.write().await.map_err(|e| format!("MQTT: {e}"))?;
        if qos == QoS::AtMostOnce {
            *confirmed = payloads.len();
            return Ok(());
        }
        let mut acknowledged = vec![false; pkids.len()];
        while *confirmed < pkids.len() {
            match self.next_packet().await.map_err(|e| format!("MQTT: {e}"))? {
                ServerPacket::PubAck { pkid, .. } => {
                    // Only the batch's own packet ids can come back: a connection that failed
                    // mid-batch is never used again.
                    let mut waiting = pkids.iter().zip(&acknowledged).skip(*confirmed);
                    if let Some(at) = waiting.position(|(p, done)| *p == pkid && !done) {
                        acknowledged[*confirmed + at] = true;
                    }
                    while acknowledged.get(*confirmed) == Some(&true) {
                        *confirmed += 1;
                    }
                }
                ServerPacket::PingResp => {}
                other => return Err(format!("MQTT broker sent {other:?} to a publisher")),
            }
        }
        Ok(())
    }

    /// Whether the broker has closed the connection since it was last used (a restart, its own
    /// limits), seen without waiting: a batch written into it would be lost at QoS 0 and wait
    /// for its retry at QoS 1. Whatever else is pending is kept for `next_packet`.
    fn closed_by_broker(&mut self) -> bool {
        let mut chunk = [0u8; LOOK_CHUNK];
        loop {
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.read.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
            if self.read.len() > MAX_BROKER_PACKET {
                return true;
            }
        }
    }

    fn allocate_pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    async fn write(&mut self) -> std::io::Result<()> {
        let written = self.stream.write_all(&self.out).await;
        self.out.clear();
        self.last_used = Instant::now();
        written
    }

    /// Asks the kernel to acknowledge what arrives at once (Linux leaves quick-ack mode by
    /// itself, so this is asked before every read). A broker that writes each PUBACK on its
    /// own with Nagle's algorithm on (Mosquitto's default) sends the first and holds the rest
    /// until that one is acknowledged; with the acknowledgement delayed, as Linux delays it for
    /// a reader that sends nothing back, every batch waited for the delayed-ACK timer: 1 700
    /// messages/s to a local Mosquitto.
    fn acknowledge_promptly(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = self.stream.set_quickack(true);
    }

    async fn next_packet(&mut self) -> Result<ServerPacket, String> {
        loop {
            if let Some(packet) =
                decode_server(&mut self.read, Protocol::V3).map_err(|e| e.to_string())?
            {
                return Ok(packet);
            }
            if self.read.len() > MAX_BROKER_PACKET {
                return Err(format!(
                    "the broker sent a packet larger than {MAX_BROKER_PACKET} bytes"
                ));
            }
            self.acknowledge_promptly();
            let read = ioda_mqtt::read::read_some(&mut self.stream, &mut self.read)
                .await
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("the broker closed the connection".to_owned());
            }
        }
    }
}

/// A client id of its own for every connection (two with one id would keep closing each other),
/// within the 23 characters every MQTT 3.1.1 broker must accept: random across processes, and
/// counted within one should the random source fail.
fn client_id() -> String {
    static OPENED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut bytes = [0u8; 4];
    let _ = getrandom::fill(&mut bytes);
    let count = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xff_ffff;
    format!("iodafwd-{:08x}{count:06x}", u32::from_be_bytes(bytes))
}

/// What an MQTT 3.1.1 CONNACK refusal means.
fn connack_refusal(code: u8) -> String {
    let meaning = match code {
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    };
    format!("{meaning} (CONNACK return code {code})")
}

#[cfg(test)]
#[path = "mqtt_tests.rs"]
mod tests;
