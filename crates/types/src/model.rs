//! Product models: the services, properties, commands and events a product declares.
//!
//! Field names are IoTDA's own, so the same types serve the API body, the stored copy and validation.

use serde::{Deserialize, Serialize};

/// The data types a property or command parameter may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataType {
    #[serde(rename = "int")]
    Int,
    #[serde(rename = "long")]
    Long,
    #[serde(rename = "decimal")]
    Decimal,
    #[serde(rename = "string")]
    String,
    #[serde(rename = "DateTime", alias = "datetime")]
    DateTime,
    #[serde(rename = "jsonObject", alias = "jsonobject")]
    JsonObject,
    #[serde(rename = "enum")]
    Enum,
    #[serde(rename = "boolean", alias = "bool")]
    Boolean,
    #[serde(rename = "string list", alias = "stringList")]
    StringList,
}

impl DataType {
    /// The IoTDA spelling, used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Int => "int",
            DataType::Long => "long",
            DataType::Decimal => "decimal",
            DataType::String => "string",
            DataType::DateTime => "DateTime",
            DataType::JsonObject => "jsonObject",
            DataType::Enum => "enum",
            DataType::Boolean => "boolean",
            DataType::StringList => "string list",
        }
    }

    /// Whether `min`/`max` bound the numeric value (otherwise they are ignored).
    pub fn is_numeric(self) -> bool {
        matches!(self, DataType::Int | DataType::Long | DataType::Decimal)
    }
}

macro_rules! value_fields {
    ($(#[$meta:meta])* pub struct $name:ident { $(#[$nmeta:meta])* pub $key:ident: String, $($extra:tt)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(#[$nmeta])*
            pub $key: String,
            pub data_type: DataType,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub required: Option<bool>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub enum_list: Option<Vec<String>>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub min: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub max: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub max_length: Option<i64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub step: Option<f64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub unit: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub description: Option<String>,
            $($extra)*
        }

        impl $name {
            /// The constraints a value of this element must meet.
            pub fn constraints(&self) -> Constraints<'_> {
                Constraints {
                    data_type: self.data_type,
                    enum_list: self.enum_list.as_deref().unwrap_or_default(),
                    min: self.min.as_deref(),
                    max: self.max.as_deref(),
                    max_length: self.max_length,
                }
            }
        }
    };
}

/// The value constraints shared by properties and command parameters, borrowed from either.
#[derive(Debug, Clone, Copy)]
pub struct Constraints<'a> {
    pub data_type: DataType,
    pub enum_list: &'a [String],
    pub min: Option<&'a str>,
    pub max: Option<&'a str>,
    pub max_length: Option<i64>,
}

// serde cannot combine `flatten` with `deny_unknown_fields`, so the shared fields are stamped out
// by a macro instead of living in a flattened struct.
value_fields! {
    /// A property of a service (`ServiceProperty` in the SDK).
    pub struct ServiceProperty {
        pub property_name: String,
        /// Access: any combination of R (read), W (write) and E (event/subscribe).
        pub method: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub default_value: Option<serde_json::Value>,
    }
}

value_fields! {
    /// A command parameter (`ServiceCommandPara` in the SDK).
    pub struct CommandPara {
        pub para_name: String,
    }
}

/// A response a command may produce.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResponse {
    pub response_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paras: Option<Vec<CommandPara>>,
}

/// A command a service accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCommand {
    pub command_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paras: Option<Vec<CommandPara>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<Vec<CommandResponse>>,
}

/// An event a service may raise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEvent {
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paras: Option<Vec<CommandPara>>,
}

/// One service of a product model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCapability {
    pub service_id: String,
    pub service_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Vec<ServiceProperty>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<ServiceCommand>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<ServiceEvent>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option: Option<String>,
}

impl ServiceCapability {
    /// The property named `name`, if the service declares it.
    pub fn property(&self, name: &str) -> Option<&ServiceProperty> {
        self.properties
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.property_name == name)
    }
}

/// A product: what kind of device it describes and its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// Record sequence number; its 24-hex form is the pagination marker.
    #[serde(default)]
    pub seq: i64,
    pub project_id: String,
    pub product_id: String,
    pub app_id: String,
    pub name: String,
    pub device_type: String,
    pub protocol_type: String,
    pub data_format: String,
    pub manufacturer_name: Option<String>,
    pub industry: Option<String>,
    pub description: Option<String>,
    pub service_capabilities: Vec<ServiceCapability>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The product's codec as stored (checked by `ioda-codec` when it is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<serde_json::Value>,
}

impl Product {
    /// The service with id `service_id`, if the model declares it.
    pub fn service(&self, service_id: &str) -> Option<&ServiceCapability> {
        self.service_capabilities
            .iter()
            .find(|s| s.service_id == service_id)
    }
}
