//! Pure domain types shared by every ioda layer: ids, wall-clock formats, product models and their
//! validation, device status and the platform events that flow on the bus.
//!
//! Nothing here does I/O or reads a clock: times are passed in as Unix milliseconds.

pub mod device;
pub mod downlink;
pub mod event;
pub mod histogram;
pub mod ids;
pub mod model;
pub mod time;
pub mod validate;

pub use device::{Device, DeviceAuth, DeviceStatus, StatusCause};
pub use downlink::{CommandStatus, MessageStatus};
pub use event::PlatformEvent;
pub use model::{Product, ServiceCapability, ServiceProperty};

/// Errors raised by the pure domain layer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TypesError {
    /// A product model definition is inconsistent; the message names the offending element.
    #[error("invalid product model: {0}")]
    InvalidModel(String),
    /// An identifier does not follow the IoTDA character and length rules.
    #[error("invalid {field}: {reason}")]
    InvalidId { field: &'static str, reason: String },
}
