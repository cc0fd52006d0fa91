//! Device status and the reasons it changes.

use serde::{Deserialize, Serialize};

/// The status IoTDA reports for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DeviceStatus {
    /// Registered, never connected.
    Inactive,
    Online,
    Offline,
    /// Short-connection devices (LwM2M, HTTPS) silent for longer than the abnormal threshold.
    Abnormal,
    /// Frozen by an administrator; cannot connect.
    Frozen,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Inactive => "INACTIVE",
            DeviceStatus::Online => "ONLINE",
            DeviceStatus::Offline => "OFFLINE",
            DeviceStatus::Abnormal => "ABNORMAL",
            DeviceStatus::Frozen => "FROZEN",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceStatus> {
        Some(match s {
            "INACTIVE" => DeviceStatus::Inactive,
            "ONLINE" => DeviceStatus::Online,
            "OFFLINE" => DeviceStatus::Offline,
            "ABNORMAL" => DeviceStatus::Abnormal,
            "FROZEN" | "FREEZED" => DeviceStatus::Frozen,
            _ => return None,
        })
    }
}

/// Why a device's status changed; carried on the status event so operators can tell a clean
/// disconnect from a keepalive expiry or a takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusCause {
    Connected,
    ClientDisconnected,
    KeepaliveExpired,
    ConnectionLost,
    TakenOver,
    ProtocolError,
    ServerShutdown,
    Kicked,
    Frozen,
    Unfrozen,
}
