//! A CoAP endpoint (RFC 7252 message layer) as a pure state machine: datagrams and the time go
//! in, events and datagrams come out. It detects duplicates (answering a repeated request with the
//! answer it already gave), retransmits its own confirmable messages with exponential back-off,
//! and tells the caller when one is acknowledged, reset or given up. No sockets, no clock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use coap_lite::{MessageClass, MessageType, Packet};

/// Transmission parameters (RFC 7252 §4.8), in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ack_timeout_ms: i64,
    pub max_retransmit: u32,
    /// How long a message id is remembered for duplicate detection.
    pub exchange_lifetime_ms: i64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ack_timeout_ms: 2_000,
            max_retransmit: 4,
            exchange_lifetime_ms: 247_000,
        }
    }
}

/// What happened, for the layer above.
#[derive(Debug)]
pub enum Event {
    /// A new request (duplicates are answered here and not reported again).
    Request { from: SocketAddr, packet: Packet },
    /// A response to one of our requests, piggybacked or separate, or an observe notification.
    /// A confirmable one waits for `Endpoint::acknowledge` (sent once the data is safe).
    Response { from: SocketAddr, packet: Packet },
    /// Our confirmable message was acknowledged.
    Delivered { to: SocketAddr, token: Vec<u8> },
    /// The peer answered our confirmable message with a reset.
    Rejected { to: SocketAddr, token: Vec<u8> },
    /// No acknowledgement after every retransmission.
    GaveUp { to: SocketAddr, token: Vec<u8> },
    /// A datagram that is not CoAP (answered with a reset when its header could be read).
    Malformed { from: SocketAddr, error: String },
}

/// Datagrams to send, each with its destination.
pub type Datagrams = Vec<(SocketAddr, Vec<u8>)>;

struct Outgoing {
    token: Vec<u8>,
    datagram: Vec<u8>,
    retransmissions: u32,
    timeout_ms: i64,
    next_at: i64,
}

/// The endpoint's state.
pub struct Endpoint {
    timing: Timing,
    next_mid: u16,
    random: u64,
    /// Message ids seen per peer, with the answer given (if any yet).
    seen: HashMap<(SocketAddr, u16), Option<Vec<u8>>>,
    seen_order: VecDeque<((SocketAddr, u16), i64)>,
    outgoing: HashMap<(SocketAddr, u16), Outgoing>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("outgoing", &self.outgoing.len())
            .field("seen", &self.seen.len())
            .finish()
    }
}

impl Endpoint {
    /// A new endpoint; `seed` starts its message ids, tokens and back-off jitter.
    pub fn new(timing: Timing, seed: u64) -> Endpoint {
        Endpoint {
            timing,
            next_mid: seed as u16,
            random: seed | 1,
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            outgoing: HashMap::new(),
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: tokens need to be unpredictable enough not to collide, not secret.
        let mut x = self.random;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random = x;
        x
    }

    /// Handles one datagram from `from`; returns what it meant and what to send back.
    pub fn handle(&mut self, from: SocketAddr, bytes: &[u8], now: i64) -> (Vec<Event>, Datagrams) {
        let packet = match Packet::from_bytes(bytes) {
            Ok(packet) => packet,
            Err(error) => return self.malformed(from, bytes, format!("{error:?}")),
        };
        let mid = packet.header.message_id;
        match packet.header.get_type() {
            MessageType::Acknowledgement | MessageType::Reset => self.settle(from, packet),
            kind => {
                let confirmable = kind == MessageType::Confirmable;
                if packet.header.code == MessageClass::Empty {
                    // A CoAP ping (empty CON) is answered with a reset.
                    let reply = confirmable.then(|| (from, empty(MessageType::Reset, mid)));
                    return (Vec::new(), reply.into_iter().collect());
                }
                if let Some(answer) = self.seen.get(&(from, mid)) {
                    let again = answer.clone().map(|a| (from, a));
                    return (Vec::new(), again.into_iter().collect());
                }
                self.remember(from, mid, now);
                let event = match packet.header.code {
                    MessageClass::Request(_) => Event::Request { from, packet },
                    _ => Event::Response { from, packet },
                };
                (vec![event], Vec::new())
            }
        }
    }

    fn malformed(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        error: String,
    ) -> (Vec<Event>, Datagrams) {
        let event = Event::Malformed { from, error };
        // Version 1 confirmable with a readable message id: reject it so the peer stops resending.
        let reply = match bytes {
            [first, _, high, low, ..] if first >> 6 == 1 && (first >> 4) & 0b11 == 0 => {
                vec![(
                    from,
                    empty(MessageType::Reset, u16::from_be_bytes([*high, *low])),
                )]
            }
            _ => Vec::new(),
        };
        (vec![event], reply)
    }

    fn settle(&mut self, from: SocketAddr, packet: Packet) -> (Vec<Event>, Datagrams) {
        let Some(outgoing) = self.outgoing.remove(&(from, packet.header.message_id)) else {
            return (Vec::new(), Vec::new()); // Late or unknown: nothing waits for it.
        };
        let token = outgoing.token;
        let event = if packet.header.get_type() == MessageType::Reset {
            Event::Rejected { to: from, token }
        } else if matches!(packet.header.code, MessageClass::Response(_))
            && packet.get_token() == token.as_slice()
        {
            // Piggybacked: the answer is the acknowledgement.
            Event::Response { from, packet }
        } else {
            // An empty ACK, or one whose token or code does not fit: the message arrived, and
            // nothing may wait for an answer that cannot be matched.
            Event::Delivered { to: from, token }
        };
        (vec![event], Vec::new())
    }

    fn remember(&mut self, from: SocketAddr, mid: u16, now: i64) {
        self.seen.insert((from, mid), None);
        self.seen_order.push_back(((from, mid), now));
    }

    /// The answer to a request `Event::Request` reported: piggybacked on the ACK of a confirmable
    /// request, or sent as its own non-confirmable message. It is kept so a duplicate of the
    /// request gets the same answer.
    pub fn reply(&mut self, to: SocketAddr, request: &Packet, mut response: Packet) -> Vec<u8> {
        let mid = request.header.message_id;
        if request.header.get_type() == MessageType::Confirmable {
            response.header.set_type(MessageType::Acknowledgement);
            response.header.message_id = mid;
        } else {
            response.header.set_type(MessageType::NonConfirmable);
            response.header.message_id = self.fresh_mid();
        }
        response.set_token(request.get_token().to_vec());
        let bytes = response.to_bytes().unwrap_or_default();
        if let Some(slot) = self.seen.get_mut(&(to, mid)) {
            *slot = Some(bytes.clone());
        }
        bytes
    }

    /// Forgets a message id without answering it, so the peer's retransmission is taken as new
    /// (for a message dropped because the layer above had no room for it).
    pub fn forget(&mut self, from: SocketAddr, mid: u16) {
        self.seen.remove(&(from, mid));
    }

    /// A reset for a confirmable message nobody can take (a notification for no observation).
    pub fn reject(&mut self, to: SocketAddr, packet: &Packet) -> Option<Vec<u8>> {
        if packet.header.get_type() != MessageType::Confirmable {
            return None;
        }
        let mid = packet.header.message_id;
        let reset = empty(MessageType::Reset, mid);
        if let Some(slot) = self.seen.get_mut(&(to, mid)) {
            *slot = Some(reset.clone());
        }
        Some(reset)
    }

    /// The empty ACK of a confirmable response or notification, once its data is safe.
    pub fn acknowledge(&mut self, to: SocketAddr, packet: &Packet) -> Option<Vec<u8>> {
        if packet.header.get_type() != MessageType::Confirmable {
            return None;
        }
        let mid = packet.header.message_id;
        let ack = empty(MessageType::Acknowledgement, mid);
        if let Some(slot) = self.seen.get_mut(&(to, mid)) {
            *slot = Some(ack.clone());
        }
        Some(ack)
    }

    fn fresh_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// Sends a confirmable request: gives it a message id and a fresh token, and keeps it for
    /// retransmission. Returns the token (to match the answer) and the datagram.
    pub fn request(&mut self, to: SocketAddr, mut packet: Packet, now: i64) -> (Vec<u8>, Vec<u8>) {
        let mid = self.fresh_mid();
        let token = self.next_random().to_be_bytes().to_vec();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.message_id = mid;
        packet.set_token(token.clone());
        let datagram = packet.to_bytes().unwrap_or_default();
        // The first timeout lies between ACK_TIMEOUT and 1.5 × ACK_TIMEOUT.
        let base = self.timing.ack_timeout_ms;
        let timeout_ms = base + (self.next_random() % (base as u64 / 2 + 1)) as i64;
        self.outgoing.insert(
            (to, mid),
            Outgoing {
                token: token.clone(),
                datagram: datagram.clone(),
                retransmissions: 0,
                timeout_ms,
                next_at: now + timeout_ms,
            },
        );
        (token, datagram)
    }

    /// Retransmits what is due, gives up on what has been retransmitted enough, and forgets
    /// message ids older than the exchange lifetime.
    pub fn poll(&mut self, now: i64) -> (Vec<Event>, Datagrams) {
        let mut events = Vec::new();
        let mut out = Vec::new();
        let max = self.timing.max_retransmit;
        self.outgoing.retain(|(to, _), o| {
            if o.next_at > now {
                return true;
            }
            if o.retransmissions >= max {
                events.push(Event::GaveUp {
                    to: *to,
                    token: o.token.clone(),
                });
                return false;
            }
            o.retransmissions += 1;
            o.timeout_ms *= 2;
            o.next_at = now + o.timeout_ms;
            out.push((*to, o.datagram.clone()));
            true
        });
        let horizon = now - self.timing.exchange_lifetime_ms;
        while let Some((key, at)) = self.seen_order.front().copied() {
            if at > horizon {
                break;
            }
            self.seen_order.pop_front();
            self.seen.remove(&key);
        }
        (events, out)
    }

    /// When `poll` next has work.
    pub fn next_wakeup(&self) -> Option<i64> {
        let retransmit = self.outgoing.values().map(|o| o.next_at).min();
        let forget = self
            .seen_order
            .front()
            .map(|(_, at)| at + self.timing.exchange_lifetime_ms);
        retransmit.into_iter().chain(forget).min()
    }
}

fn empty(kind: MessageType, mid: u16) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Empty;
    packet.header.message_id = mid;
    packet.to_bytes().unwrap_or_default()
}

#[cfg(test)]
#[path = "endpoint_tests.rs"]
mod tests;
