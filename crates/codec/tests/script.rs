//! JavaScript codecs: golden cases of `golden/smoke.js` in both directions, and scripts that
//! throw, loop, eat memory, or return the wrong thing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ioda_codec::{Codec, CodecError, hex_decode, hex_encode};
use serde_json::{Value, json};

fn smoke() -> Codec {
    let path = format!("{}/golden/smoke.js", env!("CARGO_MANIFEST_DIR"));
    let script = std::fs::read_to_string(path).unwrap();
    Codec::from_json(&json!({"type": "javascript", "script": script})).unwrap()
}

#[test]
fn the_smoke_script_decodes_and_encodes() {
    let codec = smoke();
    let cases: &[(&str, Option<&str>, Value)] = &[
        (
            "00 03 FF 38",
            None,
            json!({"msg_type": "properties_report", "services": [{"service_id": "Smoke", "properties": {"level": 3, "temperature": -20}}]}),
        ),
        (
            "00 01 01 3A",
            Some("$oc/devices/d1/sys/properties/report"),
            json!({"msg_type": "properties_report", "services": [{"service_id": "Smoke", "properties": {"level": 1, "temperature": 31.4}}]}),
        ),
        (
            "02 12 34 00 01",
            None,
            json!({"msg_type": "command_response", "mid": 4660, "result_code": 0, "paras": {"result": 1}}),
        ),
    ];
    for (hex, topic, expected) in cases {
        let decoded = codec.decode(&hex_decode(hex).unwrap(), *topic).unwrap();
        assert_eq!(&decoded.json, expected, "{hex}");
    }
    let bytes = codec
        .encode(&json!({"service_id": "Smoke", "command_name": "SET_ALARM", "paras": {"value": 1}, "mid": 300}))
        .unwrap();
    assert_eq!(hex_encode(&bytes), "01012C01");
}

fn script(source: &str) -> Result<Codec, CodecError> {
    Codec::from_json(&json!({"type": "javascript", "script": source}))
}

const ECHO_ENCODE: &str = "function encode(json) { return []; }";

#[test]
fn bad_scripts_fail_with_the_reason() {
    let cases: &[(&str, String, &str)] = &[
        (
            "syntax error",
            "function decode(p { }".into(),
            "the script threw",
        ),
        (
            "no encode",
            "function decode(p) { return '{}'; }".into(),
            "defines no function encode",
        ),
        (
            "too large",
            format!(
                "{ECHO_ENCODE} function decode(p) {{ return ''; }} //{}",
                "x".repeat(1024 * 1024)
            ),
            "at most 1048576",
        ),
        (
            "throws while loading",
            format!("{ECHO_ENCODE} function decode(p) {{}} throw new Error('boom');"),
            "boom",
        ),
        (
            "loops while loading",
            format!("{ECHO_ENCODE} function decode(p) {{}} while (true) {{}}"),
            "ran longer than its limit",
        ),
    ];
    for (name, source, reason) in cases {
        match script(source) {
            Err(CodecError::Definition(text)) if text.contains(reason) => {}
            other => panic!("{name}: {other:?}, wanted {reason:?}"),
        }
    }
}

#[test]
fn a_runaway_or_wrong_call_fails_that_message_only() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "throws",
            "function decode(p) { throw new Error('cannot read ' + p.length + ' bytes'); }",
            "the script threw: cannot read 2 bytes",
        ),
        (
            "loops",
            "function decode(p) { for (;;) {} }",
            "ran longer than its limit",
        ),
        (
            "eats memory",
            "function decode(p) { var a = []; for (;;) { a.push(new Array(100000).join('x')); } }",
            "more than its 32 MB",
        ),
        (
            "not JSON",
            "function decode(p) { return 'hello'; }",
            "not JSON",
        ),
        (
            "no msg_type",
            "function decode(p) { return JSON.stringify({services: []}); }",
            "no msg_type",
        ),
        (
            "unknown msg_type",
            "function decode(p) { return JSON.stringify({msg_type: 'events'}); }",
            "msg_type \"events\"",
        ),
        (
            "report without services",
            "function decode(p) { return {msg_type: 'properties_report'}; }",
            "needs a services array",
        ),
    ];
    for (name, decode, reason) in cases {
        let codec = script(&format!("{ECHO_ENCODE} {decode}")).unwrap();
        match codec.decode(&[1, 2], None) {
            Err(CodecError::Decode(text)) if text.contains(reason) => {}
            other => panic!("{name}: {other:?}, wanted {reason:?}"),
        }
        // The codec still works for the next message.
        assert!(codec.decode(&[1, 2], None).is_err());
    }
    let objects = script(&format!("{ECHO_ENCODE} function decode(p) {{ return {{msg_type: 'properties_report', services: [{{service_id: 'S', properties: {{n: p[0]}}}}]}}; }}")).unwrap();
    let decoded = objects.decode(&[0xFF], None).unwrap();
    assert_eq!(
        decoded.json["services"][0]["properties"]["n"], -1,
        "Java bytes are signed"
    );
    for (name, encode, reason) in [
        (
            "a string",
            "function encode(j) { return 'AQID'; }",
            "array of byte values",
        ),
        (
            "out of range",
            "function encode(j) { return [256]; }",
            "not a byte",
        ),
        (
            "fraction",
            "function encode(j) { return [1.5]; }",
            "not a byte",
        ),
    ] {
        let codec = script(&format!("function decode(p) {{}} {encode}")).unwrap();
        match codec.encode(&json!({"command_name": "X", "paras": {}})) {
            Err(CodecError::Encode(text)) if text.contains(reason) => {}
            other => panic!("{name}: {other:?}, wanted {reason:?}"),
        }
    }
}
