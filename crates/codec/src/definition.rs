//! A declarative codec definition and the checks it must pass before it is saved. The checks
//! are the ones IoTDA's online codec editor applies (duplicate or misplaced `msgid`, a `msgid`
//! that is not an integer, defaults that are not hex, field names that are reserved words) plus
//! the ones that keep decoding unambiguous.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{CodecError, definition};
use crate::wire::hex_decode;

/// A product's declarative codec: the binary messages its devices send and receive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub messages: Vec<Message>,
}

/// What a message carries and which way it goes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Device → platform: property values of one service.
    DataReport,
    /// Platform → device: a command with its parameters.
    Command,
    /// Device → platform: the answer to a command, paired by `mid`.
    CommandResponse,
}

impl MessageKind {
    pub(crate) fn is_uplink(self) -> bool {
        !matches!(self, MessageKind::Command)
    }
}

/// One binary message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub name: String,
    pub kind: MessageKind,
    /// The product-model service the values belong to.
    pub service_id: String,
    /// The command (for `command` and `command_response`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_name: Option<String>,
    pub fields: Vec<Field>,
    /// For a data report: the bytes (hex) the platform answers each report with, IoTDA's
    /// "Add Response Field" (its default answer is `AAAA0000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// One field of a message, in wire order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The property or command parameter the field carries.
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Bytes of a `string` or `array` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<usize>,
    /// For `varstring` and `variant`: the earlier integer field that holds this field's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_field: Option<String>,
    /// Decimal places of an integer field: the wire carries the value times 10^decimals.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub decimals: u32,
    /// Default value in hex (`0x1F` or `1F`); a `msgid` field's default is the message's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// A field the codec fills itself rather than a property or parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Fields the codec handles itself.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Tells messages of the same direction apart; its default is the message's id.
    Msgid,
    /// Pairs a command with its response.
    Mid,
    /// A command response's result code (0 is success).
    Errcode,
}

/// Wire types, named as in IoTDA's online codec editor (`int16u` is an unsigned 16-bit integer).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Int8u,
    Int16u,
    Int24u,
    Int32u,
    Int8s,
    Int16s,
    Int24s,
    Int32s,
    /// Fixed-length ASCII, padded with zero bytes.
    String,
    /// ASCII whose length another field holds.
    Varstring,
    /// Fixed-length bytes, Base64 in JSON.
    Array,
    /// Bytes whose length another field holds, Base64 in JSON.
    Variant,
}

impl Role {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Msgid => "msgid",
            Role::Mid => "mid",
            Role::Errcode => "errcode",
        }
    }
}

impl FieldType {
    /// Size and signedness of an integer type.
    pub(crate) fn int(self) -> Option<(usize, bool)> {
        Some(match self {
            FieldType::Int8u => (1, false),
            FieldType::Int16u => (2, false),
            FieldType::Int24u => (3, false),
            FieldType::Int32u => (4, false),
            FieldType::Int8s => (1, true),
            FieldType::Int16s => (2, true),
            FieldType::Int24s => (3, true),
            FieldType::Int32s => (4, true),
            _ => return None,
        })
    }
}

/// Words a field may not be named (IoTDA generates Java from online codecs, so Java's keywords
/// and literals are refused, as its editor does).
const RESERVED: &[&str] = &[
    "abstract",
    "assert",
    "boolean",
    "break",
    "byte",
    "case",
    "catch",
    "char",
    "class",
    "const",
    "continue",
    "default",
    "do",
    "double",
    "else",
    "enum",
    "extends",
    "final",
    "finally",
    "float",
    "for",
    "goto",
    "if",
    "implements",
    "import",
    "instanceof",
    "int",
    "interface",
    "long",
    "native",
    "new",
    "package",
    "private",
    "protected",
    "public",
    "return",
    "short",
    "static",
    "strictfp",
    "super",
    "switch",
    "synchronized",
    "this",
    "throw",
    "throws",
    "transient",
    "try",
    "void",
    "volatile",
    "while",
    "true",
    "false",
    "null",
    "type",
];

impl Field {
    /// Bytes on the wire when the size is fixed.
    pub(crate) fn fixed_size(&self) -> Option<usize> {
        match self.ty {
            FieldType::String | FieldType::Array => self.length,
            FieldType::Varstring | FieldType::Variant => None,
            int => int.int().map(|(size, _)| size),
        }
    }

    /// The default as an integer (integer fields) — the hex read as a big-endian number.
    /// The default as the integer the field holds (sign-extended for signed types), so it
    /// compares with what `read_int` reads.
    pub(crate) fn default_int(&self) -> Option<i64> {
        let bytes = hex_decode(self.default.as_deref()?).ok()?;
        let raw = bytes.iter().fold(0i64, |n, b| (n << 8) | i64::from(*b));
        Some(match self.ty.int() {
            Some((size, true)) if size < 8 && raw >> (size * 8 - 1) & 1 == 1 => {
                raw - (1i64 << (size * 8))
            }
            _ => raw,
        })
    }
}

impl Message {
    /// Where a field starts, when only fixed-size fields come before it.
    pub(crate) fn offset_of(&self, index: usize) -> Option<usize> {
        self.fields[..index].iter().map(Field::fixed_size).sum()
    }

    pub(crate) fn role_field(&self, role: Role) -> Option<(usize, &Field)> {
        self.fields
            .iter()
            .enumerate()
            .find(|(_, f)| f.role == Some(role))
    }

    /// The message's id (its `msgid` field's default), if it has one.
    pub(crate) fn msgid(&self) -> Option<i64> {
        self.role_field(Role::Msgid)?.1.default_int()
    }

    /// Whether a field only carries another field's length.
    pub(crate) fn is_length_field(&self, name: &str) -> bool {
        self.fields
            .iter()
            .any(|f| f.length_field.as_deref() == Some(name))
    }
}

impl Definition {
    /// Reads and checks a definition; the error names the message and field at fault.
    pub fn from_json(json: &Value) -> Result<Definition, CodecError> {
        let definition: Definition = serde_json::from_value(json.clone())
            .map_err(|e| definition(format!("not a codec definition: {e}")))?;
        definition.validate()?;
        Ok(definition)
    }

    /// Checks the definition as a whole.
    pub fn validate(&self) -> Result<(), CodecError> {
        if self.messages.is_empty() {
            return Err(definition("the codec has no messages"));
        }
        let mut names = HashSet::new();
        for message in &self.messages {
            if !names.insert(message.name.as_str()) {
                return Err(definition(format!(
                    "two messages are named {:?}",
                    message.name
                )));
            }
            check_message(message)?;
        }
        for uplink in [true, false] {
            let same_way: Vec<&Message> = self
                .messages
                .iter()
                .filter(|m| m.kind.is_uplink() == uplink)
                .collect();
            check_msgids(&same_way, uplink, self)?;
        }
        check_mids(self)
    }

    pub(crate) fn uplink(&self) -> impl Iterator<Item = &Message> {
        self.messages.iter().filter(|m| m.kind.is_uplink())
    }
}

fn check_message(message: &Message) -> Result<(), CodecError> {
    let at = |field: &Field, text: &str| {
        definition(format!(
            "message {:?}, field {:?}: {text}",
            message.name, field.name
        ))
    };
    if message.service_id.trim().is_empty() {
        return Err(definition(format!(
            "message {:?} needs a service_id",
            message.name
        )));
    }
    if message.kind != MessageKind::DataReport && message.command_name.is_none() {
        return Err(definition(format!(
            "message {:?} needs a command_name",
            message.name
        )));
    }
    if message.kind != MessageKind::DataReport && message.response.is_some() {
        return Err(definition(format!(
            "message {:?}: only a data report has a response",
            message.name
        )));
    }
    if let Some(response) = &message.response {
        hex_decode(response).map_err(|_| {
            definition(format!(
                "message {:?}: response {response:?} is not hex",
                message.name
            ))
        })?;
    }
    if message.fields.is_empty() {
        return Err(definition(format!(
            "message {:?} has no fields",
            message.name
        )));
    }
    let mut seen = HashSet::new();
    for (index, field) in message.fields.iter().enumerate() {
        check_name(field).map_err(|text| at(field, &text))?;
        if !seen.insert(field.name.as_str()) {
            return Err(at(field, "appears twice"));
        }
        check_shape(message, index, field).map_err(|text| at(field, &text))?;
    }
    for role in [Role::Msgid, Role::Mid, Role::Errcode] {
        if message
            .fields
            .iter()
            .filter(|f| f.role == Some(role))
            .count()
            > 1
        {
            return Err(definition(format!(
                "message {:?} has more than one {} field",
                message.name,
                role.name()
            )));
        }
    }
    Ok(())
}

fn check_name(field: &Field) -> Result<(), String> {
    let name = field.name.as_str();
    let well_formed = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !well_formed {
        return Err("a field name is a letter or _ followed by letters, digits or _".into());
    }
    if RESERVED.contains(&name) {
        return Err(format!("{name:?} is a reserved word; rename the field"));
    }
    Ok(())
}

fn check_shape(message: &Message, index: usize, field: &Field) -> Result<(), String> {
    match field.ty {
        FieldType::String | FieldType::Array => match field.length {
            Some(1..=1024) => {}
            _ => return Err("needs a length of 1 to 1024 bytes".into()),
        },
        FieldType::Varstring | FieldType::Variant => {
            let Some(target) = &field.length_field else {
                return Err("needs a length_field: an earlier integer field".into());
            };
            let earlier = message.fields[..index].iter().find(|f| &f.name == target);
            match earlier {
                Some(f) if f.ty.int().is_some() && f.role.is_none() && f.decimals == 0 => {}
                _ => {
                    return Err(format!(
                        "length_field {target:?} must name an earlier integer field without decimals"
                    ));
                }
            }
        }
        _ => {
            if field.length.is_some() {
                return Err("an integer field's length is its type".into());
            }
        }
    }
    if field.decimals > 0 && (field.ty.int().is_none() || field.role.is_some()) {
        return Err("decimals apply to integer values only".into());
    }
    if field.decimals > 9 {
        return Err("at most 9 decimals".into());
    }
    if let Some(role) = field.role
        && field.ty.int().is_none()
    {
        return Err(format!("a {} field must be an integer", role.name()));
    }
    check_default(field)?;
    match field.role {
        Some(Role::Msgid) if field.default.is_none() => {
            Err("a msgid field needs a default: the message's id, in hex".into())
        }
        Some(Role::Mid) if message.kind == MessageKind::DataReport => {
            Err("only commands and command responses carry a mid".into())
        }
        // The platform numbers commands 1 to 65535, as IoTDA does.
        Some(Role::Mid) if field.ty != FieldType::Int16u => Err("a mid field is int16u".into()),
        Some(Role::Errcode) if message.kind != MessageKind::CommandResponse => {
            Err("only a command response carries an errcode".into())
        }
        _ => Ok(()),
    }
}

fn check_default(field: &Field) -> Result<(), String> {
    let Some(default) = &field.default else {
        return Ok(());
    };
    let bytes =
        hex_decode(default).map_err(|_| format!("default {default:?} is not hexadecimal"))?;
    match field.fixed_size() {
        Some(size) if bytes.len() > size => Err(format!(
            "default {default:?} is {} bytes; the field holds {size}",
            bytes.len()
        )),
        _ => Ok(()),
    }
}

/// Messages of one direction: with more than one, each needs a `msgid`, all at the same place
/// and of the same type, with distinct values.
fn check_msgids(messages: &[&Message], uplink: bool, all: &Definition) -> Result<(), CodecError> {
    let way = if uplink { "uplink" } else { "downlink" };
    let needs_msgid = messages.len() > 1
        || (uplink
            && messages
                .iter()
                .any(|m| m.kind == MessageKind::CommandResponse))
        || (!uplink && all.messages.iter().any(|m| m.response.is_some()));
    let mut placement: Option<(usize, FieldType, &str)> = None;
    let mut ids: Vec<(i64, &str)> = Vec::new();
    for message in messages {
        let Some((index, field)) = message.role_field(Role::Msgid) else {
            if needs_msgid {
                return Err(definition(format!(
                    "message {:?} needs a msgid field: several {way} messages (or a response) must be told apart",
                    message.name
                )));
            }
            continue;
        };
        let offset = message.offset_of(index).ok_or_else(|| {
            definition(format!(
                "message {:?}: the msgid must come before any variable-length field",
                message.name
            ))
        })?;
        match placement {
            None => placement = Some((offset, field.ty, &message.name)),
            Some((o, ty, first)) if o != offset || ty != field.ty => {
                return Err(definition(format!(
                    "the msgid of {way} message {:?} is not in the same place (or of the same type) as in {first:?}",
                    message.name
                )));
            }
            Some(_) => {}
        }
        let id = message.msgid().unwrap_or_default();
        if let Some((_, other)) = ids.iter().find(|(i, _)| *i == id) {
            return Err(definition(format!(
                "{way} messages {other:?} and {:?} have the same msgid {id:#x}",
                message.name
            )));
        }
        ids.push((id, &message.name));
    }
    Ok(())
}

/// A command and its response carry their `mid` in the same place.
fn check_mids(definition_: &Definition) -> Result<(), CodecError> {
    for response in definition_
        .messages
        .iter()
        .filter(|m| m.kind == MessageKind::CommandResponse)
    {
        let command = definition_.messages.iter().find(|m| {
            m.kind == MessageKind::Command
                && m.service_id == response.service_id
                && m.command_name == response.command_name
        });
        let Some(command) = command else {
            return Err(definition(format!(
                "command response {:?} answers no command of the codec",
                response.name
            )));
        };
        let place = |m: &Message| {
            m.role_field(Role::Mid)
                .and_then(|(i, f)| Some((m.offset_of(i)?, f.ty)))
        };
        match (place(command), place(response)) {
            (Some(a), Some(b)) if a == b => {}
            _ => {
                return Err(definition(format!(
                    "command {:?} and its response {:?} need a mid field in the same place, of the same type, before any variable-length field",
                    command.name, response.name
                )));
            }
        }
    }
    Ok(())
}
