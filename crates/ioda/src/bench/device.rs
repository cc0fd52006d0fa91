//! A lean simulated device for load: one TCP connection, IoTDA credentials, QoS 1 publishes with a
//! window of outstanding acknowledgements. Connections are spread over 127.0.0.x source addresses
//! so one machine can open far more than one address's ephemeral ports allow.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, bail};
use bytes::BytesMut;
use ioda_mqtt::client::{
    ServerPacket, decode_server, encode_client_puback, encode_connect, encode_subscribe,
};
use ioda_mqtt::codec::{Protocol, QoS, encode_publish};
use ioda_mqtt::websocket::WebSocketBytes;
use openssl::ssl::SslConnector;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_openssl::SslStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;

/// Connections per source address: few enough that the runs of the last minute, whose ports sit in
/// TIME_WAIT, leave most of an address's ~28 000 ephemeral ports free (with 10 000 per address, a
/// run right after another waited on the kernel's search for a free port: 11-56 s to connect
/// 18 500 devices instead of 4). 254 addresses hold 254 000 connections.
const PER_SOURCE: usize = 1_000;
/// Devices the source addresses 127.0.0.2–127.0.0.255 hold.
pub const MAX_DEVICES: usize = 254 * PER_SOURCE;

/// TCP, or TLS over it.
type Plain = Either<TcpStream, SslStream<TcpStream>>;

/// How devices reach the server: TLS or not, and WebSocket or not.
#[derive(Clone, Default)]
pub struct Transport {
    pub tls: Option<SslConnector>,
    pub websocket: bool,
}

/// A connected device.
pub struct Device {
    pub device_id: String,
    /// MQTT, MQTTS, or either inside a WebSocket.
    stream: Either<Plain, WebSocketBytes<Plain>>,
    buf: BytesMut,
    out: BytesMut,
    next_pkid: u16,
}

/// The loopback source address for connection number `n`.
fn source(n: usize) -> SocketAddr {
    // 127.0.0.1 is left to everything else on the machine.
    let host = 2 + (n / PER_SOURCE) as u8;
    SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0))
}

impl Device {
    /// Connects device number `n` and waits for a successful CONNACK.
    pub async fn connect(
        n: usize,
        server: SocketAddr,
        device_id: &str,
        secret: &str,
        keep_alive: u16,
    ) -> anyhow::Result<Device> {
        let plain = Transport::default();
        Device::connect_via(n, server, &plain, device_id, secret, keep_alive).await
    }

    /// Like `connect`, over TLS (the server checked as `localhost`) and WebSocket as `transport`
    /// says.
    pub async fn connect_via(
        n: usize,
        server: SocketAddr,
        transport: &Transport,
        device_id: &str,
        secret: &str,
        keep_alive: u16,
    ) -> anyhow::Result<Device> {
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(source(n))
            .with_context(|| format!("binding {}", source(n)))?;
        let tcp = socket.connect(server).await.context("connecting")?;
        tcp.set_nodelay(true)?;
        let plain = match &transport.tls {
            None => Either::Left(tcp),
            Some(connector) => {
                let ssl = connector.configure()?.into_ssl("localhost")?;
                let mut stream = SslStream::new(ssl, tcp)?;
                std::pin::Pin::new(&mut stream)
                    .connect()
                    .await
                    .context("TLS handshake")?;
                Either::Right(stream)
            }
        };
        let stream = if transport.websocket {
            Either::Right(upgrade(plain).await?)
        } else {
            Either::Left(plain)
        };
        let mut device = Device {
            device_id: device_id.to_owned(),
            stream,
            buf: BytesMut::with_capacity(64),
            out: BytesMut::new(),
            next_pkid: 0,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let ts = ioda_types::time::format_hour_stamp(now);
        let password = ioda_engine::auth::device_password(secret, &ts);
        encode_connect(
            &mut device.out,
            Protocol::V3,
            &format!("{device_id}_0_0_{ts}"),
            device_id,
            &password,
            keep_alive,
        );
        device.flush().await?;
        match device.next().await? {
            ServerPacket::ConnAck { code: 0 } => Ok(device),
            other => bail!("connect refused: {other:?}"),
        }
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&self.out).await?;
        // A WebSocket sends a frame when flushed.
        self.stream.flush().await?;
        self.out.clear();
        Ok(())
    }

    /// The next packet from the server (acknowledging QoS 1 publishes it sends). Acknowledgements
    /// are written together once everything already read is taken, so a subscriber that is
    /// handed a burst answers it with one write, not one per message.
    pub async fn next(&mut self) -> anyhow::Result<ServerPacket> {
        loop {
            if let Some(packet) = self.buffered()? {
                return Ok(packet);
            }
            if !self.out.is_empty() {
                self.flush().await?;
            }
            if ioda_mqtt::read::read_some(&mut self.stream, &mut self.buf).await? == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// A packet already read, if there is one (nothing waits on the socket).
    pub fn buffered(&mut self) -> anyhow::Result<Option<ServerPacket>> {
        let packet = decode_server(&mut self.buf, Protocol::V3)?;
        if let Some(ServerPacket::Publish {
            qos: QoS::AtLeastOnce,
            pkid,
            ..
        }) = &packet
        {
            encode_client_puback(&mut self.out, *pkid);
        }
        Ok(packet)
    }

    /// Queues a publish; returns its packet id (0 for QoS 0). Call `send` to write what is queued.
    pub fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS) -> u16 {
        let pkid = if qos == QoS::AtLeastOnce {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            self.next_pkid
        } else {
            0
        };
        encode_publish(&mut self.out, Protocol::V3, topic, qos, pkid, payload);
        pkid
    }

    pub fn subscribe(&mut self, filter: &str, qos: QoS) {
        encode_subscribe(&mut self.out, Protocol::V3, 1, filter, qos);
    }

    pub async fn send(&mut self) -> anyhow::Result<()> {
        self.flush().await
    }
}

/// The WebSocket upgrade on `/mqtt` with the `mqtt` subprotocol, holding as little per connection
/// as the server does (a 4 KiB read buffer; each write sent at once).
async fn upgrade(plain: Plain) -> anyhow::Result<WebSocketBytes<Plain>> {
    let mut request = "ws://localhost/mqtt".into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (socket, _) = tokio_tungstenite::client_async_with_config(request, plain, Some(config))
        .await
        .context("WebSocket upgrade")?;
    Ok(WebSocketBytes::new(socket))
}
