//! Platform events: every uplink and every status or resource change, typed, for rules and push.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::device::{DeviceStatus, StatusCause};
use crate::downlink::{CommandStatus, MessageStatus};

/// Identifies the device an event is about. Events hold it behind an `Arc`: a connection's is
/// shared by every event it raises instead of copying six strings per report.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRef {
    pub project_id: String,
    pub app_id: String,
    pub device_id: String,
    pub node_id: String,
    pub product_id: String,
    pub gateway_id: String,
}

/// One service's applied properties in a report.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedService {
    pub service_id: String,
    pub properties: Map<String, Value>,
    /// `properties` as compact JSON text, written once where the report is read: the stored
    /// history row and the push envelope both use it (each used to write it again). Build with
    /// `new`, and do not change `properties` afterwards: the text would no longer match.
    pub properties_json: String,
    /// Unix milliseconds: the device's `event_time`, or the receive time when absent or invalid.
    pub event_time: i64,
}

impl ReportedService {
    pub fn new(service_id: String, properties: Map<String, Value>, event_time: i64) -> Self {
        // Cannot fail: the keys are strings and the values JSON.
        let properties_json = serde_json::to_string(&properties).unwrap_or_default();
        ReportedService {
            service_id,
            properties,
            properties_json,
            event_time,
        }
    }
}

/// Something that happened on the platform.
#[derive(Debug, Clone, PartialEq)]
pub enum PlatformEvent {
    DeviceStatusChanged {
        device: Arc<DeviceRef>,
        status: DeviceStatus,
        cause: StatusCause,
        at: i64,
    },
    PropertiesReported {
        device: Arc<DeviceRef>,
        request_id: String,
        services: Vec<ReportedService>,
        at: i64,
    },
    MessageReported {
        device: Arc<DeviceRef>,
        request_id: String,
        topic: String,
        payload: bytes_like::Payload,
        at: i64,
    },
    /// A device answered a synchronous command.
    CommandResponded {
        device: Arc<DeviceRef>,
        command_id: String,
        response: Value,
        at: i64,
    },
    AsyncCommandStatusChanged {
        device: Arc<DeviceRef>,
        command_id: String,
        status: CommandStatus,
        result: Option<Value>,
        at: i64,
    },
    MessageStatusChanged {
        device: Arc<DeviceRef>,
        message_id: String,
        status: MessageStatus,
        at: i64,
    },
    DeviceCreated {
        device: Arc<DeviceRef>,
        at: i64,
    },
    DeviceUpdated {
        device: Arc<DeviceRef>,
        at: i64,
    },
    DeviceDeleted {
        device: Arc<DeviceRef>,
        at: i64,
    },
    ProductCreated {
        project_id: String,
        product_id: String,
        at: i64,
    },
    ProductUpdated {
        project_id: String,
        product_id: String,
        at: i64,
    },
    ProductDeleted {
        project_id: String,
        product_id: String,
        at: i64,
    },
}

/// Shared, cheaply cloned payload bytes (events are broadcast to many consumers).
pub mod bytes_like {
    use std::sync::Arc;

    pub type Payload = Arc<[u8]>;
}
