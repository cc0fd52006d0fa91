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
    /// A short-connection (NB-IoT) device sent no data for longer than a status threshold.
    NoData,
    /// A short-connection device sent data again.
    DataReceived,
    /// A gateway reported its child's status (`sub_device_update_status`).
    GatewayReported,
}

/// How a device authenticates and what the platform keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    /// `SECRET` or `CERTIFICATES`.
    pub auth_type: String,
    pub secret: Option<String>,
    pub secondary_secret: Option<String>,
    pub fingerprint: Option<String>,
    pub secondary_fingerprint: Option<String>,
    pub secure_access: bool,
    /// Seconds a device has to connect for the first time before its registration lapses; 0 = never.
    pub timeout: i64,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Record sequence number; its 24-hex form is the pagination marker.
    pub seq: i64,
    pub project_id: String,
    pub app_id: String,
    pub device_id: String,
    pub node_id: String,
    pub product_id: String,
    pub gateway_id: String,
    pub device_name: Option<String>,
    pub description: Option<String>,
    pub auth: DeviceAuth,
    pub extension_info: Option<serde_json::Value>,
    /// Connection status; `frozen` overrides it in what the API shows.
    pub status: DeviceStatus,
    pub frozen: bool,
    pub fw_version: Option<String>,
    pub sw_version: Option<String>,
    pub sdk_version: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub first_online_at: Option<i64>,
    pub last_online_at: Option<i64>,
    pub last_offline_at: Option<i64>,
    pub status_updated_at: Option<i64>,
}

impl Device {
    /// The status the API shows: FROZEN wins over the connection status.
    pub fn shown_status(&self) -> DeviceStatus {
        if self.frozen {
            DeviceStatus::Frozen
        } else {
            self.status
        }
    }

    /// The identity carried on platform events.
    pub fn reference(&self) -> std::sync::Arc<crate::event::DeviceRef> {
        std::sync::Arc::new(crate::event::DeviceRef {
            project_id: self.project_id.clone(),
            app_id: self.app_id.clone(),
            device_id: self.device_id.clone(),
            node_id: self.node_id.clone(),
            product_id: self.product_id.clone(),
            gateway_id: self.gateway_id.clone(),
        })
    }
}
