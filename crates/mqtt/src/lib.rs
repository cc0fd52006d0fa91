//! MQTT 3.1.1 and 5.0, server side.
//!
//! `codec` is pure (bytes in, packets out, and back); `server` is the thin tokio driver that owns
//! the sockets and calls a [`server::Broker`] for every decision. Nothing here knows IoTDA topics,
//! devices or the store: the engine supplies those through the broker traits.

pub mod client;
pub mod codec;
pub mod listener;
pub mod read;
pub mod server;
pub mod stats;
pub mod websocket;

pub use codec::{Packet, Protocol, Publish, QoS};

/// Errors of the MQTT layer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MqttError {
    /// The packet is longer than the configured maximum; the connection is closed.
    #[error("packet of {size} bytes exceeds the limit of {limit} bytes")]
    PacketTooLarge { size: usize, limit: usize },
    /// The bytes do not form a valid MQTT packet.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A protocol level other than 3 (3.1), 4 (3.1.1) or 5 (5.0).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    /// A packet that is valid MQTT but not allowed here (QoS 2, AUTH, a second CONNECT, ...).
    #[error("protocol violation: {0}")]
    Violation(&'static str),
}
