//! The tokio side of the MQTT server: accepts connections and drives one task per connection.
//!
//! Every decision (who may connect, what a publish means, which subscriptions are allowed) is the
//! [`Broker`]'s; this module only speaks the protocol, enforces keepalive and packet size, and keeps
//! QoS 1 acknowledgements in order behind the broker's commit.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};

use crate::MqttError;
use crate::codec::{
    self, Connect, Packet, Protocol, Publish, QoS, ServerLimits, SubscribeFilter, reason,
};
pub use crate::listener::{PlainTcp, Upgrade, serve, serve_upgraded};
use crate::read::read_some;
use crate::stats::ACK_STAGES;

/// Limits the driver enforces on every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest packet accepted, header included.
    pub max_packet_size: usize,
    /// Unacknowledged QoS 1 publishes a client may have outstanding before the driver stops reading.
    pub max_inflight: u16,
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout: Duration,
    /// Capacity of each connection's outbound queue.
    pub outbox_capacity: usize,
    /// How long one write to a client may take before the connection is given up: a client that
    /// stops reading must not park its connection task (and with it keepalive, takeover, shutdown).
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 1024 * 1024 + 4096,
            max_inflight: 64,
            connect_timeout: Duration::from_secs(10),
            outbox_capacity: 64,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Something the platform wants written to a connected client.
#[derive(Debug)]
pub enum Outbound {
    /// Boxed, so the queue's slots (allocated per connection) stay small.
    Publish(Box<OutboundPublish>),
    /// Close the connection, telling an MQTT 5 client why.
    Disconnect { reason: u8 },
}

/// A publish to a connected client.
#[derive(Debug)]
pub struct OutboundPublish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// Told what became of the publish; dropped unanswered when nothing is known (the connection
    /// closed before the PUBACK, or the publish went at QoS 0 because the client's window was full).
    pub acked: Option<oneshot::Sender<Delivery>>,
}

/// What became of a publish handed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the client at QoS 0: nothing more will be known.
    Written,
    /// The client acknowledged it (QoS 1).
    Acknowledged,
    /// Discarded unsent: larger than the client's MQTT 5 Maximum Packet Size.
    TooLarge { size: usize, limit: u32 },
}

/// The sending half of a connection's outbound queue, handed to the broker at connect.
pub type Outbox = mpsc::Sender<Outbound>;

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnsupportedVersion,
    ClientIdRejected,
    ServerUnavailable,
    BadCredentials,
    NotAuthorized,
}

impl Refusal {
    /// The CONNACK code for the client's protocol level.
    pub fn code(self, protocol: Protocol) -> u8 {
        let (v3, v5) = match self {
            Refusal::UnsupportedVersion => (1, reason::UNSUPPORTED_VERSION),
            Refusal::ClientIdRejected => (2, reason::CLIENT_ID_INVALID),
            Refusal::ServerUnavailable => (3, reason::SERVER_UNAVAILABLE),
            Refusal::BadCredentials => (4, reason::BAD_CREDENTIALS),
            Refusal::NotAuthorized => (5, reason::NOT_AUTHORIZED),
        };
        if protocol == Protocol::V5 { v5 } else { v3 }
    }
}

/// What the broker decided about an incoming PUBLISH.
pub enum PublishVerdict {
    /// Accepted; a QoS 1 publish is acknowledged at once.
    Accept,
    /// Accepted; the PUBACK waits for this reason code (0 = committed), keeping order with others.
    AcceptAfter(Commit),
    /// Not processed (bad payload, say), and already recorded by the broker. MQTT 5 QoS 1 gets a
    /// PUBACK with the reason; MQTT 3.1.1 gets a plain PUBACK, because closing the connection would
    /// only make the client resend the same bad message forever.
    Discard(u8),
    /// Refused badly enough to end the connection (an oversized payload, say), with this reason.
    Disconnect(u8),
    /// Refused with an MQTT 5 reason. MQTT 5 QoS 1 gets a PUBACK with the reason; MQTT 5 QoS 0
    /// gets a DISCONNECT with it; MQTT 3.1.1 cannot express a refusal, so its connection is closed.
    Refuse(u8),
}

/// Largest CONNECT accepted: nothing big is needed before a client has authenticated.
const MAX_CONNECT_SIZE: usize = 16 * 1024;

/// Unacknowledged QoS 1 publishes to one client, at most.
const MAX_AWAITING_ACK: usize = 1024;

/// Resolves to the PUBACK reason once the broker has committed a publish.
pub type Commit = Pin<Box<dyn Future<Output = u8> + Send>>;

/// A QoS 1 publish whose PUBACK waits: for its commit, or for older ones (PUBACKs keep order).
struct Awaiting {
    pkid: u16,
    commit: Commit,
    /// When the read that brought it returned.
    read_at: std::time::Instant,
}

/// Why a connection ended, as reported to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseCause {
    ClientDisconnect,
    KeepaliveTimeout,
    ConnectionLost,
    /// A protocol error or an oversized packet.
    Protocol(MqttError),
    /// The server closed it (takeover, kick, shutdown) with this MQTT 5 reason.
    Server(u8),
    /// A publish was refused and the client could not be told otherwise.
    PublishRefused(u8),
}

/// The platform's side of MQTT: authentication and session creation.
pub trait Broker: Send + Sync + 'static {
    type Session: Session;

    /// Decides on a CONNECT. On success the session must keep `outbox` to reach the client.
    fn connect(
        &self,
        connect: &Connect,
        peer: SocketAddr,
        outbox: Outbox,
    ) -> impl Future<Output = Result<Self::Session, Refusal>> + Send;
}

/// One authenticated connection, as the platform sees it.
pub trait Session: Send + 'static {
    fn publish(&mut self, publish: Publish) -> impl Future<Output = PublishVerdict> + Send;

    /// Returns the granted QoS (0 or 1) or an MQTT 5 failure reason (>= 0x80).
    fn subscribe(&mut self, filter: &SubscribeFilter) -> u8;

    fn unsubscribe(&mut self, filter: &str);

    /// Called once when the connection is over.
    fn closed(self, cause: CloseCause) -> impl Future<Output = ()> + Send;
}

/// Runs one connection from CONNECT to close over any byte stream (TCP, TLS, WebSocket).
pub async fn run_connection<S, B>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<B>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: Broker,
{
    // The handshake and the close run boxed: their state (the CONNECT packet, the broker's
    // answer, the last writes with their timeouts) lives on the heap only while they run, instead
    // of being reserved beside the session in every idle connection's task.
    let Some(mut conn) = Box::pin(establish(stream, peer, broker, limits, shutdown)).await else {
        return;
    };
    let cause = conn.run().await;
    Box::pin(conn.close(cause)).await;
}

/// Reads CONNECT, asks the broker and answers CONNACK; the session's connection on success.
async fn establish<S, B>(
    mut stream: S,
    peer: SocketAddr,
    broker: Arc<B>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> Option<Connection<S, B::Session>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: Broker,
{
    let mut buf = BytesMut::with_capacity(128);
    let connect = match timeout(
        limits.connect_timeout,
        read_connect(&mut stream, &mut buf, limits),
    )
    .await
    {
        Ok(Ok(connect)) => connect,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "mqtt connect failed");
            return None;
        }
        Err(_) => return None,
    };
    let (outbox, inbox) = mpsc::channel(limits.outbox_capacity);
    let protocol = connect.protocol;
    let mut out = BytesMut::new();
    // The broker's futures are boxed: their (large) state lives on the heap only while they run,
    // instead of sizing every idle connection's task for them.
    let session = match Box::pin(broker.connect(&connect, peer, outbox)).await {
        Ok(session) => session,
        Err(refusal) => {
            codec::encode_connack(&mut out, protocol, refusal.code(protocol), None);
            let _ = send(&mut stream, &out).await;
            return None;
        }
    };
    let server_limits = ServerLimits {
        receive_maximum: limits.max_inflight,
        maximum_packet_size: limits.max_packet_size as u32,
    };
    codec::encode_connack(&mut out, protocol, reason::SUCCESS, Some(server_limits));
    let keep_alive = Duration::from_millis(u64::from(connect.keep_alive) * 1500);
    let peer_limits = PeerLimits::of(&connect.properties);
    // The CONNECT packet (client id, credentials, properties) is done with: not kept, on the heap
    // or in the task, for the connection's life.
    drop(connect);
    Some(Connection {
        stream,
        buf,
        out,
        protocol,
        limits,
        keep_alive,
        peer_limits,
        session,
        inbox,
        shutdown,
        pending: VecDeque::new(),
        unwritten_acks: 0,
        awaiting_ack: HashMap::new(),
        next_pkid: 0,
    })
}

fn disconnect_reason(error: &MqttError) -> u8 {
    match error {
        MqttError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
        MqttError::Malformed(_) => reason::MALFORMED,
        MqttError::Violation("QoS 2 is not supported") => reason::QOS_NOT_SUPPORTED,
        MqttError::Violation(_) | MqttError::UnsupportedProtocol(_) => reason::PROTOCOL_ERROR,
    }
}

/// Writes `bytes` and flushes them: a stream that frames what it is given (a WebSocket) may hold a
/// write until it is flushed.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    limits: Limits,
) -> Result<Connect, MqttError> {
    loop {
        match codec::decode(buf, None, limits.max_packet_size.min(MAX_CONNECT_SIZE)) {
            Ok(Some(Packet::Connect(connect))) => return Ok(*connect),
            Ok(Some(_)) => return Err(MqttError::Violation("first packet must be CONNECT")),
            Ok(None) => {}
            Err(MqttError::UnsupportedProtocol(level)) => {
                let mut out = BytesMut::new();
                codec::encode_connack(&mut out, Protocol::V3, 1, None);
                let _ = send(stream, &out).await;
                return Err(MqttError::UnsupportedProtocol(level));
            }
            Err(error) => return Err(error),
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(MqttError::Malformed("connection closed before CONNECT")),
            Ok(_) => {}
        }
    }
}

/// The state of one established connection.
struct Connection<S, T> {
    stream: S,
    buf: BytesMut,
    out: BytesMut,
    protocol: Protocol,
    limits: Limits,
    keep_alive: Duration,
    peer_limits: PeerLimits,
    session: T,
    inbox: mpsc::Receiver<Outbound>,
    shutdown: watch::Receiver<bool>,
    /// QoS 1 publishes whose PUBACK waits for the broker, oldest first.
    pending: VecDeque<Awaiting>,
    /// PUBACKs encoded but not yet written (their `write` stage is the write that carries them).
    /// The stages' other timestamps travel with the publishes, not here: every connection's
    /// task holds this struct while idle.
    unwritten_acks: u32,
    /// Our QoS 1 publishes waiting for the client's PUBACK.
    awaiting_ack: HashMap<u16, Option<oneshot::Sender<Delivery>>>,
    next_pkid: u16,
}

/// What an MQTT 5 client asked of the server on CONNECT (MQTT 3.1.1 clients ask nothing).
#[derive(Debug, Clone, Copy)]
struct PeerLimits {
    /// Largest packet the client accepts; a larger one must be discarded, not sent (MQTT 5 3.1.2.11.4).
    max_packet_size: u32,
    /// How many of our QoS 1 publishes may await its PUBACK at once.
    ack_window: usize,
}

impl PeerLimits {
    fn of(properties: &codec::ConnectProperties) -> Self {
        PeerLimits {
            max_packet_size: properties.maximum_packet_size.unwrap_or(u32::MAX),
            ack_window: properties.receive_maximum.map_or(MAX_AWAITING_ACK, |max| {
                usize::from(max).min(MAX_AWAITING_ACK)
            }),
        }
    }
}

/// What woke the connection task.
enum Event {
    Shutdown,
    Outbound(Outbound),
    Committed(u8),
    /// Bytes arrived (`true`) or the peer closed the stream (`false`).
    Read(bool),
    KeepaliveExpired,
}

/// What to do after handling one packet.
enum Flow {
    Continue,
    Close(CloseCause),
}

impl<S, T> Connection<S, T>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    T: Session,
{
    /// Ends the connection: pending commits finish their work, an MQTT 5 client is told why,
    /// the socket is shut and the session closed.
    async fn close(mut self, cause: CloseCause) {
        let protocol = self.protocol;
        // Commits still pending when the connection ends must finish their follow-up work.
        for Awaiting { commit, .. } in self.pending.drain(..) {
            tokio::spawn(commit);
        }
        let Connection {
            session,
            mut stream,
            mut out,
            unwritten_acks,
            ..
        } = self;
        if let CloseCause::Server(code) | CloseCause::PublishRefused(code) = &cause
            && protocol == Protocol::V5
        {
            codec::encode_disconnect(&mut out, *code);
        }
        if let CloseCause::Protocol(error) = &cause
            && protocol == Protocol::V5
        {
            codec::encode_disconnect(&mut out, disconnect_reason(error));
        }
        if !out.is_empty() {
            let started = std::time::Instant::now();
            if let Ok(Ok(())) = timeout(Duration::from_secs(1), send(&mut stream, &out)).await
                && unwritten_acks > 0
            {
                ACK_STAGES
                    .write
                    .observe(started.elapsed(), u64::from(unwritten_acks));
            }
        }
        let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
        Box::pin(session.closed(cause)).await;
    }

    async fn run(&mut self) -> CloseCause {
        let mut deadline = Instant::now() + self.keep_alive;
        loop {
            // The write and the input's handling run boxed: an idle connection's task waits in the
            // `select!` below, and their state (a publish on its way to the broker, a write with its
            // timeout) would otherwise be reserved in every connection's task beside it (the task
            // was 1 840 bytes, 1 304 of them this loop).
            if !self.out.is_empty()
                && let Err(error) = Box::pin(self.flush()).await
            {
                tracing::debug!(%error, "mqtt write failed");
                return CloseCause::ConnectionLost;
            }
            self.release_spare_buffers();
            let can_read = self.pending.len() < usize::from(self.limits.max_inflight);
            let event = tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => Event::Shutdown,
                Some(outbound) = self.inbox.recv() => Event::Outbound(outbound),
                code = wait_front(&mut self.pending), if !self.pending.is_empty() => Event::Committed(code),
                read = read_some(&mut self.stream, &mut self.buf), if can_read => Event::Read(read.map(|n| n > 0).unwrap_or(false)),
                _ = sleep_until(deadline), if !self.keep_alive.is_zero() => Event::KeepaliveExpired,
            };
            let flow = match event {
                Event::Shutdown => Flow::Close(CloseCause::Server(reason::SERVER_SHUTTING_DOWN)),
                Event::Outbound(outbound) => self.write_outbound(outbound),
                Event::Committed(code) => self.ack_front(code),
                Event::Read(false) => Flow::Close(CloseCause::ConnectionLost),
                Event::Read(true) => {
                    // One clock read for both (tokio's clock is never paused here).
                    let read_at = std::time::Instant::now();
                    deadline = Instant::from_std(read_at) + self.keep_alive;
                    Box::pin(self.handle_input(read_at)).await
                }
                Event::KeepaliveExpired => Flow::Close(CloseCause::KeepaliveTimeout),
            };
            if let Flow::Close(cause) = flow {
                return cause;
            }
        }
    }

    /// Writes what is waiting. A client that stops reading must not park this task (and with it
    /// keepalive, takeover and shutdown): a write that cannot finish in time ends the connection.
    async fn flush(&mut self) -> std::io::Result<()> {
        let started = (self.unwritten_acks > 0).then(std::time::Instant::now);
        match timeout(self.limits.write_timeout, send(&mut self.stream, &self.out)).await {
            Ok(written) => written?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client stopped reading",
                ));
            }
        }
        self.out.clear();
        if let Some(started) = started {
            ACK_STAGES
                .write
                .observe(started.elapsed(), u64::from(self.unwritten_acks));
            self.unwritten_acks = 0;
        }
        Ok(())
    }

    /// Gives back memory a burst of large packets took, so idle connections stay small.
    fn release_spare_buffers(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            self.buf = BytesMut::with_capacity(256);
        }
        if self.out.capacity() > 4 * 1024 {
            self.out = BytesMut::new();
        }
    }

    fn write_outbound(&mut self, outbound: Outbound) -> Flow {
        match outbound {
            Outbound::Publish(publish) => {
                let OutboundPublish {
                    topic,
                    payload,
                    qos,
                    acked,
                } = *publish;
                // A client that never acknowledges must not exhaust the packet ids (or memory), and
                // an MQTT 5 client's Receive Maximum is a promise: beyond the window, publishes go at
                // QoS 0 and their acknowledgement never fires.
                let requested = qos;
                let qos = if self.awaiting_ack.len() >= self.peer_limits.ack_window {
                    QoS::AtMostOnce
                } else {
                    qos
                };
                let size = codec::publish_packet_size(self.protocol, &topic, qos, payload.len());
                let limit = self.peer_limits.max_packet_size;
                if size > limit as usize {
                    tracing::warn!(%topic, size, limit, "publish discarded: larger than the client's maximum packet size");
                    if let Some(acked) = acked {
                        let _ = acked.send(Delivery::TooLarge { size, limit });
                    }
                    return Flow::Continue;
                }
                let pkid = if qos == QoS::AtLeastOnce {
                    self.allocate_pkid()
                } else {
                    0
                };
                let acked = if qos == QoS::AtLeastOnce {
                    self.awaiting_ack.insert(pkid, acked);
                    None
                } else if requested == QoS::AtMostOnce {
                    acked
                } else {
                    // Downgraded for a full window: not acknowledged, so not reported delivered.
                    None
                };
                codec::encode_publish(&mut self.out, self.protocol, &topic, qos, pkid, &payload);
                if let Some(written) = acked {
                    let _ = written.send(Delivery::Written);
                }
                Flow::Continue
            }
            Outbound::Disconnect { reason } => Flow::Close(CloseCause::Server(reason)),
        }
    }

    fn allocate_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.awaiting_ack.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    fn ack_front(&mut self, code: u8) -> Flow {
        let Some(Awaiting { pkid, read_at, .. }) = self.pending.pop_front() else {
            return Flow::Continue;
        };
        let now = std::time::Instant::now();
        let mut flow = self.acknowledge(pkid, code, read_at, now);
        // Commits finish in groups (one transaction holds many publishes): acknowledge every one
        // that is already done, so their PUBACKs leave in one write instead of one write each.
        while matches!(flow, Flow::Continue) {
            let Some(front) = self.pending.front_mut() else {
                break;
            };
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let std::task::Poll::Ready(code) = front.commit.as_mut().poll(&mut cx) else {
                break;
            };
            let (pkid, read_at) = (front.pkid, front.read_at);
            self.pending.pop_front();
            flow = self.acknowledge(pkid, code, read_at, now);
        }
        flow
    }

    /// Encodes a PUBACK (or, for an MQTT 3 client, closes on a refusal), counting its publish's
    /// `commit` stage as ended `now`.
    fn acknowledge(
        &mut self,
        pkid: u16,
        code: u8,
        read_at: std::time::Instant,
        now: std::time::Instant,
    ) -> Flow {
        if code != reason::SUCCESS && self.protocol == Protocol::V3 {
            return Flow::Close(CloseCause::PublishRefused(code));
        }
        ACK_STAGES
            .commit
            .observe(now.saturating_duration_since(read_at), 1);
        self.unwritten_acks = self.unwritten_acks.saturating_add(1);
        codec::encode_puback(&mut self.out, self.protocol, pkid, code);
        Flow::Continue
    }

    /// Handles the packets a read brought (`read_at`: when it returned).
    async fn handle_input(&mut self, read_at: std::time::Instant) -> Flow {
        loop {
            let packet = match codec::decode(
                &mut self.buf,
                Some(self.protocol),
                self.limits.max_packet_size,
            ) {
                Ok(Some(packet)) => packet,
                Ok(None) => return Flow::Continue,
                Err(error) => return Flow::Close(CloseCause::Protocol(error)),
            };
            if let Flow::Close(cause) = self.handle_packet(packet, read_at).await {
                return Flow::Close(cause);
            }
        }
    }

    async fn handle_packet(&mut self, packet: Packet, read_at: std::time::Instant) -> Flow {
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish, read_at).await,
            Packet::PubAck { pkid, .. } => {
                if let Some(Some(acked)) = self.awaiting_ack.remove(&pkid) {
                    let _ = acked.send(Delivery::Acknowledged);
                }
                Flow::Continue
            }
            Packet::Subscribe { pkid, filters } => {
                let codes: Vec<u8> = filters.iter().map(|f| self.granted(f)).collect();
                codec::encode_suback(&mut self.out, self.protocol, pkid, &codes);
                Flow::Continue
            }
            Packet::Unsubscribe { pkid, filters } => {
                for filter in &filters {
                    self.session.unsubscribe(filter);
                }
                codec::encode_unsuback(&mut self.out, self.protocol, pkid, filters.len());
                Flow::Continue
            }
            Packet::PingReq => {
                codec::encode_pingresp(&mut self.out);
                Flow::Continue
            }
            Packet::Disconnect { .. } => Flow::Close(CloseCause::ClientDisconnect),
            Packet::Connect(_) => {
                Flow::Close(CloseCause::Protocol(MqttError::Violation("second CONNECT")))
            }
        }
    }

    fn granted(&mut self, filter: &SubscribeFilter) -> u8 {
        let code = self.session.subscribe(filter);
        match (code, self.protocol) {
            (c, Protocol::V3) if c >= 0x80 => 0x80,
            (c, _) => c,
        }
    }

    async fn handle_publish(&mut self, publish: Publish, read_at: std::time::Instant) -> Flow {
        let (qos, pkid) = (publish.qos, publish.pkid);
        let verdict = Box::pin(self.session.publish(publish)).await;
        let code = match verdict {
            PublishVerdict::Disconnect(code) => {
                return Flow::Close(CloseCause::PublishRefused(code));
            }
            _ if qos == QoS::AtMostOnce => return self.settle_qos0(verdict),
            PublishVerdict::AcceptAfter(commit) => {
                self.pending.push_back(Awaiting {
                    pkid,
                    commit,
                    read_at,
                });
                return Flow::Continue;
            }
            PublishVerdict::Accept => reason::SUCCESS,
            PublishVerdict::Discard(code) if self.protocol == Protocol::V5 => code,
            PublishVerdict::Discard(_) => reason::SUCCESS,
            PublishVerdict::Refuse(code) if self.protocol == Protocol::V3 => {
                return Flow::Close(CloseCause::PublishRefused(code));
            }
            PublishVerdict::Refuse(code) => code,
        };
        if self.pending.is_empty() {
            self.acknowledge(pkid, code, read_at, std::time::Instant::now())
        } else {
            // Keep PUBACKs in the order the publishes arrived.
            self.pending.push_back(Awaiting {
                pkid,
                commit: Box::pin(std::future::ready(code)),
                read_at,
            });
            Flow::Continue
        }
    }

    fn settle_qos0(&mut self, verdict: PublishVerdict) -> Flow {
        match verdict {
            PublishVerdict::Refuse(code) | PublishVerdict::Disconnect(code) => {
                Flow::Close(CloseCause::PublishRefused(code))
            }
            // Nobody waits for a QoS 0 commit, but what follows it (events, forwarding) must run.
            PublishVerdict::AcceptAfter(commit) => {
                tokio::spawn(commit);
                Flow::Continue
            }
            PublishVerdict::Accept | PublishVerdict::Discard(_) => Flow::Continue,
        }
    }
}

/// Resolves once the shutdown flag is set (the guard `wait_for` returns is not `Send`, so it is
/// dropped here rather than held by `select!`).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Waits for the oldest pending acknowledgement.
async fn wait_front(pending: &mut VecDeque<Awaiting>) -> u8 {
    match pending.front_mut() {
        Some(Awaiting { commit, .. }) => commit.await,
        None => std::future::pending().await,
    }
}
