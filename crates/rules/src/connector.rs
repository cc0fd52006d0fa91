//! The channels an action can forward to. Each channel lives in its own module behind a cargo
//! feature; this enum is the one place that knows them all.

use std::time::Duration;

use ioda_store::{QueuedMessage, RoutingAction};
use serde_json::Value;

use crate::forward::ForwardConfig;

/// The channels ioda can forward to.
pub const CHANNELS: &[&str] = &["HTTP_FORWARDING"];

/// A ready-to-use channel.
#[derive(Debug, Clone)]
pub enum Connector {
    #[cfg(feature = "http")]
    Http(crate::http::Target),
}

impl Connector {
    /// Checks an action's channel and details; the error says what is wrong.
    pub fn build(action: &RoutingAction, _config: &ForwardConfig) -> Result<Connector, String> {
        Self::from_parts(&action.channel, &action.channel_detail)
    }

    pub fn from_parts(channel: &str, detail: &Value) -> Result<Connector, String> {
        match channel {
            #[cfg(feature = "http")]
            "HTTP_FORWARDING" => {
                let url = detail
                    .pointer("/http_forwarding/url")
                    .and_then(Value::as_str)
                    .ok_or("channel_detail.http_forwarding.url is required")?;
                Ok(Connector::Http(crate::http::parse_url(url)?))
            }
            other => Err(format!(
                "channel {other} is not available; this build offers {}",
                CHANNELS.join(", ")
            )),
        }
    }

    /// Delivers one message.
    pub async fn deliver(&self, message: &QueuedMessage, timeout: Duration) -> Result<(), String> {
        match self {
            #[cfg(feature = "http")]
            Connector::Http(target) => {
                crate::http::post(target, &message.message_id, &message.payload, timeout).await
            }
        }
    }
}
