//! Golden cases for the declarative codec: `golden/cases.json` against `golden/smoke.codec.json`,
//! and `golden/invalid.json` for definitions that must be refused with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ioda_codec::{CodecError, Definition, bits, hex_decode, hex_encode};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn decode_and_encode_cases() {
    let codec = Definition::from_json(&load("smoke.codec.json")).unwrap();
    let cases = load("cases.json");
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let outcome: Result<Value, CodecError> = if let Some(hex) = case["decode"].as_str() {
            codec.decode(&hex_decode(hex).unwrap()).map(|decoded| {
                if let Some(response) = case["response"].as_str() {
                    assert_eq!(
                        decoded.response.as_deref(),
                        Some(&hex_decode(response).unwrap()[..]),
                        "{name}"
                    );
                }
                decoded.to_json()
            })
        } else {
            codec.encode(&case["encode"]).map(|bytes| {
                if let Some(expected) = case["expect_label_bits"].as_str() {
                    assert_eq!(bits(&bytes[3..6]), expected, "{name}");
                }
                Value::from(hex_encode(&bytes))
            })
        };
        let expected = match (&case["expect"], case["expect_hex"].as_str()) {
            (Value::Null, Some(hex)) => Some(Value::from(hex_encode(&hex_decode(hex).unwrap()))),
            (Value::Null, None) => None,
            (expect, _) => Some(expect.clone()),
        };
        match (outcome, expected, case["error"].as_str()) {
            (Ok(got), Some(want), _) if got == want => {}
            (Err(error), None, Some(want)) if error.to_string().contains(want) => {}
            (got, want, error) => failures.push(format!(
                "{name}: got {got:?}, wanted {want:?} / error containing {error:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_definitions_are_refused_with_the_reason() {
    let cases = load("invalid.json");
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let want = case["error"].as_str().unwrap();
        match Definition::from_json(&case["definition"]) {
            Err(CodecError::Definition(text)) if text.contains(want) => {}
            other => failures.push(format!("{name}: got {other:?}, wanted {want:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_seed_example_abc_is_three_ascii_bytes() {
    assert_eq!(bits(b"abc"), "011000010110001001100011");
}

#[test]
fn a_signed_msgid_matches_what_is_read() {
    let codec = Definition::from_json(&serde_json::json!({"messages": [
        {"name": "a", "kind": "data_report", "service_id": "S", "fields": [
            {"name": "messageId", "type": "int8s", "role": "msgid", "default": "FF"},
            {"name": "v", "type": "int8u"}]},
        {"name": "b", "kind": "data_report", "service_id": "S", "fields": [
            {"name": "messageId", "type": "int8s", "role": "msgid", "default": "01"},
            {"name": "w", "type": "int8u"}]}
    ]}))
    .unwrap();
    let decoded = codec.decode(&[0xFF, 7]).unwrap();
    assert_eq!(
        decoded.json["services"][0]["properties"],
        serde_json::json!({"v": 7})
    );
}
