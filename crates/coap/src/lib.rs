//! CoAP (RFC 7252) and the LwM2M server behaviour IoTDA's NB-IoT devices expect.
//!
//! `endpoint` is the protocol core, a pure state machine (datagrams and time in, events and
//! datagrams out); `lwm2m` reads and builds the LwM2M messages; `server` drives both over a tokio
//! UDP socket and hands registrations and data to a `Lwm2mHandler`. This crate knows nothing of
//! devices, products or the store.

pub mod blockwise;
#[cfg(feature = "dtls")]
mod dtls;
pub mod endpoint;
pub mod lwm2m;
pub mod server;

pub use coap_lite::{MessageClass, MessageType, Packet, ResponseType};
#[cfg(feature = "dtls")]
pub use dtls::{PskLookup, SUITES};
pub use endpoint::{Endpoint, Event, Timing};
pub use lwm2m::{RdRequest, Registration};
pub use server::{CoapHandle, CoapServer, Lwm2mHandler, Outcome};
