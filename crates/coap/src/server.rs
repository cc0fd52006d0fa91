//! The tokio driver of the CoAP endpoint and LwM2M server: one UDP socket, one task that owns the
//! endpoint state, and a handler (the platform) that decides what registrations and data mean.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, Packet, ResponseType};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::blockwise::{self, Block, Reassembly, Step};
use crate::endpoint::{Endpoint, Event, Timing};
use crate::lwm2m::{self, RdRequest, Registration};

/// What the platform does with LwM2M traffic.
pub trait Lwm2mHandler: Send + Sync + 'static {
    /// A device registers (again); an error is the CoAP code to refuse it with.
    fn register(
        &self,
        peer: SocketAddr,
        registration: Registration,
    ) -> impl Future<Output = Result<(), ResponseType>> + Send;
    /// A registration update (`POST /rd/{endpoint}`), possibly from a new address; `identity`
    /// is the sender's DTLS identity (none over plain CoAP).
    fn update(
        &self,
        peer: SocketAddr,
        identity: Option<String>,
        endpoint: String,
        lifetime_s: Option<u64>,
        binding: Option<String>,
    ) -> impl Future<Output = Result<(), ResponseType>> + Send;
    /// `DELETE /rd/{endpoint}`; an error is the CoAP code to refuse it with.
    fn deregister(
        &self,
        peer: SocketAddr,
        identity: Option<String>,
        endpoint: String,
    ) -> impl Future<Output = Result<(), ResponseType>> + Send;
    /// Data the device sent on `/19/0/0`; returns once the data is safe (a confirmable
    /// notification is acknowledged then).
    fn data(
        &self,
        peer: SocketAddr,
        endpoint: String,
        payload: Vec<u8>,
    ) -> impl Future<Output = ()> + Send;
    /// A datagram that is not CoAP, or a request the server cannot serve.
    fn refused(&self, peer: SocketAddr, why: String);
}

/// What became of a confirmable request to a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Answered (piggybacked on the ACK) with this response.
    Answered(Box<Packet>),
    /// Acknowledged with an empty ACK (the answer, if any, comes separately).
    Acknowledged,
    /// The device reset it.
    Rejected,
    /// No acknowledgement after every retransmission.
    TimedOut,
}

enum Command {
    Request {
        to: SocketAddr,
        packet: Packet,
        done: oneshot::Sender<Outcome>,
    },
    Observe {
        to: SocketAddr,
        endpoint: String,
    },
    Reply {
        to: SocketAddr,
        request: Packet,
        response: Packet,
    },
    Acknowledge {
        to: SocketAddr,
        packet: Packet,
    },
}

/// Sends requests to devices through a running server.
#[derive(Clone, Debug)]
pub struct CoapHandle {
    commands: mpsc::Sender<Command>,
}

impl Outcome {
    /// The response code, when the device answered.
    pub fn code(&self) -> Option<ResponseType> {
        match self {
            Outcome::Answered(packet) => match packet.header.code {
                MessageClass::Response(code) => Some(code),
                _ => None,
            },
            _ => None,
        }
    }
}

impl CoapHandle {
    /// Sends a confirmable request and waits for its outcome; a payload larger than one block
    /// goes block-wise (Block1), each block waiting for the device's 2.31 Continue.
    pub async fn request(&self, to: SocketAddr, packet: Packet) -> Outcome {
        if packet.payload.len() <= 1 << (blockwise::SZX + 4) {
            return self.request_once(to, packet).await;
        }
        let payload = packet.payload.clone();
        let mut last = Outcome::TimedOut;
        for (block, part) in blockwise::split(&payload, blockwise::SZX) {
            let mut piece = packet.clone();
            piece.payload = part.to_vec();
            block.set(&mut piece, CoapOption::Block1);
            last = self.request_once(to, piece).await;
            // Atomic servers answer 2.31 Continue, others 2.04 per block (RFC 7959 §2.3).
            let continued = last.code().is_some_and(|c| !c.is_error());
            if block.more && !continued {
                return last; // Refused or lost midway: the device did not take it all.
            }
        }
        last
    }

    /// Fetches the rest of a block-wise (Block2) response whose first block was `first`, with
    /// GETs of the following blocks on `path`.
    pub async fn fetch_rest(
        &self,
        to: SocketAddr,
        path: &[String],
        first: &Packet,
    ) -> Option<Vec<u8>> {
        let mut body = first.payload.clone();
        let mut block = Block::of(first, CoapOption::Block2)?;
        let most = blockwise::MAX_BODY / block.size() + 1;
        for _ in 0..most {
            if !block.more {
                return Some(body);
            }
            let wanted = block.num + 1;
            let mut get = Packet::new();
            get.header.code = MessageClass::Request(coap_lite::RequestType::Get);
            for part in path {
                get.add_option(CoapOption::UriPath, part.as_bytes().to_vec());
            }
            Block {
                num: wanted,
                more: false,
                szx: block.szx,
            }
            .set(&mut get, CoapOption::Block2);
            let Outcome::Answered(answer) = self.request_once(to, get).await else {
                return None;
            };
            block = Block::of(&answer, CoapOption::Block2)?;
            let content = answer.header.code == MessageClass::Response(ResponseType::Content);
            // The block asked for, with something in it: anything else would never end.
            if !content || block.num != wanted || answer.payload.is_empty() {
                return None;
            }
            body.extend_from_slice(&answer.payload);
            if body.len() > blockwise::MAX_BODY {
                return None;
            }
        }
        None
    }

    async fn request_once(&self, to: SocketAddr, packet: Packet) -> Outcome {
        let (done, outcome) = oneshot::channel();
        let sent = self
            .commands
            .send(Command::Request { to, packet, done })
            .await;
        if sent.is_err() {
            return Outcome::TimedOut;
        }
        outcome.await.unwrap_or(Outcome::TimedOut)
    }
}

/// Where datagrams come from: plain UDP, or DTLS sessions over UDP.
enum Transport {
    Udp(Arc<UdpSocket>),
    #[cfg(feature = "dtls")]
    Dtls(crate::dtls::Dtls),
}

impl Transport {
    /// The next datagram, with the peer's DTLS identity when there is one.
    async fn recv(&mut self, buf: &mut [u8]) -> Option<(SocketAddr, Option<String>, Vec<u8>)> {
        match self {
            Transport::Udp(socket) => {
                let (n, from) = socket.recv_from(buf).await.ok()?;
                Some((from, None, buf[..n].to_vec()))
            }
            #[cfg(feature = "dtls")]
            Transport::Dtls(dtls) => {
                let (from, identity, bytes) = dtls.recv().await?;
                Some((from, Some(identity), bytes))
            }
        }
    }

    async fn send(&self, to: SocketAddr, bytes: Vec<u8>) {
        match self {
            Transport::Udp(socket) => {
                let _ = socket.send_to(&bytes, to).await;
            }
            #[cfg(feature = "dtls")]
            Transport::Dtls(dtls) => dtls.send(to, bytes),
        }
    }
}

/// A bound CoAP server, ready to run.
pub struct CoapServer {
    transport: Transport,
    commands: mpsc::Receiver<Command>,
    handle: CoapHandle,
    timing: Timing,
}

impl std::fmt::Debug for CoapServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoapServer").finish_non_exhaustive()
    }
}

impl CoapServer {
    /// Binds plain CoAP on a UDP socket.
    pub async fn bind(addr: SocketAddr, timing: Timing) -> std::io::Result<CoapServer> {
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        Ok(CoapServer::over(Transport::Udp(socket), timing))
    }

    /// Binds CoAPS: DTLS 1.2 with pre-shared keys found by `psk` (identity → key), offering
    /// `suites` (OpenSSL names, a subset of `SUITES`).
    #[cfg(feature = "dtls")]
    pub async fn bind_dtls(
        addr: SocketAddr,
        timing: Timing,
        psk: crate::dtls::PskLookup,
        suites: &[String],
    ) -> std::io::Result<CoapServer> {
        let dtls = crate::dtls::Dtls::bind(addr, psk, suites).await?;
        Ok(CoapServer::over(Transport::Dtls(dtls), timing))
    }

    fn over(transport: Transport, timing: Timing) -> CoapServer {
        let (tx, commands) = mpsc::channel(1024);
        CoapServer {
            transport,
            commands,
            handle: CoapHandle { commands: tx },
            timing,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.transport {
            Transport::Udp(socket) => socket.local_addr(),
            #[cfg(feature = "dtls")]
            Transport::Dtls(dtls) => Ok(dtls.local_addr()),
        }
    }

    pub fn handle(&self) -> CoapHandle {
        self.handle.clone()
    }

    /// Serves until `shutdown` turns true.
    pub async fn run<H: Lwm2mHandler>(self, handler: Arc<H>, mut shutdown: watch::Receiver<bool>) {
        let started = Instant::now();
        let seed = u64::from(started.elapsed().subsec_nanos()) ^ (std::process::id() as u64) << 32;
        let mut driver = Driver {
            endpoint: Endpoint::new(self.timing, seed),
            transport: self.transport,
            identity: None,
            reassembly: Reassembly::default(),
            handle: self.handle,
            handler,
            pending: HashMap::new(),
            observations: HashMap::new(),
            workers: HashMap::new(),
        };
        let mut commands = self.commands;
        let mut buf = vec![0u8; 2048];
        loop {
            let now = started.elapsed().as_millis() as i64;
            let wake = driver
                .endpoint
                .next_wakeup()
                .map_or(Duration::from_secs(1), |at| {
                    Duration::from_millis((at - now).clamp(1, 1000) as u64)
                });
            tokio::select! {
                received = driver.transport.recv(&mut buf) => {
                    if let Some((from, identity, datagram)) = received {
                        // The identity of the datagram being handled (DTLS), for the requests in it.
                        driver.identity = identity;
                        let now = started.elapsed().as_millis() as i64;
                        let (events, replies) = driver.endpoint.handle(from, &datagram, now);
                        driver.send_all(replies).await;
                        for event in events {
                            driver.on_event(event, now).await;
                        }
                    }
                }
                Some(command) = commands.recv() => {
                    let now = started.elapsed().as_millis() as i64;
                    driver.on_command(command, now).await;
                }
                _ = tokio::time::sleep(wake) => {
                    let now = started.elapsed().as_millis() as i64;
                    let (events, out) = driver.endpoint.poll(now);
                    driver.send_all(out).await;
                    for event in events {
                        driver.on_event(event, now).await;
                    }
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            }
        }
    }
}

struct Driver<H> {
    endpoint: Endpoint,
    transport: Transport,
    /// The DTLS identity the peer of the datagram being handled proved.
    identity: Option<String>,
    /// Requests arriving in blocks.
    reassembly: Reassembly,
    handle: CoapHandle,
    handler: Arc<H>,
    pending: HashMap<Vec<u8>, oneshot::Sender<Outcome>>,
    /// Observation tokens and the endpoint whose data they carry.
    observations: HashMap<Vec<u8>, String>,
    /// One worker per endpoint hands its data to the platform in arrival order.
    workers: HashMap<String, mpsc::Sender<(SocketAddr, Packet)>>,
}

impl<H: Lwm2mHandler> Driver<H> {
    async fn send_all(&self, datagrams: Vec<(SocketAddr, Vec<u8>)>) {
        for (to, bytes) in datagrams {
            self.transport.send(to, bytes).await;
        }
    }

    async fn on_command(&mut self, command: Command, now: i64) {
        match command {
            Command::Request { to, packet, done } => {
                let (token, datagram) = self.endpoint.request(to, packet, now);
                self.pending.insert(token, done);
                self.send_all(vec![(to, datagram)]).await;
            }
            Command::Observe { to, endpoint } => {
                let (token, datagram) = self.endpoint.request(to, lwm2m::observe_data(), now);
                // A new observation replaces the endpoint's old one.
                self.observations.retain(|_, e| *e != endpoint);
                self.observations.insert(token, endpoint);
                self.send_all(vec![(to, datagram)]).await;
            }
            Command::Reply {
                to,
                request,
                response,
            } => {
                let bytes = self.endpoint.reply(to, &request, response);
                self.send_all(vec![(to, bytes)]).await;
            }
            Command::Acknowledge { to, packet } => {
                if let Some(ack) = self.endpoint.acknowledge(to, &packet) {
                    self.send_all(vec![(to, ack)]).await;
                }
            }
        }
    }

    async fn on_event(&mut self, event: Event, now: i64) {
        match event {
            Event::Request { from, packet } => match Block::of(&packet, CoapOption::Block1) {
                // Only registrations are large enough to come in blocks.
                Some(_) if lwm2m::path(&packet).first().map(String::as_str) != Some("rd") => {
                    self.on_request(from, packet)
                }
                None => self.on_request(from, packet),
                Some(block) => match self.reassembly.push(from, packet.clone(), block, now) {
                    Step::Complete(whole) => self.on_request(from, whole),
                    Step::Continue(answer) => {
                        let bytes = self.endpoint.reply(from, &packet, answer);
                        self.send_all(vec![(from, bytes)]).await;
                    }
                    Step::Refuse(code) => {
                        let bytes = self
                            .endpoint
                            .reply(from, &packet, lwm2m::response(code, None));
                        self.send_all(vec![(from, bytes)]).await;
                    }
                },
            },
            Event::Response { from, packet } => self.on_response(from, packet).await,
            Event::Delivered { token, .. } => {
                if let Some(done) = self.pending.remove(&token) {
                    let _ = done.send(Outcome::Acknowledged);
                }
            }
            Event::Rejected { token, .. } => {
                self.observations.remove(&token);
                if let Some(done) = self.pending.remove(&token) {
                    let _ = done.send(Outcome::Rejected);
                }
            }
            Event::GaveUp { token, .. } => {
                if let Some(done) = self.pending.remove(&token) {
                    let _ = done.send(Outcome::TimedOut);
                }
            }
            Event::Malformed { from, error } => {
                self.handler.refused(from, format!("not CoAP: {error}"));
            }
        }
    }

    async fn on_response(&mut self, from: SocketAddr, packet: Packet) {
        let token = packet.get_token().to_vec();
        if let MessageClass::Response(_) = packet.header.code
            && let Some(done) = self.pending.remove(&token)
        {
            let _ = done.send(Outcome::Answered(Box::new(packet)));
            return;
        }
        let Some(endpoint) = self.observations.get(&token).cloned() else {
            // Nothing observes it (an old observation): a reset tells the device to stop.
            let reset = self.endpoint.reject(from, &packet);
            self.send_all(reset.map(|r| (from, r)).into_iter().collect())
                .await;
            return;
        };
        if packet.payload.is_empty() {
            // The observation's own acknowledgement, or a notification without data.
            let ack = self.endpoint.acknowledge(from, &packet);
            self.send_all(ack.map(|a| (from, a)).into_iter().collect())
                .await;
            return;
        }
        let mid = packet.header.message_id;
        let worker = self.workers.entry(endpoint.clone()).or_insert_with(|| {
            spawn_worker(self.handler.clone(), self.handle.clone(), endpoint.clone())
        });
        if worker.try_send((from, packet)).is_err() {
            // Too much data from one device at once: forgetting the message id lets a
            // confirmable notification's retransmission in; a non-confirmable one is lost.
            self.endpoint.forget(from, mid);
            self.handler.refused(
                from,
                format!("data from {endpoint} arrives faster than it is stored; dropped"),
            );
        }
    }

    fn on_request(&self, from: SocketAddr, request: Packet) {
        let handler = self.handler.clone();
        let handle = self.handle.clone();
        let identity = self.identity.clone();
        tokio::spawn(async move {
            let (response, observe) = answer_rd(&*handler, from, identity, &request).await;
            let _ = handle
                .commands
                .send(Command::Reply {
                    to: from,
                    request,
                    response,
                })
                .await;
            if let Some(endpoint) = observe {
                let _ = handle
                    .commands
                    .send(Command::Observe { to: from, endpoint })
                    .await;
            }
        });
    }
}

/// The answer to an `/rd` request, and the endpoint to observe after a registration.
async fn answer_rd<H: Lwm2mHandler>(
    handler: &H,
    from: SocketAddr,
    identity: Option<String>,
    request: &Packet,
) -> (Packet, Option<String>) {
    if let Some(option) = lwm2m::unknown_critical_option(request) {
        handler.refused(from, format!("critical option {option} is not understood"));
        return (lwm2m::response(ResponseType::BadOption, None), None);
    }
    let parsed = match lwm2m::parse_rd(request) {
        Ok(parsed) => parsed,
        Err(why) => {
            let code = if why.starts_with("no such") {
                ResponseType::NotFound
            } else {
                ResponseType::BadRequest
            };
            handler.refused(from, why);
            return (lwm2m::response(code, None), None);
        }
    };
    match parsed {
        RdRequest::Register(mut registration) => {
            registration.identity = identity;
            let endpoint = registration.endpoint.clone();
            match handler.register(from, registration).await {
                Ok(()) => (
                    lwm2m::response(ResponseType::Created, Some(&endpoint)),
                    Some(endpoint),
                ),
                Err(code) => (lwm2m::response(code, None), None),
            }
        }
        RdRequest::Update {
            location,
            lifetime_s,
            binding,
        } => match handler
            .update(from, identity, location, lifetime_s, binding)
            .await
        {
            Ok(()) => (lwm2m::response(ResponseType::Changed, None), None),
            Err(code) => (lwm2m::response(code, None), None),
        },
        RdRequest::Deregister { location } => {
            match handler.deregister(from, identity, location).await {
                Ok(()) => (lwm2m::response(ResponseType::Deleted, None), None),
                Err(code) => (lwm2m::response(code, None), None),
            }
        }
    }
}

fn spawn_worker<H: Lwm2mHandler>(
    handler: Arc<H>,
    handle: CoapHandle,
    endpoint: String,
) -> mpsc::Sender<(SocketAddr, Packet)> {
    let (tx, mut rx) = mpsc::channel::<(SocketAddr, Packet)>(32);
    tokio::spawn(async move {
        while let Some((from, packet)) = rx.recv().await {
            // A notification too large for one datagram comes block-wise: fetch the rest.
            let payload = match Block::of(&packet, CoapOption::Block2) {
                Some(block) if block.more => {
                    let path = ["19", "0", "0"].map(str::to_owned);
                    match handle.fetch_rest(from, &path, &packet).await {
                        Some(body) => body,
                        None => {
                            let why = format!(
                                "the rest of a block-wise notification from {endpoint} did not arrive"
                            );
                            handler.refused(from, why);
                            let _ = handle
                                .commands
                                .send(Command::Acknowledge { to: from, packet })
                                .await;
                            continue;
                        }
                    }
                }
                _ => packet.payload.clone(),
            };
            handler.data(from, endpoint.clone(), payload).await;
            let _ = handle
                .commands
                .send(Command::Acknowledge { to: from, packet })
                .await;
        }
    });
    tx
}
