//! The report scenario: devices send ~200-byte property reports at QoS 1; a rule forwards every
//! report to an HTTP receiver run by the bench, which measures device-to-application latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::routing::post;
use futures_util::StreamExt;
use ioda_mqtt::QoS;
use ioda_mqtt::client::ServerPacket;
use serde_json::{Value, json};

use super::device::Device;
use super::reference::{Helper, TUNED_MOSQUITTO, free_port, start_helper, start_mosquitto};
use super::server::ServerProcess;
use super::{BenchArgs, Channel, connect_all, progress, register, round};

/// What the receiver has seen.
#[derive(Default)]
struct Received {
    /// Counted after the samples, so the samples always hold at least this many.
    delivered: AtomicU64,
    samples: Mutex<Samples>,
}

/// Each delivery's latency and, when asked for (`--latency-series`), its send time with it: kept
/// under one lock so that the two always describe the same deliveries.
#[derive(Default)]
struct Samples {
    latencies_us: Vec<u32>,
    /// (send time, latency), in microseconds.
    series: Option<Vec<(i64, u32)>>,
}

impl Samples {
    /// Room for `expected` deliveries up front (at most 2^26), so that a paced run's receiver
    /// does not stop to grow its vectors while it holds the lock.
    fn with_room(expected: usize, series: bool) -> Samples {
        let room = expected.min(1 << 26);
        Samples {
            latencies_us: Vec::with_capacity(room),
            series: series.then(|| Vec::with_capacity(room)),
        }
    }
}

/// Wall-clock microseconds: the report carries its send time to the receiver, in the same process,
/// so one clock stamps both ends. Milliseconds were too coarse for a bar of 10 ms (a latency read
/// as 9 could be anything from 8 to 10).
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The fields of a push envelope the receiver reads; the rest is skipped, not built, so that
/// the bench's receiver takes as little of the machine's CPU as it can.
#[derive(serde::Deserialize)]
struct Pushed {
    notify_data: PushedData,
}

#[derive(serde::Deserialize)]
struct PushedData {
    body: PushedBody,
}

#[derive(serde::Deserialize)]
struct PushedBody {
    services: Vec<PushedService>,
}

#[derive(serde::Deserialize)]
struct PushedService {
    properties: SentAt,
}

#[derive(serde::Deserialize)]
struct SentAt {
    sent_at_us: Option<i64>,
}

/// When the report in a pushed envelope was sent (`None` for anything else).
fn sent_at(body: &[u8]) -> Option<i64> {
    let pushed: Pushed = serde_json::from_slice(body).ok()?;
    pushed
        .notify_data
        .body
        .services
        .first()?
        .properties
        .sent_at_us
}

impl Received {
    /// Counts a delivered report and its latency.
    fn record(&self, body: &[u8]) {
        if let Some(sent) = sent_at(body) {
            let latency = now_us().saturating_sub(sent).clamp(0, i64::from(u32::MAX)) as u32;
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            samples.latencies_us.push(latency);
            if let Some(series) = &mut samples.series {
                series.push((sent, latency));
            }
            drop(samples);
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Width of the windows `slow_windows` divides a run into, by send time.
const WINDOW_MS: i64 = 100;
const WINDOW_US: i64 = WINDOW_MS * 1000;

/// How the reports at or above the run's p99 latency are spread over time: in how many of the
/// 100 ms windows (by send time) that any delivered report was sent in, one of them was. A few
/// windows mean stalls (something held everything up for a moment); most windows mean steady
/// queueing (the machine has no idle time).
fn slow_windows(series: &[(i64, u32)], p99_us: u32) -> Value {
    let windows: std::collections::BTreeMap<i64, bool> =
        series
            .iter()
            .fold(Default::default(), |mut windows, &(sent, latency)| {
                *windows.entry(sent.div_euclid(WINDOW_US)).or_default() |= latency >= p99_us;
                windows
            });
    json!({
        "window_ms": WINDOW_MS,
        "windows": windows.len(),
        "windows_with_a_p99_report": windows.values().filter(|slow| **slow).count(),
    })
}

/// Writes the series as text, one delivery a line.
fn write_series(path: &std::path::Path, series: &[(i64, u32)]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (sent, latency) in series {
        writeln!(out, "{sent} {latency}")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// The series written to its file, and how its slow reports spread. A file that cannot be
/// written costs the series, not the run's results: the error is said beside them.
fn keep_series(path: &std::path::Path, series: &[(i64, u32)], p99_us: u32) -> Value {
    let mut spread = slow_windows(series, p99_us);
    if let Err(error) = write_series(path, series) {
        let error = format!("writing {}: {error}", path.display());
        eprintln!("warning: {error}");
        spread["write_error"] = json!(error);
    }
    spread
}

/// The application side: the channel a rule forwards over, and what keeps its far end running.
struct Consumer {
    channel: &'static str,
    detail: Value,
    _broker: Option<Helper>,
}

async fn start_consumer(channel: Channel, received: Arc<Received>) -> anyhow::Result<Consumer> {
    match channel {
        Channel::Http => {
            let url = start_receiver(received).await?;
            Ok(Consumer {
                channel: "HTTP_FORWARDING",
                detail: json!({"http_forwarding": {"url": url}}),
                _broker: None,
            })
        }
        Channel::Nats => start_nats_subscriber(received).await,
        Channel::Mqtt => start_mqtt_subscriber(received).await,
    }
}

/// A Mosquitto of the bench's own on a free port, and a QoS 1 subscriber to the reports' topic.
/// The broker runs with the reference's tuned settings: with its defaults it lets one QoS 1
/// subscriber have 20 messages in flight and queues 1 000 behind them, and drops the rest.
async fn start_mqtt_subscriber(received: Arc<Received>) -> anyhow::Result<Consumer> {
    let port = free_port()?;
    let broker = start_mosquitto(port, Some(TUNED_MOSQUITTO))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut subscriber = Device::connect(0, addr, "bench-consumer", "x", 1200).await?;
    subscriber.subscribe(MQTT_TOPIC, QoS::AtLeastOnce);
    subscriber.send().await?;
    while !matches!(subscriber.next().await?, ServerPacket::SubAck { .. }) {}
    tokio::spawn(async move {
        while let Ok(packet) = subscriber.next().await {
            if let ServerPacket::Publish { payload, .. } = packet {
                received.record(&payload);
            }
        }
    });
    Ok(Consumer {
        channel: "MQTT_FORWARDING",
        detail: json!({"mqtt_forwarding": {"host": "127.0.0.1", "port": port, "topic": MQTT_TOPIC, "qos": 1}}),
        _broker: Some(broker),
    })
}

const MQTT_TOPIC: &str = "bench/reports";

async fn start_receiver(received: Arc<Received>) -> anyhow::Result<String> {
    let app = Router::new().route(
        "/push",
        post(move |body: axum::body::Bytes| {
            let received = received.clone();
            async move { received.record(&body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/push", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

/// A `nats-server` of the bench's own on a free port, and a subscriber to the reports' subject.
async fn start_nats_subscriber(received: Arc<Received>) -> anyhow::Result<Consumer> {
    let port = free_port()?;
    let broker = start_helper(
        "nats-server",
        &["-a", "127.0.0.1", "-p", &port.to_string()],
        port,
    )?;
    let url = format!("nats://127.0.0.1:{port}");
    let client = async_nats::connect(url.as_str()).await?;
    let mut subscription = client.subscribe(NATS_SUBJECT).await?;
    client.flush().await?;
    tokio::spawn(async move {
        let _client = client;
        while let Some(message) = subscription.next().await {
            received.record(&message.payload);
        }
    });
    Ok(Consumer {
        channel: "NATS_FORWARDING",
        detail: json!({"nats_forwarding": {"url": url, "subject": NATS_SUBJECT}}),
        _broker: Some(broker),
    })
}

const NATS_SUBJECT: &str = "bench.reports";

async fn forward_to(api: &crate::client::ApiClient, consumer: &Consumer) -> anyhow::Result<()> {
    let rule = api
        .call(
            "POST",
            "/routing-rule/rules",
            Some(&json!({"subject": {"resource": "device.property", "event": "report"}})),
        )
        .await?;
    let rule_id = rule.body["rule_id"]
        .as_str()
        .context("creating the rule")?
        .to_owned();
    api.call(
        "PUT",
        &format!("/routing-rule/rules/{rule_id}"),
        Some(&json!({"active": true})),
    )
    .await?;
    let action =
        json!({"rule_id": rule_id, "channel": consumer.channel, "channel_detail": consumer.detail});
    api.call("POST", "/routing-rule/actions", Some(&action))
        .await?;
    Ok(())
}

/// Counters shared by the device tasks.
#[derive(Default)]
struct Sent {
    offered: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    /// Publish → PUBACK, in microseconds: the ingest half of the latency (commit included).
    ack_latencies_us: Mutex<Vec<u32>>,
}

/// Drives one device. Paced devices start at evenly spread phases (`phase` of 1 apart), as a
/// fleet's devices do, rather than all publishing in the same instant, and keep publishing on
/// schedule with up to `window` reports unacknowledged. tokio's timers tick once a millisecond,
/// so the devices due within the same millisecond publish together (at 60 000 reports/s, sixty
/// at each tick). A timer of each device's own to the microsecond (a `timerfd` each) cost the
/// load generator a fifth of a core more at that rate and left the machine less for the server
/// (BENCHMARKS.md, twentieth session), so the millisecond stays.
async fn drive(
    mut device: Device,
    phase: f64,
    args: BenchArgs,
    until: Instant,
    sent: Arc<Sent>,
) -> anyhow::Result<()> {
    let topic = format!("$oc/devices/{}/sys/properties/report", device.device_id);
    let pad = "x".repeat(84);
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let mut next_at = Instant::now() + interval.map_or(Duration::ZERO, |i| i.mul_f64(phase));
    // PUBACKs come back in publish order, so the oldest send time answers the next one.
    let mut inflight = std::collections::VecDeque::new();
    let mut ack_latencies = Vec::new();
    let mut seq = 0u64;
    loop {
        let open = Instant::now() < until;
        let window = args.window.max(1);
        while open && inflight.len() < window && Instant::now() >= next_at {
            seq += 1;
            let report = report_payload(seq, now_us(), &pad);
            device.publish(&topic, report.as_bytes(), QoS::AtLeastOnce);
            inflight.push_back(Instant::now());
            sent.offered.fetch_add(1, Ordering::Relaxed);
            if let Some(interval) = interval {
                next_at += interval;
            }
        }
        device.send().await?;
        if inflight.is_empty() {
            if !open {
                sent.ack_latencies_us
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(&mut ack_latencies);
                return Ok(());
            }
            tokio::time::sleep_until(next_at.into()).await;
            continue;
        }
        // A paced device keeps its pace while acknowledgements are outstanding, up to the window:
        // an open loop, so a slow server is not offered less (and its latency not hidden).
        let packet = match interval {
            Some(_) if open && inflight.len() < window => tokio::select! {
                packet = device.next() => packet?,
                () = tokio::time::sleep_until(next_at.into()) => continue,
            },
            _ => device.next().await?,
        };
        // Every acknowledgement already read is counted before the window is refilled, so the
        // refill goes out in one write.
        let mut packet = Some(packet);
        while let Some(ServerPacket::PubAck { reason, .. }) = packet {
            if let Some(published) = inflight.pop_front() {
                ack_latencies
                    .push(published.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            if reason == 0 {
                sent.acked.fetch_add(1, Ordering::Relaxed);
            } else {
                sent.refused.fetch_add(1, Ordering::Relaxed);
            }
            packet = device.buffered()?;
        }
    }
}

/// A property report of about 200 bytes, written directly (the load generator's CPU is the
/// server's to have): exactly what `serde_json` makes of
/// `{"services":[{"service_id":"Bench","properties":{"seq":…,"sent_at_us":…,"pad":…}}]}`.
fn report_payload(seq: u64, sent_at_us: i64, pad: &str) -> String {
    format!(
        r#"{{"services":[{{"properties":{{"pad":"{pad}","sent_at_us":{sent_at_us},"seq":{seq}}},"service_id":"Bench"}}]}}"#
    )
}

/// Takes the samples collected so far, sorted.
pub(super) fn sorted(samples: &Mutex<Vec<u32>>) -> Vec<u32> {
    let mut taken = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    taken.sort_unstable();
    taken
}

/// p50, p99 and max of sorted microsecond samples, in milliseconds.
pub(super) fn summary_ms(sorted_us: &[u32]) -> Value {
    let ms = |us: u32| (f64::from(us) / 10.0).round() / 100.0;
    json!({
        "p50": ms(percentile(sorted_us, 0.5)),
        "p99": ms(percentile(sorted_us, 0.99)),
        "max": ms(sorted_us.last().copied().unwrap_or(0)),
    })
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// `overload`: more than the server can take (wide windows), a long drain, and the server's peak
/// memory sampled every second.
pub async fn run(
    server: &ServerProcess,
    args: &BenchArgs,
    overload: bool,
) -> anyhow::Result<Value> {
    let args = &BenchArgs {
        window: if overload {
            args.window.max(64)
        } else {
            args.window
        },
        ..args.clone()
    };
    let expected = args.rate * args.devices as f64 * args.duration as f64;
    let received = Arc::new(Received {
        samples: Mutex::new(Samples::with_room(
            (expected * 1.1) as usize,
            args.latency_series.is_some(),
        )),
        ..Received::default()
    });
    let consumer = start_consumer(args.channel, received.clone()).await?;
    let (_, ids) = register(&server.api, args.devices, args.json).await?;
    forward_to(&server.api, &consumer).await?;
    let devices = connect_all(
        server,
        &ids,
        Instant::now() + Duration::from_secs(120),
        args.json,
    )
    .await?;
    let before = server.usage();
    let stages_before = super::metrics::Snapshot::take(&server.api).await?;
    let sent = Arc::new(Sent::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(args.duration.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    let count = devices.len().max(1) as f64;
    for (n, device) in devices.into_iter().enumerate() {
        let phase = if args.burst { 0.0 } else { n as f64 / count };
        tasks.spawn(drive(device, phase, args.clone(), until, sent.clone()));
    }
    let peak_rss = Arc::new(AtomicU64::new(0));
    let reporter = {
        let (sent, received, quiet, peak, pid) = (
            sent.clone(),
            received.clone(),
            args.json,
            peak_rss.clone(),
            server.pid(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                peak.fetch_max(super::server::usage(pid).rss_bytes, Ordering::Relaxed);
                let line = format!(
                    "offered {} acked {} delivered {}",
                    sent.offered.load(Ordering::Relaxed),
                    sent.acked.load(Ordering::Relaxed),
                    received.delivered.load(Ordering::Relaxed)
                );
                progress(quiet, line);
            }
        })
    };
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let load_seconds = started.elapsed().as_secs_f64();
    let after = server.usage();
    // Let forwarding drain: everything acknowledged must arrive.
    let acked = sent.acked.load(Ordering::Relaxed);
    let drain_deadline = Instant::now() + Duration::from_secs(if overload { 300 } else { 30 });
    while received.delivered.load(Ordering::Relaxed) < acked && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reporter.abort();
    let total_seconds = started.elapsed().as_secs_f64();
    // Read after the clock stops: the scrape is not part of the run.
    let stages = super::metrics::Snapshot::take(&server.api)
        .await?
        .since(&stages_before);
    let Samples {
        latencies_us: mut latencies,
        series,
    } = std::mem::take(&mut *received.samples.lock().unwrap_or_else(|p| p.into_inner()));
    // What the samples hold is what was delivered: a late arrival after this is not counted in
    // one and left out of the other.
    let delivered = latencies.len() as u64;
    latencies.sort_unstable();
    let ack_latencies = sorted(&sent.ack_latencies_us);
    let spread = match (&args.latency_series, &series) {
        (Some(path), Some(series)) => keep_series(path, series, percentile(&latencies, 0.99)),
        _ => Value::Null,
    };
    Ok(json!({
        "scenario": if overload { "overload" } else { "report" },
        "channel": consumer.channel,
        "devices": args.devices,
        "rate_per_device": args.rate,
        "window": args.window,
        "load_seconds": round(load_seconds),
        "offered": sent.offered.load(Ordering::Relaxed),
        "acked": acked,
        "refused": sent.refused.load(Ordering::Relaxed),
        "delivered": delivered,
        "lost": acked.saturating_sub(delivered),
        "acked_per_second": round(acked as f64 / load_seconds),
        "delivered_per_second": round(delivered as f64 / total_seconds),
        "latency_ms": summary_ms(&latencies),
        "ack_latency_ms": summary_ms(&ack_latencies),
        "latency_p99_spread": spread,
        // The server's side of the acknowledgement latency (`ioda_store::stats`, `ioda_mqtt::stats`).
        "server_stages_ms": stages,
        "server_cpu_percent": round(100.0 * (after.cpu_seconds - before.cpu_seconds) / load_seconds),
        "server_rss_bytes": after.rss_bytes,
        "server_rss_peak_bytes": peak_rss.load(Ordering::Relaxed).max(after.rss_bytes),
        "drain_seconds": round(total_seconds - load_seconds),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_payload_is_what_serde_json_writes() {
        for (seq, sent_at_us, pad) in [
            (1, 0, "x"),
            (42, 1_764_150_000_123_456, "xxxxxxxxxx"),
            (u64::MAX, -1, ""),
        ] {
            let tree = json!({"services": [{"service_id": "Bench", "properties": {"seq": seq, "sent_at_us": sent_at_us, "pad": pad}}]});
            assert_eq!(report_payload(seq, sent_at_us, pad), tree.to_string());
        }
    }

    #[test]
    fn slow_windows_count_the_windows_a_p99_report_was_sent_in() {
        // (series, p99) → (windows, windows with a report at or above the p99); microseconds,
        // windows of 100 000.
        let table: [(&[(i64, u32)], u32, (u64, u64)); 6] = [
            (&[], 5_000, (0, 0)),
            (&[(0, 1_000), (99_999, 9_000)], 9_000, (1, 1)),
            (
                &[
                    (0, 1_000),
                    (100_000, 1_000),
                    (250_000, 7_000),
                    (299_000, 2_000),
                ],
                7_000,
                (3, 1),
            ),
            // Steady queueing: every window holds a slow one.
            (
                &[(10_000, 8_000), (110_000, 9_000), (210_000, 8_000)],
                8_000,
                (3, 3),
            ),
            // Send times before 1970 (a wrong clock) still fall in windows of their own.
            (&[(-1, 3_000), (-100_001, 3_000), (1, 1_000)], 3_000, (3, 2)),
            // A microsecond under the p99 is not slow.
            (&[(0, 8_999), (100_000, 9_000)], 9_000, (2, 1)),
        ];
        for (series, p99, (windows, slow)) in table {
            let spread = slow_windows(series, p99);
            assert_eq!(spread["windows"], windows, "{series:?}");
            assert_eq!(spread["windows_with_a_p99_report"], slow, "{series:?}");
        }
    }
}
