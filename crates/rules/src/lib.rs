//! Data forwarding: which platform events go where, and in what shape.
//!
//! `sql` parses and evaluates the rule language (a `select` list and a `where` condition over the
//! push envelope); `envelope` builds IoTDA's push envelope for every subject.

mod admin;
pub mod connector;
mod deliver;
pub mod envelope;
pub mod forward;
#[cfg(feature = "http")]
pub mod http;
mod lanes;
pub mod legacy;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
mod report_queue;
pub mod sql;

pub use admin::{NewRule, RulePatch, Subscription};
pub use forward::{ForwardConfig, Forwarder};

/// Errors of the rules layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// The rule SQL does not parse; `position` is the 1-based character where it went wrong.
    #[error("{clause} clause, at character {position}: {message}")]
    Syntax {
        clause: &'static str,
        position: usize,
        message: String,
    },
}
