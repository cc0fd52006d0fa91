//! Validation of product model definitions and of the values devices report against them.

use std::collections::HashSet;
use std::fmt;

use serde_json::{Map, Value};

use crate::TypesError;
use crate::model::{CommandPara, Constraints, DataType, ServiceCapability, ServiceProperty};
use crate::time::parse_event_time;

/// Why one reported property was not applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    UnknownService,
    UnknownProperty,
    WrongType { expected: DataType },
    BelowMin { min: f64 },
    AboveMax { max: f64 },
    TooLong { max_length: i64 },
    NotInEnum,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::UnknownService => write!(f, "service is not in the product model"),
            Rejection::UnknownProperty => write!(f, "property is not in the product model"),
            Rejection::WrongType { expected } => {
                write!(f, "value is not of type {}", expected.as_str())
            }
            Rejection::BelowMin { min } => write!(f, "value is below the minimum {min}"),
            Rejection::AboveMax { max } => write!(f, "value is above the maximum {max}"),
            Rejection::TooLong { max_length } => write!(f, "value is longer than {max_length}"),
            Rejection::NotInEnum => write!(f, "value is not in enum_list"),
        }
    }
}

fn bound(text: Option<&str>) -> Option<f64> {
    text.and_then(|t| t.trim().parse::<f64>().ok())
}

fn check_range(c: &Constraints<'_>, n: f64) -> Result<(), Rejection> {
    if let Some(min) = bound(c.min).filter(|min| n < *min) {
        return Err(Rejection::BelowMin { min });
    }
    if let Some(max) = bound(c.max).filter(|max| n > *max) {
        return Err(Rejection::AboveMax { max });
    }
    Ok(())
}

fn check_length(c: &Constraints<'_>, s: &str) -> Result<(), Rejection> {
    match c.max_length {
        Some(max_length) if max_length > 0 && s.chars().count() as i64 > max_length => {
            Err(Rejection::TooLong { max_length })
        }
        _ => Ok(()),
    }
}

/// Checks one value against the constraints of a property or command parameter.
pub fn check_value(c: &Constraints<'_>, value: &Value) -> Result<(), Rejection> {
    let wrong = Rejection::WrongType {
        expected: c.data_type,
    };
    match c.data_type {
        DataType::Int => {
            let n = value
                .as_i64()
                .filter(|n| i32::try_from(*n).is_ok())
                .ok_or(wrong)?;
            check_range(c, n as f64)
        }
        DataType::Long => {
            let n = value.as_i64().ok_or(wrong)?;
            check_range(c, n as f64)
        }
        DataType::Decimal => check_range(c, value.as_f64().ok_or(wrong)?),
        DataType::String => check_length(c, value.as_str().ok_or(wrong)?),
        DataType::DateTime => {
            let s = value.as_str().ok_or(wrong.clone())?;
            parse_event_time(s).map(|_| ()).ok_or(wrong)
        }
        DataType::JsonObject => value.as_object().map(|_| ()).ok_or(wrong),
        DataType::Boolean => value.as_bool().map(|_| ()).ok_or(wrong),
        DataType::Enum => {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err(wrong),
            };
            if c.enum_list.contains(&text) {
                Ok(())
            } else {
                Err(Rejection::NotInEnum)
            }
        }
        DataType::StringList => {
            let items = value.as_array().ok_or(wrong.clone())?;
            for item in items {
                check_length(c, item.as_str().ok_or(wrong.clone())?)?;
            }
            Ok(())
        }
    }
}

/// One property that a report carried but that was not applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedProperty {
    pub service_id: String,
    /// `None` when the whole service was refused.
    pub property: Option<String>,
    pub reason: Rejection,
}

/// Splits a service's reported properties into those the model accepts and those it refuses.
/// The accepted ones stay in the map they came in (a report that is valid throughout, the usual
/// one, is neither copied nor rebuilt).
pub fn filter_properties(
    service: Option<&ServiceCapability>,
    service_id: &str,
    mut properties: Map<String, Value>,
    rejected: &mut Vec<RejectedProperty>,
) -> Map<String, Value> {
    let Some(service) = service else {
        rejected.push(RejectedProperty {
            service_id: service_id.to_owned(),
            property: None,
            reason: Rejection::UnknownService,
        });
        return Map::new();
    };
    let refused_before = rejected.len();
    for (name, value) in &properties {
        let verdict = match service.property(name) {
            None => Err(Rejection::UnknownProperty),
            Some(p) => check_value(&p.constraints(), value),
        };
        if let Err(reason) = verdict {
            rejected.push(RejectedProperty {
                service_id: service_id.to_owned(),
                property: Some(name.clone()),
                reason,
            });
        }
    }
    for refusal in &rejected[refused_before..] {
        if let Some(name) = &refusal.property {
            properties.remove(name);
        }
    }
    properties
}

fn invalid(msg: String) -> TypesError {
    TypesError::InvalidModel(msg)
}

fn check_name(kind: &str, name: &str, max: usize) -> Result<(), TypesError> {
    if name.is_empty() || name.chars().count() > max {
        return Err(invalid(format!(
            "{kind} '{name}' must be 1 to {max} characters"
        )));
    }
    if name.contains(['.', '$', '\0']) {
        return Err(invalid(format!(
            "{kind} '{name}' must not contain '.', '$' or NUL"
        )));
    }
    Ok(())
}

fn check_constraints(owner: &str, c: &Constraints<'_>) -> Result<(), TypesError> {
    let min = c.min.map(|m| (m, bound(Some(m))));
    let max = c.max.map(|m| (m, bound(Some(m))));
    if c.data_type.is_numeric() {
        for (text, parsed) in [min, max].into_iter().flatten() {
            if parsed.is_none() {
                return Err(invalid(format!(
                    "{owner}: min/max '{text}' is not a number"
                )));
            }
        }
        if let (Some((_, Some(lo))), Some((_, Some(hi)))) = (min, max)
            && lo > hi
        {
            return Err(invalid(format!(
                "{owner}: min {lo} is greater than max {hi}"
            )));
        }
    }
    if c.data_type == DataType::Enum && c.enum_list.is_empty() {
        return Err(invalid(format!(
            "{owner}: an enum needs a non-empty enum_list"
        )));
    }
    if c.max_length.is_some_and(|l| l < 0) {
        return Err(invalid(format!("{owner}: max_length must not be negative")));
    }
    Ok(())
}

fn check_property(service_id: &str, p: &ServiceProperty) -> Result<(), TypesError> {
    check_name("property_name", &p.property_name, 64)?;
    let owner = format!("{service_id}.{}", p.property_name);
    let method_ok = !p.method.is_empty()
        && p.method.chars().all(|c| matches!(c, 'R' | 'W' | 'E'))
        && p.method.chars().collect::<HashSet<_>>().len() == p.method.len();
    if !method_ok {
        return Err(invalid(format!(
            "{owner}: method '{}' must combine R, W and E",
            p.method
        )));
    }
    check_constraints(&owner, &p.constraints())
}

fn check_paras(owner: &str, paras: Option<&[CommandPara]>) -> Result<(), TypesError> {
    let mut seen = HashSet::new();
    for para in paras.unwrap_or_default() {
        check_name("para_name", &para.para_name, 32)?;
        if !seen.insert(para.para_name.as_str()) {
            return Err(invalid(format!(
                "{owner}: duplicate para_name '{}'",
                para.para_name
            )));
        }
        check_constraints(&format!("{owner}.{}", para.para_name), &para.constraints())?;
    }
    Ok(())
}

fn check_service(s: &ServiceCapability) -> Result<(), TypesError> {
    check_name("service_id", &s.service_id, 64)?;
    if s.service_type.is_empty() {
        return Err(invalid(format!(
            "service '{}' needs a service_type",
            s.service_id
        )));
    }
    let mut names = HashSet::new();
    for p in s.properties.as_deref().unwrap_or_default() {
        check_property(&s.service_id, p)?;
        if !names.insert(p.property_name.as_str()) {
            return Err(invalid(format!(
                "{}: duplicate property '{}'",
                s.service_id, p.property_name
            )));
        }
    }
    let mut commands = HashSet::new();
    for c in s.commands.as_deref().unwrap_or_default() {
        if c.command_name.is_empty() || !commands.insert(c.command_name.as_str()) {
            return Err(invalid(format!(
                "{}: empty or duplicate command '{}'",
                s.service_id, c.command_name
            )));
        }
        let owner = format!("{}.{}", s.service_id, c.command_name);
        check_paras(&owner, c.paras.as_deref())?;
        for r in c.responses.as_deref().unwrap_or_default() {
            check_paras(&format!("{owner}.{}", r.response_name), r.paras.as_deref())?;
        }
    }
    for e in s.events.as_deref().unwrap_or_default() {
        check_paras(
            &format!("{}.{}", s.service_id, e.event_type),
            e.paras.as_deref(),
        )?;
    }
    Ok(())
}

/// Checks a whole model definition: names, unique ids, consistent constraints.
pub fn check_model(services: &[ServiceCapability]) -> Result<(), TypesError> {
    let mut ids = HashSet::new();
    for s in services {
        check_service(s)?;
        if !ids.insert(s.service_id.as_str()) {
            return Err(invalid(format!("duplicate service_id '{}'", s.service_id)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> ServiceCapability {
        serde_json::from_value(json!({
            "service_id": "Temperature", "service_type": "Temperature",
            "properties": [
                {"property_name": "temp", "data_type": "decimal", "min": "-40", "max": "120", "method": "RW"},
                {"property_name": "count", "data_type": "int", "min": "0", "max": "100", "method": "R"},
                {"property_name": "big", "data_type": "long", "method": "R"},
                {"property_name": "label", "data_type": "string", "max_length": 8, "method": "R"},
                {"property_name": "mode", "data_type": "enum", "enum_list": ["auto", "manual"], "method": "RW"},
                {"property_name": "on", "data_type": "boolean", "method": "RW"},
                {"property_name": "at", "data_type": "DateTime", "method": "R"},
                {"property_name": "extra", "data_type": "jsonObject", "method": "R"},
                {"property_name": "tags", "data_type": "string list", "max_length": 3, "method": "R"}
            ]
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"))
    }

    #[test]
    fn value_table() {
        let s = service();
        let cases: Vec<(&str, Value, Result<(), Rejection>)> = vec![
            ("temp", json!(21.5), Ok(())),
            ("temp", json!(-40), Ok(())),
            ("temp", json!(500), Err(Rejection::AboveMax { max: 120.0 })),
            ("temp", json!(-41), Err(Rejection::BelowMin { min: -40.0 })),
            (
                "temp",
                json!("21"),
                Err(Rejection::WrongType {
                    expected: DataType::Decimal,
                }),
            ),
            ("count", json!(7), Ok(())),
            (
                "count",
                json!(7.5),
                Err(Rejection::WrongType {
                    expected: DataType::Int,
                }),
            ),
            (
                "count",
                json!(3_000_000_000_i64),
                Err(Rejection::WrongType {
                    expected: DataType::Int,
                }),
            ),
            ("big", json!(3_000_000_000_i64), Ok(())),
            ("label", json!("12345678"), Ok(())),
            (
                "label",
                json!("123456789"),
                Err(Rejection::TooLong { max_length: 8 }),
            ),
            ("mode", json!("auto"), Ok(())),
            ("mode", json!("eco"), Err(Rejection::NotInEnum)),
            ("on", json!(true), Ok(())),
            (
                "on",
                json!(1),
                Err(Rejection::WrongType {
                    expected: DataType::Boolean,
                }),
            ),
            ("at", json!("20250414T010203Z"), Ok(())),
            (
                "at",
                json!("tomorrow"),
                Err(Rejection::WrongType {
                    expected: DataType::DateTime,
                }),
            ),
            ("extra", json!({"a": 1}), Ok(())),
            (
                "extra",
                json!([1]),
                Err(Rejection::WrongType {
                    expected: DataType::JsonObject,
                }),
            ),
            ("tags", json!(["a", "bcd"]), Ok(())),
            (
                "tags",
                json!(["abcd"]),
                Err(Rejection::TooLong { max_length: 3 }),
            ),
            (
                "tags",
                json!([1]),
                Err(Rejection::WrongType {
                    expected: DataType::StringList,
                }),
            ),
        ];
        for (name, value, want) in cases {
            let p = s.property(name).unwrap_or_else(|| panic!("no {name}"));
            assert_eq!(
                check_value(&p.constraints(), &value),
                want,
                "{name} = {value}"
            );
        }
    }

    #[test]
    fn filter_keeps_valid_and_reports_the_rest() {
        let s = service();
        let mut rejected = Vec::new();
        let props = json!({"temp": 500, "count": 7, "ghost": 1});
        let Value::Object(props) = props else {
            unreachable!()
        };
        let kept = filter_properties(Some(&s), "Temperature", props, &mut rejected);
        assert_eq!(Value::Object(kept), json!({"count": 7}));
        let names: Vec<_> = rejected.iter().map(|r| r.property.clone()).collect();
        assert_eq!(
            names,
            vec![Some("ghost".to_owned()), Some("temp".to_owned())]
        );
        let mut rejected = Vec::new();
        let Value::Object(valid) = json!({"temp": 21.5, "count": 7}) else {
            unreachable!()
        };
        let kept = filter_properties(Some(&s), "Temperature", valid.clone(), &mut rejected);
        assert_eq!(kept, valid);
        assert!(rejected.is_empty(), "{rejected:?}");
        let kept = filter_properties(None, "Nope", Map::new(), &mut rejected);
        assert!(kept.is_empty());
        assert_eq!(rejected[0].reason, Rejection::UnknownService);
    }

    #[test]
    fn model_definition_errors() {
        let bad: Vec<(Value, &str)> = vec![
            (
                json!([{"service_id": "a.b", "service_type": "t"}]),
                "must not contain",
            ),
            (
                json!([{"service_id": "s", "service_type": "t"}, {"service_id": "s", "service_type": "t"}]),
                "duplicate service_id",
            ),
            (
                json!([{"service_id": "s", "service_type": "t", "properties": [
                {"property_name": "p", "data_type": "int", "min": "10", "max": "1", "method": "R"}]}]),
                "greater than max",
            ),
            (
                json!([{"service_id": "s", "service_type": "t", "properties": [
                {"property_name": "p", "data_type": "int", "min": "ten", "method": "R"}]}]),
                "not a number",
            ),
            (
                json!([{"service_id": "s", "service_type": "t", "properties": [
                {"property_name": "p", "data_type": "enum", "method": "R"}]}]),
                "enum_list",
            ),
            (
                json!([{"service_id": "s", "service_type": "t", "properties": [
                {"property_name": "p", "data_type": "int", "method": "RX"}]}]),
                "method",
            ),
            (
                json!([{"service_id": "s", "service_type": "t", "properties": [
                {"property_name": "p", "data_type": "int", "method": "R"},
                {"property_name": "p", "data_type": "int", "method": "R"}]}]),
                "duplicate property",
            ),
            (
                json!([{"service_id": "s", "service_type": "t", "commands": [
                {"command_name": "c", "paras": [{"para_name": "x", "data_type": "int"}, {"para_name": "x", "data_type": "int"}]}]}]),
                "duplicate para_name",
            ),
        ];
        for (model, needle) in bad {
            let services: Vec<ServiceCapability> =
                serde_json::from_value(model.clone()).unwrap_or_else(|e| panic!("{model}: {e}"));
            let err = check_model(&services)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains(needle),
                "{model}: got '{err}', want '{needle}'"
            );
        }
        assert!(check_model(std::slice::from_ref(&service())).is_ok());
    }

    #[test]
    fn unknown_fields_and_types_are_refused_by_the_parser() {
        let unknown_field = json!({"service_id": "s", "service_type": "t", "colour": "red"});
        assert!(serde_json::from_value::<ServiceCapability>(unknown_field).is_err());
        let unknown_type = json!({"property_name": "p", "data_type": "float", "method": "R"});
        assert!(serde_json::from_value::<ServiceProperty>(unknown_type).is_err());
    }
}
