//! Bytes ⇄ JSON with a declarative definition. Big-endian only, as IoTDA's codecs are.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Number, Value, json};

use crate::definition::{Definition, Field, FieldType, Message, MessageKind, Role};
use crate::error::CodecError;

/// What a device's bytes meant, as the platform's JSON (the shape IoTDA's script codecs return
/// from `decode`): `{"msg_type": "properties_report", "services": [...]}` or
/// `{"msg_type": "command_response", "mid", "result_code", "paras", ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub json: Value,
    /// The bytes to answer a data report with, when the codec defines them.
    pub response: Option<Vec<u8>>,
}

impl Decoded {
    /// Whether the device answered a command.
    pub fn is_command_response(&self) -> bool {
        self.json["msg_type"] == "command_response"
    }

    /// The `mid` a command response carries.
    pub fn mid(&self) -> Option<i64> {
        self.json["mid"].as_i64()
    }

    /// The platform JSON.
    pub fn to_json(&self) -> Value {
        self.json.clone()
    }
}

impl Definition {
    /// Decodes what a device sent.
    pub fn decode(&self, payload: &[u8]) -> Result<Decoded, CodecError> {
        let message = self.uplink_message(payload)?;
        let values = read_fields(message, payload)?;
        let role = |role: Role| {
            message
                .role_field(role)
                .and_then(|(_, f)| values.get(&f.name))
                .and_then(Value::as_i64)
        };
        let data: Map<String, Value> = message
            .fields
            .iter()
            .filter(|f| f.role.is_none() && !message.is_length_field(&f.name))
            .filter_map(|f| Some((f.name.clone(), values.get(&f.name)?.clone())))
            .collect();
        Ok(match message.kind {
            MessageKind::CommandResponse => Decoded {
                json: json!({
                    "msg_type": "command_response",
                    "service_id": message.service_id,
                    "command_name": message.command_name,
                    "mid": role(Role::Mid),
                    "result_code": role(Role::Errcode).unwrap_or(0),
                    "paras": data,
                }),
                response: None,
            },
            _ => Decoded {
                json: json!({
                    "msg_type": "properties_report",
                    "services": [{ "service_id": message.service_id, "properties": data }],
                }),
                response: message
                    .response
                    .as_deref()
                    .map(hex_decode)
                    .transpose()
                    .map_err(CodecError::Decode)?,
            },
        })
    }

    /// Encodes a command: `{"service_id", "command_name", "paras", "mid"}` (`service_id` may be
    /// left out when the command name is unique).
    pub fn encode(&self, command: &Value) -> Result<Vec<u8>, CodecError> {
        let fail = |text: String| CodecError::Encode(text);
        let name = command["command_name"]
            .as_str()
            .ok_or_else(|| fail("command_name is required".into()))?;
        let service = command["service_id"].as_str();
        let candidates: Vec<&Message> = self
            .messages
            .iter()
            .filter(|m| m.kind == MessageKind::Command && m.command_name.as_deref() == Some(name))
            .filter(|m| service.is_none_or(|s| s == m.service_id))
            .collect();
        let message = match candidates.as_slice() {
            [one] => *one,
            [] => return Err(fail(format!("the codec has no command {name:?}"))),
            _ => {
                return Err(fail(format!(
                    "several services have a command {name:?}; give service_id"
                )));
            }
        };
        let empty = Map::new();
        let paras = match &command["paras"] {
            Value::Object(paras) => paras,
            Value::Null => &empty,
            _ => return Err(fail("paras must be an object".into())),
        };
        if let Some(unknown) = paras.keys().find(|k| {
            !message
                .fields
                .iter()
                .any(|f| &f.name == *k && f.role.is_none())
        }) {
            return Err(fail(format!(
                "paras.{unknown} is not a field of command {name:?}"
            )));
        }
        write_fields(message, paras, command["mid"].as_i64())
    }

    fn uplink_message(&self, payload: &[u8]) -> Result<&Message, CodecError> {
        let uplink: Vec<&Message> = self.uplink().collect();
        let first = uplink
            .first()
            .ok_or_else(|| CodecError::Decode("the codec defines no uplink message".into()))?;
        let Some((index, field)) = first.role_field(Role::Msgid) else {
            return Ok(first);
        };
        let offset = first.offset_of(index).unwrap_or_default();
        let id = read_int(field, payload, offset)?;
        uplink
            .into_iter()
            .find(|m| m.msgid() == Some(id))
            .ok_or_else(|| {
                CodecError::Decode(format!(
                    "no uplink message has msgid {id:#x} (read at byte {offset})"
                ))
            })
    }
}

/// The `size` bytes of a field at `at`, or why the payload is too short.
fn field_bytes_at<'p>(
    field: &Field,
    payload: &'p [u8],
    at: usize,
    size: usize,
) -> Result<&'p [u8], CodecError> {
    at.checked_add(size)
        .and_then(|end| payload.get(at..end))
        .ok_or_else(|| {
            CodecError::Decode(format!(
                "field {:?} needs {size} bytes at byte {at}; the payload has {}",
                field.name,
                payload.len()
            ))
        })
}

fn read_int(field: &Field, payload: &[u8], at: usize) -> Result<i64, CodecError> {
    let (size, signed) = field.ty.int().unwrap_or((1, false));
    let bytes = field_bytes_at(field, payload, at, size)?;
    let raw = bytes.iter().fold(0i64, |n, b| (n << 8) | i64::from(*b));
    let bits = size as u32 * 8;
    Ok(if signed && raw >> (bits - 1) == 1 {
        raw - (1i64 << bits)
    } else {
        raw
    })
}

fn read_fields(message: &Message, payload: &[u8]) -> Result<Map<String, Value>, CodecError> {
    let mut values = Map::new();
    let mut at = 0usize;
    for field in &message.fields {
        let size = match field.fixed_size() {
            Some(size) => size,
            None => {
                let length_field = field.length_field.as_deref().unwrap_or_default();
                let length = values
                    .get(length_field)
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                usize::try_from(length).map_err(|_| {
                    CodecError::Decode(format!(
                        "field {:?}: length {length} (from {length_field:?}) is negative",
                        field.name
                    ))
                })?
            }
        };
        let value = if field.ty.int().is_some() {
            let raw = read_int(field, payload, at)?;
            scaled(raw, field.decimals)
        } else {
            text_or_bytes(field, field_bytes_at(field, payload, at, size)?)?
        };
        values.insert(field.name.clone(), value);
        at += size;
    }
    if at != payload.len() {
        return Err(CodecError::Decode(format!(
            "message {:?} is {at} bytes; the payload has {} ({} left over)",
            message.name,
            payload.len(),
            payload.len() - at
        )));
    }
    Ok(values)
}

fn scaled(raw: i64, decimals: u32) -> Value {
    if decimals == 0 {
        return Value::from(raw);
    }
    let value = raw as f64 / 10f64.powi(decimals as i32);
    Number::from_f64(value).map_or(Value::Null, Value::Number)
}

fn text_or_bytes(field: &Field, bytes: &[u8]) -> Result<Value, CodecError> {
    match field.ty {
        FieldType::String | FieldType::Varstring => {
            let text = bytes
                .iter()
                .rposition(|b| *b != 0)
                .map_or(&bytes[..0], |end| &bytes[..=end]);
            if !text.is_ascii() {
                return Err(CodecError::Decode(format!(
                    "field {:?} is not ASCII",
                    field.name
                )));
            }
            Ok(Value::from(String::from_utf8_lossy(text).into_owned()))
        }
        _ => Ok(Value::from(BASE64.encode(bytes))),
    }
}

fn write_fields(
    message: &Message,
    paras: &Map<String, Value>,
    mid: Option<i64>,
) -> Result<Vec<u8>, CodecError> {
    // Variable-length values are encoded first: the fields holding their lengths come earlier.
    let mut variable: HashMap<&str, Vec<u8>> = HashMap::new();
    for field in message.fields.iter().filter(|f| f.fixed_size().is_none()) {
        variable.insert(&field.name, field_bytes(field, paras.get(&field.name))?);
    }
    let mut out = Vec::new();
    for field in &message.fields {
        if let Some(bytes) = variable.get(field.name.as_str()) {
            out.extend_from_slice(bytes);
            continue;
        }
        let length = message
            .fields
            .iter()
            .find(|f| f.length_field.as_deref() == Some(field.name.as_str()))
            .and_then(|f| variable.get(f.name.as_str()))
            .map(|bytes| bytes.len() as i64);
        let value = match (field.role, length) {
            (_, Some(length)) => Some(Value::from(length)),
            (Some(Role::Mid), _) => Some(Value::from(mid.unwrap_or(0))),
            (Some(_), _) => None,
            (None, _) => paras.get(&field.name).cloned(),
        };
        out.extend(field_bytes(field, value.as_ref())?);
    }
    Ok(out)
}

/// One field's bytes from its JSON value, or from its default when there is none.
fn field_bytes(field: &Field, value: Option<&Value>) -> Result<Vec<u8>, CodecError> {
    let fail = |text: String| CodecError::Encode(format!("field {:?}: {text}", field.name));
    let Some(value) = value else {
        return match &field.default {
            Some(default) => {
                let bytes = hex_decode(default).map_err(fail)?;
                Ok(pad_left(bytes, field.fixed_size().unwrap_or(0)))
            }
            None => Err(fail(
                "a value is required (the field has no default)".into(),
            )),
        };
    };
    if let Some((size, signed)) = field.ty.int() {
        let number = value
            .as_f64()
            .ok_or_else(|| fail(format!("{value} is not a number")))?;
        let raw = (number * 10f64.powi(field.decimals as i32)).round();
        let bits = size as u32 * 8;
        let (low, high) = if signed {
            (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
        } else {
            (0, (1i64 << bits) - 1)
        };
        if !(low as f64..=high as f64).contains(&raw) {
            return Err(fail(format!(
                "{number} does not fit {} ({low}..={high} on the wire)",
                type_name(field.ty)
            )));
        }
        let raw = raw as i64;
        return Ok(raw.to_be_bytes()[8 - size..].to_vec());
    }
    let bytes = match field.ty {
        FieldType::String | FieldType::Varstring => {
            let text = value
                .as_str()
                .ok_or_else(|| fail(format!("{value} is not a string")))?;
            if !text.is_ascii() {
                return Err(fail("only ASCII text can be encoded".into()));
            }
            text.as_bytes().to_vec()
        }
        _ => {
            let text = value
                .as_str()
                .ok_or_else(|| fail(format!("{value} is not a Base64 string")))?;
            BASE64
                .decode(text)
                .map_err(|e| fail(format!("not Base64: {e}")))?
        }
    };
    match field.length {
        Some(length) if bytes.len() > length => Err(fail(format!(
            "{} bytes do not fit its {length}",
            bytes.len()
        ))),
        Some(length) => {
            let mut padded = bytes;
            padded.resize(length, 0);
            Ok(padded)
        }
        None => Ok(bytes),
    }
}

fn pad_left(bytes: Vec<u8>, size: usize) -> Vec<u8> {
    if bytes.len() >= size {
        return bytes;
    }
    let mut out = vec![0u8; size - bytes.len()];
    out.extend(bytes);
    out
}

fn type_name(ty: FieldType) -> String {
    serde_json::to_value(ty)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Hex text (spaces and a `0x` prefix allowed) to bytes.
pub fn hex_decode(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text
        .trim()
        .trim_start_matches("0x")
        .trim_start_matches("0X")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{text:?} is not hexadecimal"));
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// Bytes to upper-case hex.
pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Bytes as a string of bits, the way IoTDA's codec examples show them (`abc` → `011000010110001001100011`).
pub fn bits(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:08b}")).collect()
}
