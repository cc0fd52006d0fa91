//! Downlink lifecycles: asynchronous command and device message statuses.

/// The status of an asynchronous command, as IoTDA names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandStatus {
    /// Cached, not yet sent (device offline, or waiting for it to report).
    Pending,
    /// Sent to the device, not acknowledged yet.
    Sent,
    /// The device acknowledged receipt (MQTT PUBACK, CoAP ACK); waiting for its result.
    Delivered,
    Successful,
    Failed,
    /// No acknowledgement or result after the resend schedule.
    Timeout,
    /// Its cache time ran out before it could be sent.
    Expired,
    Canceled,
}

impl CommandStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Pending => "PENDING",
            CommandStatus::Sent => "SENT",
            CommandStatus::Delivered => "DELIVERED",
            CommandStatus::Successful => "SUCCESSFUL",
            CommandStatus::Failed => "FAILED",
            CommandStatus::Timeout => "TIMEOUT",
            CommandStatus::Expired => "EXPIRED",
            CommandStatus::Canceled => "CANCELED",
        }
    }

    pub fn parse(s: &str) -> Option<CommandStatus> {
        Some(match s {
            "PENDING" => CommandStatus::Pending,
            "SENT" => CommandStatus::Sent,
            "DELIVERED" => CommandStatus::Delivered,
            "SUCCESSFUL" => CommandStatus::Successful,
            "FAILED" => CommandStatus::Failed,
            "TIMEOUT" => CommandStatus::Timeout,
            "EXPIRED" => CommandStatus::Expired,
            "CANCELED" => CommandStatus::Canceled,
            _ => return None,
        })
    }

    /// Whether no further transition can happen.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CommandStatus::Pending | CommandStatus::Sent | CommandStatus::Delivered
        )
    }
}

/// The status of a downlink message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageStatus {
    /// Cached while the device is offline (or awaiting its acknowledgement).
    Pending,
    Delivered,
    Failed,
    /// Cached longer than its time to live.
    Timeout,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Pending => "PENDING",
            MessageStatus::Delivered => "DELIVERED",
            MessageStatus::Failed => "FAILED",
            MessageStatus::Timeout => "TIMEOUT",
        }
    }

    pub fn parse(s: &str) -> Option<MessageStatus> {
        Some(match s {
            "PENDING" => MessageStatus::Pending,
            "DELIVERED" => MessageStatus::Delivered,
            "FAILED" => MessageStatus::Failed,
            "TIMEOUT" => MessageStatus::Timeout,
            _ => return None,
        })
    }
}

/// The resend schedule of an unacknowledged asynchronous command: the window, in milliseconds,
/// after send number `sends` (1 = the first send) within which the next step happens. After the
/// fourth send the next step is TIMEOUT.
pub fn resend_window(sends: i64) -> (i64, i64) {
    match sends {
        1 => (10_000, 15_000),
        2 => (20_000, 30_000),
        3 => (40_000, 60_000),
        _ => (80_000, 180_000),
    }
}

/// Sends an unacknowledged command gets in all: the first and three resends.
pub const MAX_SENDS: i64 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_finality() {
        for s in [
            "PENDING",
            "SENT",
            "DELIVERED",
            "SUCCESSFUL",
            "FAILED",
            "TIMEOUT",
            "EXPIRED",
            "CANCELED",
        ] {
            assert_eq!(CommandStatus::parse(s).map(CommandStatus::as_str), Some(s));
        }
        assert!(!CommandStatus::Sent.is_final() && CommandStatus::Expired.is_final());
        for s in ["PENDING", "DELIVERED", "FAILED", "TIMEOUT"] {
            assert_eq!(MessageStatus::parse(s).map(MessageStatus::as_str), Some(s));
        }
        assert_eq!(CommandStatus::parse("sent"), None);
    }

    #[test]
    fn resend_schedule_matches_the_faq() {
        let windows: Vec<_> = (1..=4).map(resend_window).collect();
        assert_eq!(
            windows,
            vec![
                (10_000, 15_000),
                (20_000, 30_000),
                (40_000, 60_000),
                (80_000, 180_000)
            ]
        );
    }
}
