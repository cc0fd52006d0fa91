//! A property report's JSON, taken apart into its services before validation.
//!
//! Reports are the hottest uplink, so a well-formed one is read straight into its parts
//! (`serde` types: no value tree for the document and its services). Anything the fast path
//! refuses is read again as a value tree, which names what is wrong; both paths accept the same
//! documents and give the same services (a table test holds them to it).

use serde::Deserialize;
use serde_json::{Map, Value};

/// A report's `services` entry, before validation against the model.
#[derive(Debug, PartialEq)]
pub(crate) struct RawService {
    pub(crate) service_id: String,
    pub(crate) properties: Map<String, Value>,
    pub(crate) event_time: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    services: Vec<Service>,
}

#[derive(Deserialize)]
struct Service {
    service_id: String,
    properties: Map<String, Value>,
    #[serde(default)]
    event_time: Option<Value>,
}

pub(crate) fn parse_report(payload: &[u8]) -> Result<Vec<RawService>, String> {
    match serde_json::from_slice::<Document>(payload) {
        Ok(document) => Ok(document
            .services
            .into_iter()
            .map(|s| RawService {
                service_id: s.service_id,
                properties: s.properties,
                event_time: match s.event_time {
                    Some(Value::String(time)) => Some(time),
                    _ => None,
                },
            })
            .collect()),
        // Duplicates, wrong types, not JSON: the tree says which (or, for duplicates, takes the
        // last, as a value tree does).
        Err(_) => parse_report_tree(payload),
    }
}

fn parse_report_tree(payload: &[u8]) -> Result<Vec<RawService>, String> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    services_of(value)
}

/// One child's part of a gateway's batch report (`devices[]`): its id, and its services or why
/// they cannot be read.
#[derive(Debug, PartialEq)]
pub(crate) struct ChildReport {
    pub(crate) device_id: String,
    pub(crate) services: Result<Vec<RawService>, String>,
}

/// A gateway's batch report, `{"devices":[{"device_id":..., "services":[...]}]}`. A child whose
/// services cannot be read does not sink the others; a document without a readable list of
/// children is refused whole.
pub(crate) fn parse_sub_device_report(payload: &[u8]) -> Result<Vec<ChildReport>, String> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut document) = value else {
        return Err("`devices` must be an array".to_owned());
    };
    let Some(Value::Array(devices)) = document.remove("devices") else {
        return Err("`devices` must be an array".to_owned());
    };
    devices
        .into_iter()
        .enumerate()
        .map(|(i, child)| {
            let Value::Object(mut child) = child else {
                return Err(format!("devices[{i}].device_id must be a string"));
            };
            let Some(Value::String(device_id)) = child.remove("device_id") else {
                return Err(format!("devices[{i}].device_id must be a string"));
            };
            Ok(ChildReport {
                device_id,
                services: services_of(Value::Object(child)),
            })
        })
        .collect()
}

/// The `services` of a report document, read from its value tree.
fn services_of(value: Value) -> Result<Vec<RawService>, String> {
    // The parsed document is taken apart rather than copied: a report's properties are moved,
    // not cloned, into the services that are validated and stored.
    let Value::Object(mut document) = value else {
        return Err("`services` must be an array".to_owned());
    };
    let Some(Value::Array(services)) = document.remove("services") else {
        return Err("`services` must be an array".to_owned());
    };
    services
        .into_iter()
        .enumerate()
        .map(|(i, service)| {
            let Value::Object(mut service) = service else {
                return Err(format!("services[{i}].service_id must be a string"));
            };
            let Some(Value::String(service_id)) = service.remove("service_id") else {
                return Err(format!("services[{i}].service_id must be a string"));
            };
            let Some(Value::Object(properties)) = service.remove("properties") else {
                return Err(format!("services[{i}].properties must be an object"));
            };
            let event_time = match service.remove("event_time") {
                Some(Value::String(time)) => Some(time),
                _ => None,
            };
            Ok(RawService {
                service_id,
                properties,
                event_time,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every document gives the same result by both paths; the expected column says which
    /// (services found, or the error's start).
    #[test]
    fn both_paths_agree() {
        let cases: &[(&str, Result<usize, &str>)] = &[
            (
                r#"{"services":[{"service_id":"S","properties":{"a":1}}]}"#,
                Ok(1),
            ),
            (r#"{"services":[]}"#, Ok(0)),
            (
                r#"{"services":[{"service_id":"S","properties":{},"event_time":"20251126T010203Z"},{"service_id":"T","properties":{"x":{"y":[1,null]}}}]}"#,
                Ok(2),
            ),
            // event_time of another type is ignored, as is a null one.
            (
                r#"{"services":[{"service_id":"S","properties":{},"event_time":5}]}"#,
                Ok(1),
            ),
            (
                r#"{"services":[{"service_id":"S","properties":{},"event_time":null}]}"#,
                Ok(1),
            ),
            // Fields the platform does not know are ignored.
            (
                r#"{"services":[{"service_id":"S","properties":{},"extra":1}],"object_device_id":"d"}"#,
                Ok(1),
            ),
            // Duplicates: the last one counts (by the tree path).
            (
                r#"{"services":[{"service_id":"A","service_id":"S","properties":{}}]}"#,
                Ok(1),
            ),
            (
                r#"{"services":[{"service_id":"S","properties":{"a":1,"a":2}}]}"#,
                Ok(1),
            ),
            (r#"{"services":null}"#, Err("`services` must be an array")),
            (r#"{}"#, Err("`services` must be an array")),
            (r#"[1]"#, Err("`services` must be an array")),
            (
                r#"{"services":[1]}"#,
                Err("services[0].service_id must be a string"),
            ),
            (
                r#"{"services":[{"service_id":1,"properties":{}}]}"#,
                Err("services[0].service_id must be a string"),
            ),
            (
                r#"{"services":[{"service_id":"S"}]}"#,
                Err("services[0].properties must be an object"),
            ),
            (
                r#"{"services":[{"service_id":"S","properties":{}},{"service_id":"T","properties":[]}]}"#,
                Err("services[1].properties must be an object"),
            ),
            (
                r#"{"services":[{"service_id":"S","properties":{}}]} x"#,
                Err("not JSON"),
            ),
            (r#"{"services":"#, Err("not JSON")),
            ("", Err("not JSON")),
        ];
        for (payload, expected) in cases {
            let fast = parse_report(payload.as_bytes());
            let tree = parse_report_tree(payload.as_bytes());
            assert_eq!(fast, tree, "{payload}");
            match (expected, &fast) {
                (Ok(n), Ok(services)) => assert_eq!(services.len(), *n, "{payload}"),
                (Err(start), Err(error)) => assert!(error.starts_with(start), "{payload}: {error}"),
                _ => panic!("{payload}: {fast:?}"),
            }
        }
        let services = parse_report(
            br#"{"services":[{"service_id":"S","service_id":"T","properties":{"a":1,"a":2},"event_time":"t"}]}"#,
        )
        .unwrap();
        assert_eq!(services[0].service_id, "T");
        assert_eq!(services[0].properties["a"], 2);
        assert_eq!(services[0].event_time.as_deref(), Some("t"));
    }

    /// A gateway's batch report: the children found and, per child, its services or its error.
    #[test]
    fn sub_device_reports() {
        type Expected = Result<Vec<(&'static str, Result<usize, &'static str>)>, &'static str>;
        let cases: Vec<(&str, Expected)> = vec![
            (
                r#"{"devices":[{"device_id":"c1","services":[{"service_id":"S","properties":{"a":1}}]},{"device_id":"c2","services":[]}]}"#,
                Ok(vec![("c1", Ok(1)), ("c2", Ok(0))]),
            ),
            (r#"{"devices":[]}"#, Ok(vec![])),
            // One child's bad services leave the other's.
            (
                r#"{"devices":[{"device_id":"c1","services":{}},{"device_id":"c2","services":[{"service_id":"S","properties":{}}]}]}"#,
                Ok(vec![
                    ("c1", Err("`services` must be an array")),
                    ("c2", Ok(1)),
                ]),
            ),
            (
                r#"{"devices":[{"device_id":"c1","services":[{"service_id":"S"}]}]}"#,
                Ok(vec![(
                    "c1",
                    Err("services[0].properties must be an object"),
                )]),
            ),
            (
                r#"{"devices":[{"device_id":"c1"}]}"#,
                Ok(vec![("c1", Err("`services` must be an array"))]),
            ),
            (
                r#"{"devices":[{"services":[]}]}"#,
                Err("devices[0].device_id must be a string"),
            ),
            (
                r#"{"devices":[{"device_id":7,"services":[]}]}"#,
                Err("devices[0].device_id must be a string"),
            ),
            (
                r#"{"devices":[1]}"#,
                Err("devices[0].device_id must be a string"),
            ),
            (r#"{"devices":{}}"#, Err("`devices` must be an array")),
            (r#"{"services":[]}"#, Err("`devices` must be an array")),
            (r#"[]"#, Err("`devices` must be an array")),
            (r#"{"devices":["#, Err("not JSON")),
        ];
        for (payload, expected) in cases {
            let parsed = parse_sub_device_report(payload.as_bytes());
            match (expected, &parsed) {
                (Ok(children), Ok(found)) => {
                    assert_eq!(found.len(), children.len(), "{payload}");
                    for ((id, services), child) in children.iter().zip(found) {
                        assert_eq!(child.device_id, *id, "{payload}");
                        match (services, &child.services) {
                            (Ok(n), Ok(s)) => assert_eq!(s.len(), *n, "{payload}"),
                            (Err(start), Err(e)) => {
                                assert!(e.starts_with(start), "{payload}: {e}")
                            }
                            _ => panic!("{payload}: {:?}", child.services),
                        }
                    }
                }
                (Err(start), Err(error)) => assert!(error.starts_with(start), "{payload}: {error}"),
                _ => panic!("{payload}: {parsed:?}"),
            }
        }
    }
}
