//! Block-wise transfer (RFC 7959), pure: the Block1/Block2 option value, splitting a payload into
//! blocks, and reassembling the blocks of a request a peer sends in pieces.

use std::collections::HashMap;
use std::net::SocketAddr;

use coap_lite::{CoapOption, MessageClass, Packet, ResponseType};

/// Blocks of 1024 bytes (SZX 6), the largest CoAP allows and what fits an NB-IoT datagram.
pub const SZX: u8 = 6;
/// Largest body reassembled from blocks.
pub const MAX_BODY: usize = 64 * 1024;
/// Requests being reassembled at once, at most (beyond, new ones are refused with 5.03).
const MAX_PARTIAL: usize = 1024;
/// A reassembly nobody continued for this long is forgotten.
const STALE_MS: i64 = 120_000;

/// A Block1/Block2 option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    pub szx: u8,
}

impl Block {
    pub fn size(&self) -> usize {
        1 << (self.szx + 4)
    }

    /// Reads the option value (0 to 3 bytes, big-endian).
    pub fn decode(value: &[u8]) -> Option<Block> {
        if value.len() > 3 {
            return None;
        }
        let raw = value.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b));
        let szx = (raw & 0b111) as u8;
        (szx < 7).then_some(Block {
            num: raw >> 4,
            more: raw & 0b1000 != 0,
            szx,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let raw = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx);
        let bytes = raw.to_be_bytes();
        let skip = bytes.iter().take(3).take_while(|b| **b == 0).count();
        bytes[skip..].to_vec()
    }

    /// The block option of a packet, if it has a valid one.
    pub fn of(packet: &Packet, option: CoapOption) -> Option<Block> {
        Block::decode(packet.get_first_option(option)?)
    }

    pub fn set(self, packet: &mut Packet, option: CoapOption) {
        packet.clear_option(option);
        packet.add_option(option, self.encode());
    }
}

/// `payload` in blocks of `2^(szx+4)` bytes.
pub fn split(payload: &[u8], szx: u8) -> Vec<(Block, &[u8])> {
    let size = 1usize << (szx + 4);
    let count = payload.len().div_ceil(size).max(1);
    (0..count)
        .map(|i| {
            let end = ((i + 1) * size).min(payload.len());
            let block = Block {
                num: i as u32,
                more: i + 1 < count,
                szx,
            };
            (block, &payload[(i * size).min(payload.len())..end])
        })
        .collect()
}

/// What to do with one block of a request.
#[derive(Debug)]
pub enum Step {
    /// More blocks are expected: answer with this (2.31 Continue).
    Continue(Packet),
    /// The whole request, as if it had come in one piece.
    Complete(Packet),
    /// Refuse the request with this code (out of order, too large).
    Refuse(ResponseType),
}

struct Partial {
    body: Vec<u8>,
    next: u32,
    updated: i64,
}

/// Requests being received in blocks, by peer and path.
#[derive(Default)]
pub struct Reassembly {
    partial: HashMap<(SocketAddr, Vec<Vec<u8>>), Partial>,
}

impl std::fmt::Debug for Reassembly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reassembly")
            .field("partial", &self.partial.len())
            .finish()
    }
}

impl Reassembly {
    /// Takes one request carrying a Block1 option.
    pub fn push(&mut self, from: SocketAddr, mut packet: Packet, block: Block, now: i64) -> Step {
        self.partial.retain(|_, p| now - p.updated < STALE_MS);
        let path: Vec<Vec<u8>> = packet
            .get_option(CoapOption::UriPath)
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default();
        let key = (from, path);
        if block.num == 0 {
            self.partial.remove(&key); // A peer starting over.
            if self.partial.len() >= MAX_PARTIAL {
                return Step::Refuse(ResponseType::ServiceUnavailable);
            }
        }
        let expected = self.partial.get(&key).map_or(0, |p| p.next);
        if block.num != expected {
            self.partial.remove(&key);
            return Step::Refuse(ResponseType::RequestEntityIncomplete);
        }
        let partial = self.partial.entry(key.clone()).or_insert(Partial {
            body: Vec::new(),
            next: 0,
            updated: now,
        });
        partial.body.extend_from_slice(&packet.payload);
        partial.next += 1;
        partial.updated = now;
        if partial.body.len() > MAX_BODY {
            self.partial.remove(&key);
            return Step::Refuse(ResponseType::RequestEntityTooLarge);
        }
        if block.more {
            let mut answer = Packet::new();
            answer.header.code = MessageClass::Response(ResponseType::Continue);
            block.set(&mut answer, CoapOption::Block1);
            return Step::Continue(answer);
        }
        let body = self
            .partial
            .remove(&key)
            .map(|p| p.body)
            .unwrap_or_default();
        packet.clear_option(CoapOption::Block1);
        packet.payload = body;
        Step::Complete(packet)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn option_values_round_trip() {
        let table: &[(&[u8], Block)] = &[
            (
                &[],
                Block {
                    num: 0,
                    more: false,
                    szx: 0,
                },
            ),
            (
                &[0x0E],
                Block {
                    num: 0,
                    more: true,
                    szx: 6,
                },
            ),
            (
                &[0x16],
                Block {
                    num: 1,
                    more: false,
                    szx: 6,
                },
            ),
            (
                &[0x01, 0x0E],
                Block {
                    num: 16,
                    more: true,
                    szx: 6,
                },
            ),
        ];
        for (bytes, block) in table {
            assert_eq!(Block::decode(bytes), Some(*block), "{bytes:?}");
            assert_eq!(Block::decode(&block.encode()), Some(*block));
        }
        assert_eq!(Block::decode(&[0x07]), None, "SZX 7 is reserved");
        assert_eq!(Block::decode(&[1, 2, 3, 4]), None, "at most 3 bytes");
    }

    #[test]
    fn payloads_split_and_reassemble() {
        let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let blocks = split(&payload, SZX);
        assert_eq!(blocks.len(), 3);
        assert_eq!(
            blocks.iter().map(|(_, b)| b.len()).collect::<Vec<_>>(),
            [1024, 1024, 452]
        );
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut reassembly = Reassembly::default();
        let mut result = None;
        for (block, part) in blocks {
            let mut p = Packet::new();
            p.add_option(CoapOption::UriPath, b"rd".to_vec());
            p.payload = part.to_vec();
            match reassembly.push(peer, p, block, 0) {
                Step::Continue(answer) => {
                    assert_eq!(Block::of(&answer, CoapOption::Block1), Some(block))
                }
                Step::Complete(whole) => result = Some(whole),
                Step::Refuse(code) => panic!("{code:?}"),
            }
        }
        let whole = result.unwrap();
        assert_eq!(whole.payload, payload);
        assert!(whole.get_option(CoapOption::Block1).is_none());
    }

    #[test]
    fn out_of_order_and_oversized_bodies_are_refused() {
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut reassembly = Reassembly::default();
        let skip = Block {
            num: 1,
            more: true,
            szx: SZX,
        };
        assert!(matches!(
            reassembly.push(peer, Packet::new(), skip, 0),
            Step::Refuse(ResponseType::RequestEntityIncomplete)
        ));
        let mut refused = None;
        for num in 0..70 {
            let mut p = Packet::new();
            p.payload = vec![0; 1024];
            if let Step::Refuse(code) = reassembly.push(
                peer,
                p,
                Block {
                    num,
                    more: true,
                    szx: SZX,
                },
                0,
            ) {
                refused = Some((num, code));
                break;
            }
        }
        assert_eq!(refused, Some((64, ResponseType::RequestEntityTooLarge)));
    }
}
