//! Codecs turn the binary payloads of constrained devices (NB-IoT over LwM2M, MQTT devices whose
//! product declares binary data) into property reports and command responses, and commands into
//! bytes. Pure: no I/O, no clock.
//!
//! The declarative codec (`Definition`) is what IoTDA calls online codec development: messages
//! told apart by a `msgid` field, fixed-size big-endian integers, decimals, ASCII strings, byte
//! arrays shown as Base64, and a `mid` field that pairs a command with its response.

mod codec;
mod definition;
mod error;
#[cfg(feature = "javascript")]
pub mod script;
mod wire;

pub use codec::{Codec, bytes_view};
pub use definition::{Definition, Field, FieldType, Message, MessageKind, Role};
pub use error::CodecError;
pub use wire::{Decoded, bits, hex_decode, hex_encode};
