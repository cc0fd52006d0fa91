//! The reference: the same fan-in shape (publishers → one subscriber, 200-byte payloads) against a
//! Mosquitto started for the purpose, measured in the same run as ioda, so the result is a ratio
//! that survives a noisy machine.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ioda_mqtt::QoS;
use ioda_mqtt::client::ServerPacket;
use serde_json::{Value, json};

use super::device::Device;
use super::report::{sorted, summary_ms};
use super::{BenchArgs, round};

/// A broker the bench started; stopped when dropped.
pub(super) struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Mosquitto's defaults let a QoS 1 subscriber have 20 messages in flight and queue 1 000 behind
/// them (MQTT 3.1.1 has no receive maximum to ask for more), which bounds one subscriber's fan-in
/// by round trips, not by the broker's work. The tuned reference lifts both, so the ratio is also
/// taken against Mosquitto at its fastest for this shape.
pub(super) const TUNED_MOSQUITTO: &str =
    "allow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 100000\n";

/// Starts Mosquitto on `port`, with its defaults or with `config` (a configuration file's text;
/// the file is removed once Mosquitto has read it).
pub(super) fn start_mosquitto(port: u16, config: Option<&str>) -> anyhow::Result<Helper> {
    let port_arg = port.to_string();
    let Some(config) = config else {
        return start_helper("mosquitto", &["-p", &port_arg], port);
    };
    let path = std::env::temp_dir().join(format!(
        "ioda-bench-mosquitto-{}-{port}.conf",
        std::process::id()
    ));
    std::fs::write(&path, config).context("writing Mosquitto's configuration")?;
    let path_arg = path.to_string_lossy().into_owned();
    let started = start_helper("mosquitto", &["-c", &path_arg, "-p", &port_arg], port);
    let _ = std::fs::remove_file(&path);
    started
}

/// Starts the Debian-packaged broker `name` (found in /usr/sbin, /usr/bin or on the path) with
/// `args`, and waits until it listens on `port`.
pub(super) fn start_helper(name: &str, args: &[&str], port: u16) -> anyhow::Result<Helper> {
    let binary = ["/usr/sbin", "/usr/bin"]
        .into_iter()
        .map(|dir| format!("{dir}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| name.to_owned());
    let child = Command::new(binary)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name} (apt-get install {name})"))?;
    let helper = Helper(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("{name} did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(helper)
}

/// One fan-in run: `publishers` clients publish flat out for `seconds`; one subscriber counts.
async fn fan_in(
    port: u16,
    publishers: usize,
    qos: QoS,
    window: usize,
    seconds: u64,
    rate: Option<f64>,
) -> anyhow::Result<Value> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut subscriber = Device::connect(0, addr, "bench-subscriber", "x", 1200).await?;
    subscriber.subscribe("bench/#", qos);
    subscriber.send().await?;
    while !matches!(subscriber.next().await?, ServerPacket::SubAck { .. }) {}
    let started = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    // When the last message arrived (µs after the start): a broker that queues what it cannot
    // pass on yet delivers after the load ends, and its rate counts that time too, as ioda's does.
    let last_received_us = Arc::new(AtomicU64::new(0));
    let latencies_us = Arc::new(Mutex::new(Vec::<u32>::new()));
    let (counter, last, latencies) = (
        received.clone(),
        last_received_us.clone(),
        latencies_us.clone(),
    );
    let reader = tokio::spawn(async move {
        while let Ok(packet) = subscriber.next().await {
            if let ServerPacket::Publish { payload, .. } = packet {
                let now_us = started.elapsed().as_micros() as u64;
                counter.fetch_add(1, Ordering::Relaxed);
                last.store(now_us, Ordering::Relaxed);
                if let Some(sent_us) = stamp_of(&payload) {
                    let latency = now_us.saturating_sub(sent_us).min(u64::from(u32::MAX));
                    latencies
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push(latency as u32);
                }
            }
        }
    });
    let sent = Arc::new(AtomicU64::new(0));
    let until = started + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..publishers {
        let sent = sent.clone();
        tasks.spawn(async move {
            let mut device =
                Device::connect(n + 1, addr, &format!("bench-pub-{n}"), "x", 1200).await?;
            let topic = format!("bench/{n}");
            let mut payload = vec![b'x'; PAYLOAD_BYTES];
            let mut inflight = 0usize;
            // Paced runs: this publisher's share of the total rate.
            let interval = rate.map(|r| Duration::from_secs_f64(publishers as f64 / r.max(1.0)));
            let mut next_at = Instant::now();
            loop {
                let open = Instant::now() < until;
                if let Some(interval) = interval {
                    if open && inflight < window && Instant::now() >= next_at {
                        stamp(&mut payload, started);
                        device.publish(&topic, &payload, qos);
                        sent.fetch_add(1, Ordering::Relaxed);
                        next_at += interval;
                        if qos == QoS::AtLeastOnce {
                            inflight += 1;
                        }
                    }
                    device.send().await?;
                    if inflight == 0 {
                        if !open {
                            return Ok::<_, anyhow::Error>(());
                        }
                        tokio::time::sleep_until(next_at.into()).await;
                        continue;
                    }
                    let wait = next_at
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1));
                    if let Ok(Ok(ServerPacket::PubAck { .. })) =
                        tokio::time::timeout(wait, device.next()).await
                    {
                        inflight -= 1;
                    }
                    continue;
                }
                while open && (qos == QoS::AtMostOnce || inflight < window) {
                    stamp(&mut payload, started);
                    device.publish(&topic, &payload, qos);
                    sent.fetch_add(1, Ordering::Relaxed);
                    if qos == QoS::AtLeastOnce {
                        inflight += 1;
                    } else {
                        break;
                    }
                }
                device.send().await?;
                if qos == QoS::AtMostOnce {
                    if !open {
                        return Ok::<_, anyhow::Error>(());
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                if inflight == 0 && !open {
                    return Ok(());
                }
                // Every acknowledgement already read counts before the window is refilled.
                let mut packet = Some(device.next().await?);
                while let Some(ServerPacket::PubAck { .. }) = packet {
                    inflight = inflight.saturating_sub(1);
                    packet = device.buffered()?;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let load_seconds = started.elapsed().as_secs_f64();
    let total = sent.load(Ordering::Relaxed);
    let drain = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < total && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    let got = received.load(Ordering::Relaxed);
    let last_seconds = last_received_us.load(Ordering::Relaxed) as f64 / 1e6;
    let busy_seconds = load_seconds.max(last_seconds);
    Ok(json!({
        "qos": qos as u8,
        "sent": total,
        "received": got,
        "lost": total.saturating_sub(got),
        "received_per_second": round(got as f64 / busy_seconds),
        "drain_seconds": round(busy_seconds - load_seconds),
        "latency_ms": summary_ms(&sorted(&latencies_us)),
    }))
}

/// Width of the send time (µs after the run's start, decimal) that leads each reference payload.
const STAMP_DIGITS: usize = 16;
/// Payload size of the reference's messages, as ioda's reports (about 200 bytes).
const PAYLOAD_BYTES: usize = 200;

/// Writes the send time over the start of a payload, so the subscriber can tell each message's
/// latency (publishers and subscriber share the process, so one clock).
fn stamp(payload: &mut [u8], started: Instant) {
    let mut us = started.elapsed().as_micros();
    for digit in payload[..STAMP_DIGITS].iter_mut().rev() {
        *digit = b'0' + (us % 10) as u8;
        us /= 10;
    }
}

/// The send time a payload starts with (none if it does not: another publisher's message).
fn stamp_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..STAMP_DIGITS)?)
        .ok()?
        .parse()
        .ok()
}

/// The search stops bisecting once the bracket around the lossless maximum is this narrow (a
/// fraction of the rate found), or after `MAX_BISECTIONS` steps.
const PRECISION: f64 = 0.02;
const MAX_BISECTIONS: usize = 8;

/// What one paced trial showed: whether nothing was lost, the rate achieved, and the run's record.
type Trial = (bool, f64, Value);

/// The highest rate at which a broker delivered everything, paced: doubling from 1 000/s until a
/// trial loses messages, then bisecting until the bracket is within `PRECISION` of the rate found.
/// A trial counts at the rate it achieved, not the one asked for: on a busy machine the publishers
/// may fall short of their pace without any loss, and that trial still shows the broker
/// delivering all it got (and no higher rate can be offered, so the search stops there).
/// Returns the rate, the best trial's record, and how many trials ran.
async fn highest_lossless<F, Fut>(mut trial: F) -> anyhow::Result<(f64, Value, usize)>
where
    F: FnMut(f64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Trial>>,
{
    let (mut good, mut bad) = (0.0, None::<f64>);
    let mut best = Value::Null;
    let mut trials = 0;
    let mut rate = 1000.0;
    while rate <= 512_000.0 {
        let (lossless, achieved, run) = trial(rate).await?;
        trials += 1;
        if !lossless {
            bad = Some(rate);
            break;
        }
        if achieved > good {
            (good, best) = (achieved, run);
        }
        if achieved < rate * 0.9 {
            // The publishers could not offer more: nothing higher can be tried.
            break;
        }
        rate *= 2.0;
    }
    if let Some(mut high) = bad {
        for _ in 0..MAX_BISECTIONS {
            if high - good <= good * PRECISION {
                break;
            }
            let mid = (good + high) / 2.0;
            let (lossless, achieved, run) = trial(mid).await?;
            trials += 1;
            if !lossless {
                high = mid;
            } else if achieved > good {
                (good, best) = (achieved, run);
            } else {
                // Lossless but short of its pace: the publishers' limit, not the broker's.
                break;
            }
        }
    }
    Ok((good, best, trials))
}

/// Mosquitto's lossless QoS 1 fan-in rate (`highest_lossless` over paced trials).
async fn lossless_qos1(
    port: u16,
    publishers: usize,
    window: usize,
    seconds: u64,
) -> anyhow::Result<Value> {
    let trial = |rate: f64| async move {
        let run = fan_in(
            port,
            publishers,
            QoS::AtLeastOnce,
            window,
            seconds,
            Some(rate),
        )
        .await?;
        let lossless = run["lost"].as_u64() == Some(0);
        let achieved = run["received_per_second"].as_f64().unwrap_or(0.0);
        Ok::<_, anyhow::Error>((lossless, achieved, run))
    };
    let (rate, run, trials) = highest_lossless(trial).await?;
    Ok(json!({ "lossless_rate": rate, "trials": trials, "run": run }))
}

/// Mosquitto fan-in at QoS 0 and QoS 1 flat out, and its lossless QoS 1 rate with its defaults
/// and tuned (`TUNED_MOSQUITTO`).
pub async fn mosquitto(args: &BenchArgs) -> anyhow::Result<Value> {
    let port = free_port()?;
    let broker = start_mosquitto(port, None)?;
    let publishers = args.devices;
    let qos0 = fan_in(
        port,
        publishers,
        QoS::AtMostOnce,
        args.window,
        args.duration,
        None,
    )
    .await?;
    let qos1 = fan_in(
        port,
        publishers,
        QoS::AtLeastOnce,
        args.window,
        args.duration,
        None,
    )
    .await?;
    let trial_seconds = args.duration.min(3);
    let lossless = lossless_qos1(port, publishers, args.window, trial_seconds).await?;
    drop(broker);
    let port = free_port()?;
    let _tuned = start_mosquitto(port, Some(TUNED_MOSQUITTO))?;
    let mut tuned = lossless_qos1(port, publishers, args.window, trial_seconds).await?;
    tuned["config"] = TUNED_MOSQUITTO.trim_end().replace('\n', "; ").into();
    // Latency at half its fastest lossless rate: the latency bar's conditions, for a broker that
    // does none of the platform's work, on the same machine.
    let half_rate = tuned["lossless_rate"].as_f64().unwrap_or(0.0) / 2.0;
    let at_half = fan_in(
        port,
        publishers,
        QoS::AtLeastOnce,
        args.window,
        args.duration,
        Some(half_rate.max(1.0)),
    )
    .await?;
    Ok(json!({
        "publishers": publishers,
        "qos0": qos0,
        "qos1": qos1,
        "qos1_lossless": lossless,
        "qos1_lossless_tuned": tuned,
        "qos1_tuned_at_half_lossless": { "rate": round(half_rate), "run": at_half },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_carries_its_send_time() {
        let started = Instant::now() - Duration::from_secs(3);
        let mut payload = vec![b'x'; PAYLOAD_BYTES];
        stamp(&mut payload, started);
        assert_eq!(payload.len(), PAYLOAD_BYTES);
        let sent = stamp_of(&payload).unwrap();
        assert!((3_000_000..4_000_000).contains(&sent), "{sent}");
        assert!(payload[STAMP_DIGITS..].iter().all(|&b| b == b'x'));
        // What another publisher sent, or a payload too short, carries no time.
        for other in [
            &b"xxxxxxxxxxxxxxxxxxxx"[..],
            b"0123",
            b"",
            b"00000000000001x2",
        ] {
            assert_eq!(stamp_of(other), None, "{other:?}");
        }
    }

    /// A simulated broker: lossless up to `capacity`; publishers that cannot offer more than
    /// `offer_limit`.
    async fn search(capacity: f64, offer_limit: f64) -> (f64, usize) {
        let (rate, run, trials) = highest_lossless(|rate: f64| async move {
            let achieved = rate.min(offer_limit);
            Ok((achieved <= capacity, achieved, json!({ "asked": rate })))
        })
        .await
        .unwrap();
        if rate > 0.0 {
            assert_eq!(
                run["asked"].as_f64().map(|r| r.min(offer_limit)),
                Some(rate)
            );
        }
        (rate, trials)
    }

    #[tokio::test]
    async fn the_search_finds_the_lossless_maximum_to_within_its_precision() {
        for capacity in [1_500.0, 27_514.0, 37_000.0, 63_000.0, 70_800.0, 300_000.0] {
            let (rate, trials) = search(capacity, f64::MAX).await;
            assert!(rate <= capacity, "{rate} above the capacity {capacity}");
            assert!(
                rate >= capacity * (1.0 - PRECISION),
                "{rate} not within {PRECISION} of {capacity}"
            );
            assert!(trials <= 10 + MAX_BISECTIONS, "{trials} trials");
        }
    }

    #[tokio::test]
    async fn the_search_stops_where_the_publishers_cannot_offer_more() {
        // Lossless everywhere, but the publishers reach only 45 000/s: 1k, 2k, …, 64k (short of
        // its pace: stop).
        let (rate, trials) = search(f64::MAX, 45_000.0).await;
        assert_eq!((rate, trials), (45_000.0, 7));
    }

    #[tokio::test]
    async fn a_lossless_trial_short_of_its_pace_ends_the_bisection() {
        // Lossless up to 50 000/s; after the first loss the machine gets busy and the publishers
        // reach only half their pace: the bisection cannot learn more and stops.
        let mut lost_once = false;
        let (rate, _, trials) = highest_lossless(|asked: f64| {
            let achieved = if lost_once { asked / 2.0 } else { asked };
            let lossless = achieved <= 50_000.0;
            lost_once |= !lossless;
            async move { Ok((lossless, achieved, Value::Null)) }
        })
        .await
        .unwrap();
        // 1k … 32k, 64k lost, 48k asked gives 24k: stop at 32k.
        assert_eq!((rate, trials), (32_000.0, 8));
    }

    #[tokio::test]
    async fn a_broker_that_loses_at_once_scores_below_the_first_rate() {
        let (rate, _) = search(600.0, f64::MAX).await;
        assert!(
            (600.0 * (1.0 - PRECISION) - 1.0..=600.0).contains(&rate),
            "{rate}"
        );
    }
}
