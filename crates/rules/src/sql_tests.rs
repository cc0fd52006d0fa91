//! Golden cases for the rule language: `golden/sql_cases.json` evaluated on `golden/envelope.json`.

use serde_json::Value;

use super::compile;

const NOW: i64 = 1_764_152_100_000;

#[test]
fn golden_cases() {
    let envelope: Value = serde_json::from_str(include_str!("../golden/envelope.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(include_str!("../golden/sql_cases.json")).unwrap();
    assert!(cases.len() > 30);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let compiled = compile(case["select"].as_str(), case["where"].as_str());
        if let Some(error) = case["error"].as_str() {
            assert_eq!(
                compiled.err().map(|e| e.to_string()).as_deref(),
                Some(error),
                "{name}"
            );
            continue;
        }
        let rule = compiled.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            rule.matches(&envelope, NOW),
            case["matches"].as_bool().unwrap(),
            "{name}"
        );
        match &case["output"] {
            Value::Null => {}
            Value::String(s) if s == "@envelope" => {
                assert_eq!(rule.project(&envelope, NOW), envelope, "{name}");
                // Forwarding sends such rules the envelope's own text without projecting.
                assert!(rule.selects_all(), "{name}");
                assert_eq!(
                    rule.project(&envelope, NOW).to_string(),
                    envelope.to_string(),
                    "{name}"
                );
            }
            expected => {
                assert_eq!(&rule.project(&envelope, NOW), expected, "{name}");
                assert!(!rule.selects_all(), "{name}");
            }
        }
    }
}

#[test]
fn like_has_no_exponential_backtracking() {
    let value = "a".repeat(200);
    let pattern = "%a".repeat(50) + "b";
    assert!(!super::eval::like(&value, &pattern));
    assert!(
        super::eval::like("abc", "a%c")
            && super::eval::like("abc", "%")
            && !super::eval::like("abc", "a_")
    );
}
