//! A product's codec as stored and applied, and the codec test tool's answers.

use serde_json::{Value, json};

use crate::definition::Definition;
use crate::error::{CodecError, definition};
use crate::wire::{Decoded, bits, hex_decode, hex_encode};

/// A product's codec, ready to apply.
#[derive(Debug, Clone)]
pub enum Codec {
    /// IoTDA's online (declarative) codec.
    Declarative(Definition),
    /// A JavaScript codec (`decode(payload, topic)`, `encode(json)`).
    #[cfg(feature = "javascript")]
    Script(crate::script::Script),
}

impl Codec {
    /// Reads a stored or uploaded codec: `{"type": "declarative", "definition": {...}}`, or a bare
    /// definition (`{"messages": [...]}`). It is checked before it is accepted.
    pub fn from_json(json: &Value) -> Result<Codec, CodecError> {
        if json.get("messages").is_some() {
            return Ok(Codec::Declarative(Definition::from_json(json)?));
        }
        match json.get("type").and_then(Value::as_str) {
            Some("declarative") => Ok(Codec::Declarative(Definition::from_json(
                json.get("definition").unwrap_or(&Value::Null),
            )?)),
            #[cfg(feature = "javascript")]
            Some("javascript") => {
                let source = json
                    .get("script")
                    .and_then(Value::as_str)
                    .ok_or_else(|| definition("a javascript codec needs its \"script\" text"))?;
                Ok(Codec::Script(crate::script::Script::new(source)?))
            }
            Some(other) => Err(definition(format!(
                "codec type {other:?} is not known; use \"declarative\" or \"javascript\""
            ))),
            None => Err(definition(
                "a codec is {\"type\": \"declarative\", \"definition\": {\"messages\": [...]}}",
            )),
        }
    }

    /// The codec in its stored form.
    pub fn to_json(&self) -> Value {
        match self {
            Codec::Declarative(definition) => {
                json!({ "type": "declarative", "definition": definition })
            }
            #[cfg(feature = "javascript")]
            Codec::Script(script) => json!({ "type": "javascript", "script": script.source() }),
        }
    }

    /// Whether decoding may take long (a script, up to its operation budget), so a caller on an
    /// async thread should move it off.
    pub fn may_run_long(&self) -> bool {
        match self {
            Codec::Declarative(_) => false,
            #[cfg(feature = "javascript")]
            Codec::Script(_) => true,
        }
    }

    /// Device bytes → platform JSON; `topic` is the MQTT topic they came on (none for LwM2M).
    pub fn decode(&self, payload: &[u8], topic: Option<&str>) -> Result<Decoded, CodecError> {
        match self {
            Codec::Declarative(definition) => definition.decode(payload),
            #[cfg(feature = "javascript")]
            Codec::Script(script) => script.decode(payload, topic),
        }
    }

    /// A command (`{"service_id", "command_name", "paras", "mid"}`) → device bytes.
    pub fn encode(&self, command: &Value) -> Result<Vec<u8>, CodecError> {
        match self {
            Codec::Declarative(definition) => definition.encode(command),
            #[cfg(feature = "javascript")]
            Codec::Script(script) => script.encode(command),
        }
    }

    /// The codec test tool: `{"decode": "HEX", "topic": ...}` or `{"encode": {command}}`. The answer shows the
    /// decoded JSON (and the response the device would get), or the bytes in hex, bits and Base64.
    pub fn test(&self, request: &Value) -> Result<Value, CodecError> {
        if let Some(hex) = request.get("decode").and_then(Value::as_str) {
            let bytes = hex_decode(hex).map_err(CodecError::Decode)?;
            let topic = request.get("topic").and_then(Value::as_str);
            let decoded = self.decode(&bytes, topic)?;
            let response = decoded.response.as_deref().map(hex_encode);
            return Ok(json!({ "decoded": decoded.json, "response": response }));
        }
        if let Some(command) = request.get("encode") {
            return Ok(bytes_view(&self.encode(command)?));
        }
        Err(CodecError::Encode(
            "give {\"decode\": \"<hex>\"} or {\"encode\": {\"command_name\", \"paras\", ...}}"
                .into(),
        ))
    }
}

/// Bytes shown every way a developer compares them with a device's trace.
pub fn bytes_view(bytes: &[u8]) -> Value {
    use base64::Engine;
    json!({
        "hex": hex_encode(bytes),
        "bits": bits(bytes),
        "base64": base64::engine::general_purpose::STANDARD.encode(bytes),
        "length": bytes.len(),
    })
}
