//! The command scenario: synchronous command round trips (API → device → API) to simulated devices
//! that answer at once, while other devices keep reporting in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ioda_mqtt::QoS;
use ioda_mqtt::client::ServerPacket;
use serde_json::{Value, json};

use super::device::Device;
use super::server::ServerProcess;
use super::{BenchArgs, connect_all, register, round};

/// A device that answers every command it receives.
async fn responder(mut device: Device, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let filter = format!("$oc/devices/{}/sys/commands/#", device.device_id);
    device.subscribe(&filter, QoS::AtMostOnce);
    device.send().await?;
    let answer = json!({"result_code": 0, "response_name": "PONG", "paras": {}}).to_string();
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(packet)) = tokio::time::timeout(Duration::from_millis(200), device.next()).await
        else {
            continue;
        };
        if let ServerPacket::Publish { topic, .. } = packet
            && let Some((_, request_id)) = topic.rsplit_once("request_id=")
        {
            let response = format!(
                "$oc/devices/{}/sys/commands/response/request_id={request_id}",
                device.device_id
            );
            device.publish(&response, answer.as_bytes(), QoS::AtMostOnce);
            device.send().await?;
        }
    }
    Ok(())
}

/// Background load: each device reports at `rate` per second until `stop`.
async fn background(mut device: Device, rate: f64, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let topic = format!("$oc/devices/{}/sys/properties/report", device.device_id);
    let report = json!({"services": [{"service_id": "Bench", "properties": {"seq": 1, "sent_at_us": 0, "pad": "x"}}]}).to_string();
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
    while !stop.load(Ordering::Relaxed) {
        device.publish(&topic, report.as_bytes(), QoS::AtLeastOnce);
        device.send().await?;
        device.next().await?;
        tokio::time::sleep(interval).await;
    }
    Ok(())
}

pub async fn run(server: &ServerProcess, args: &BenchArgs) -> anyhow::Result<Value> {
    let responders = (args.devices / 10).clamp(1, 100);
    let (_, ids) = register(&server.api, args.devices, args.json).await?;
    let devices = connect_all(
        server,
        &ids,
        Instant::now() + Duration::from_secs(120),
        args.json,
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, device) in devices.into_iter().enumerate() {
        if i < responders {
            tasks.spawn(responder(device, stop.clone()));
        } else {
            tasks.spawn(background(device, args.rate.max(1.0), stop.clone()));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let until = Instant::now() + Duration::from_secs(args.duration.max(1));
    let mut callers = tokio::task::JoinSet::new();
    for c in 0..8usize {
        let (api, ids) = (server.api.clone(), ids[..responders].to_vec());
        callers.spawn(async move {
            let mut samples = Vec::new();
            let mut failures = 0u64;
            let mut n = c;
            while Instant::now() < until {
                let path = format!("/devices/{}/commands", ids[n % ids.len()]);
                let started = Instant::now();
                let r = api
                    .call(
                        "POST",
                        &path,
                        Some(&json!({"command_name": "PING", "paras": {"n": 1}})),
                    )
                    .await;
                match r {
                    Ok(r) if r.status == 200 => samples.push(started.elapsed().as_micros() as u64),
                    _ => failures += 1,
                }
                n += 8;
            }
            (samples, failures)
        });
    }
    let mut samples = Vec::new();
    let mut failures = 0;
    while let Some(done) = callers.join_next().await {
        let (s, f) = done?;
        samples.extend(s);
        failures += f;
    }
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    samples.sort_unstable();
    let pick = |p: f64| {
        samples
            .get(((samples.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Ok(json!({
        "scenario": "command",
        "devices": args.devices,
        "responders": responders,
        "background_reports_per_second": round((args.devices - responders) as f64 * args.rate.max(1.0)),
        "round_trips": samples.len(),
        "failures": failures,
        "round_trips_per_second": round(samples.len() as f64 / args.duration.max(1) as f64),
        "round_trip_ms": { "p50": round(pick(0.5)), "p99": round(pick(0.99)), "max": round(pick(1.0)) },
    }))
}
