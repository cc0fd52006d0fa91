//! Smoke runs of `ioda bench` (seconds, small N): they check the accounting, not the speed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::{Value, json};

fn bench(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_ioda"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn report_scenario_accounts_for_every_report() {
    let result = short_report("http");
    assert_eq!(result["channel"], "HTTP_FORWARDING", "{result}");
    assert_accounted(&result);
}

#[test]
fn report_scenario_over_nats_accounts_for_every_report() {
    let result = short_report("nats");
    assert_eq!(result["channel"], "NATS_FORWARDING", "{result}");
    assert_accounted(&result);
}

#[test]
fn report_scenario_over_mqtt_accounts_for_every_report() {
    let result = short_report("mqtt");
    assert_eq!(result["channel"], "MQTT_FORWARDING", "{result}");
    assert_accounted(&result);
}

/// Two seconds of 8 devices reporting flat out, consumed over `channel`.
fn short_report(channel: &str) -> Value {
    bench(&[
        "report",
        "--devices",
        "8",
        "--duration",
        "2",
        "--channel",
        channel,
        "--server-args=--durability=normal",
    ])
}

fn assert_accounted(result: &Value) {
    let offered = result["offered"].as_u64().unwrap();
    assert!(offered > 0, "{result}");
    assert_eq!(
        result["acked"].as_u64(),
        Some(offered),
        "every offered report is acknowledged: {result}"
    );
    assert_eq!(
        result["delivered"].as_u64(),
        Some(offered),
        "every acknowledged report reaches the receiver: {result}"
    );
    assert_eq!(result["lost"], 0);
    assert!(result["latency_ms"]["p99"].as_f64().is_some(), "{result}");
    // The server counted each acknowledgement's stages (a PUBACK's `commit` stage ends before
    // it is written, so before the bench can have read it; `write` ends just after).
    let stages = &result["server_stages_ms"];
    assert_eq!(
        stages["commit"]["count"].as_u64(),
        Some(offered),
        "the server counts every acknowledgement: {result}"
    );
    let written = stages["write"]["count"].as_u64().unwrap();
    assert!(written > 0 && written <= offered, "{result}");
    assert!(
        stages["commit"]["p99_at_most"].as_f64().is_some(),
        "{result}"
    );
    // Each report is one write job (a forwarding cursor's save may add a few).
    assert!(
        stages["store_job"]["count"].as_u64().unwrap() >= offered,
        "{result}"
    );
}

#[test]
fn paced_reports_keep_their_rate() {
    let dir = tempfile::tempdir().unwrap();
    let series_path = dir.path().join("latency.txt");
    let result = bench(&[
        "report",
        "--devices",
        "4",
        "--duration",
        "2",
        "--rate",
        "10",
        "--latency-series",
        series_path.to_str().unwrap(),
    ]);
    let offered = result["offered"].as_u64().unwrap();
    // 4 devices x 10/s x 2 s = 80; never more (pacing holds devices back), fewer only on a starved machine.
    assert!((40..=88).contains(&offered), "{result}");
    assert_eq!(result["delivered"].as_u64(), Some(offered), "{result}");
    // One line per delivered report: its send time and its latency, both in microseconds.
    let series = std::fs::read_to_string(&series_path).unwrap();
    let lines: Vec<(i64, u64)> = series
        .lines()
        .map(|line| {
            let (sent, latency) = line.split_once(' ').unwrap();
            (sent.parse().unwrap(), latency.parse().unwrap())
        })
        .collect();
    assert_eq!(lines.len() as u64, offered, "{series}");
    // The summary gives milliseconds to two places.
    let max_ms = result["latency_ms"]["max"].as_f64().unwrap();
    let max_us = lines.iter().map(|(_, l)| *l).max().unwrap();
    assert_eq!((max_us as f64 / 10.0).round() / 100.0, max_ms, "{result}");
    // Sent within the run: microseconds since 1970, not milliseconds.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!(
        lines
            .iter()
            .all(|(sent, _)| (now_us - 120_000_000..=now_us).contains(sent)),
        "{series}"
    );
    // Paced over 2 s: the sends span many 100 ms windows, and the p99's own report is in one.
    let spread = &result["latency_p99_spread"];
    let windows = spread["windows"].as_u64().unwrap();
    assert!(windows >= 10, "{result}");
    let slow = spread["windows_with_a_p99_report"].as_u64().unwrap();
    assert!((1..=windows).contains(&slow), "{result}");
    assert!(spread.get("write_error").is_none(), "{result}");
}

/// Runs `ioda bench` with arguments it must refuse; its standard error (nothing was printed on
/// standard output).
fn refused(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_ioda"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?}");
    assert!(output.stdout.is_empty(), "{args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_latency_series_is_refused_where_no_report_is_timed() {
    for scenario in ["connect", "command"] {
        let stderr = refused(&[scenario, "--latency-series", "unused.txt"]);
        assert!(stderr.contains("--latency-series applies to"), "{stderr}");
    }
    assert!(!std::path::Path::new("unused.txt").exists());
}

#[test]
fn no_runs_at_half_the_maximum_is_refused() {
    let stderr = refused(&["reference", "--latency-runs", "0"]);
    assert!(
        stderr.contains("--latency-runs must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn a_latency_series_that_cannot_be_written_is_refused_before_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let unwritable = dir.path().join("no-such-directory").join("latency.txt");
    let output = Command::new(env!("CARGO_BIN_EXE_ioda"))
        .args(["bench", "report", "--devices", "2", "--duration", "30"])
        .arg("--latency-series")
        .arg(&unwritable)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("latency.txt"), "{stderr}");
    // Refused before the load: no device was registered (the progress lines would say so), and
    // there is no result.
    assert!(!stderr.contains("registered"), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn connect_scenario_connects_everyone_and_measures_memory() {
    let result = bench(&["connect", "--devices", "300", "--duration", "5"]);
    assert_eq!(result["devices"], 300, "{result}");
    assert!(
        result["server_rss_connected"].as_u64().unwrap()
            >= result["server_rss_before"].as_u64().unwrap()
    );
    assert!(result["bytes_per_connection"].as_f64().is_some());
}

#[test]
fn connect_scenario_connects_everyone_over_mqtts_and_wss() {
    for (flags, transport) in [
        (&["--tls"][..], "mqtts"),
        (&["--tls", "--websocket"], "wss"),
    ] {
        let mut args = vec!["connect", "--devices", "100", "--duration", "5"];
        args.extend_from_slice(flags);
        let result = bench(&args);
        assert_eq!(
            (&result["devices"], &result["transport"]),
            (&json!(100), &json!(transport)),
            "{result}"
        );
        assert!(result["bytes_per_connection"].as_f64().is_some());
    }
}

#[test]
fn tls_and_websocket_are_refused_where_devices_do_not_just_connect() {
    for flag in ["--tls", "--websocket"] {
        let stderr = refused(&["report", flag]);
        assert!(
            stderr.contains(&format!("{flag} applies to the connect scenario")),
            "{stderr}"
        );
    }
}

#[test]
fn command_scenario_measures_round_trips_under_load() {
    let result = bench(&[
        "command",
        "--devices",
        "20",
        "--rate",
        "5",
        "--duration",
        "2",
    ]);
    assert!(result["round_trips"].as_u64().unwrap() > 0, "{result}");
    assert_eq!(result["failures"], 0, "{result}");
    assert!(result["round_trip_ms"]["p99"].as_f64().unwrap() > 0.0);
}

#[test]
fn overload_keeps_every_acknowledged_report() {
    let result = bench(&[
        "overload",
        "--devices",
        "16",
        "--duration",
        "2",
        "--server-args=--durability=normal",
    ]);
    let offered = result["offered"].as_u64().unwrap();
    let acked = result["acked"].as_u64().unwrap();
    assert_eq!(
        acked + result["refused"].as_u64().unwrap(),
        offered,
        "every report is answered: {result}"
    );
    assert_eq!(
        result["delivered"].as_u64(),
        Some(acked),
        "acknowledged means delivered: {result}"
    );
    assert!(
        result["server_rss_peak_bytes"].as_u64().unwrap() < 512 * 1024 * 1024,
        "{result}"
    );
}

#[test]
fn reference_runs_mosquitto_and_ioda_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let series_path = dir.path().join("half.txt");
    let result = bench(&[
        "reference",
        "--devices",
        "10",
        "--duration",
        "1",
        "--latency-series",
        series_path.to_str().unwrap(),
        "--latency-runs",
        "2",
    ]);
    let mosquitto = &result["mosquitto"];
    assert_eq!(mosquitto["qos0"]["lost"], 0, "{result}");
    assert!(
        mosquitto["qos1_lossless"]["lossless_rate"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{result}"
    );
    assert_eq!(result["ioda_report"]["lost"], 0, "{result}");
    // Both references, each with the ratio of what ioda delivered to its lossless rate.
    let delivered = result["ioda_report"]["delivered_per_second"]
        .as_f64()
        .unwrap();
    for (reference, ratio) in [
        ("qos1_lossless", "ioda_lossless_to_mosquitto_lossless_qos1"),
        (
            "qos1_lossless_tuned",
            "ioda_lossless_to_tuned_mosquitto_lossless_qos1",
        ),
    ] {
        let rate = mosquitto[reference]["lossless_rate"].as_f64().unwrap();
        assert!(rate > 0.0, "{result}");
        assert!(
            mosquitto[reference]["trials"].as_u64().unwrap() > 0,
            "{result}"
        );
        let shown = result[ratio].as_f64().unwrap();
        assert!(
            (shown - delivered / rate).abs() < 0.001,
            "{ratio}: {result}"
        );
    }
    // Latency at half of each lossless maximum: ioda paced at half of what it delivered, with
    // its accounting whole; Mosquitto at half its tuned rate, every message timed.
    let at_half = &result["ioda_at_half_maximum"];
    assert_eq!(at_half["lost"], 0, "{result}");
    assert_eq!(at_half["acked"], at_half["delivered"], "{result}");
    // The latency series is the run at half the maximum's, not the flat-out run's.
    assert!(
        result["ioda_report"]["latency_p99_spread"].is_null(),
        "{result}"
    );
    assert!(
        at_half["latency_p99_spread"]["windows"].as_u64().unwrap() > 0,
        "{result}"
    );
    let lines = std::fs::read_to_string(&series_path)
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        Some(lines as u64),
        at_half["delivered"].as_u64(),
        "{result}"
    );
    let asked = at_half["rate_per_device"].as_f64().unwrap() * 10.0;
    assert!((asked - delivered / 2.0).abs() < 1.0, "{result}");
    // Two runs at half the maximum, each on a fresh server: the one shown is the worse of the
    // two (the upper middle), and only its series is kept.
    let p99s: Vec<f64> = result["p99_ms_at_half_maximum"]["ioda_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect();
    assert_eq!(p99s.len(), 2, "{result}");
    let shown = at_half["latency_ms"]["p99"].as_f64().unwrap();
    assert_eq!(shown, p99s[0].max(p99s[1]), "{result}");
    assert_eq!(result["p99_ms_at_half_maximum"]["ioda"], shown, "{result}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != "half.txt")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let mosquitto_half = &mosquitto["qos1_tuned_at_half_lossless"]["run"];
    assert!(mosquitto_half["received"].as_u64().unwrap() > 0, "{result}");
    assert!(
        mosquitto_half["latency_ms"]["p99"].as_f64().unwrap()
            >= mosquitto_half["latency_ms"]["p50"].as_f64().unwrap(),
        "{result}"
    );
    assert!(
        mosquitto["qos1_lossless_tuned"]["config"]
            .as_str()
            .unwrap()
            .contains("max_inflight_messages 1000"),
        "{result}"
    );
}
