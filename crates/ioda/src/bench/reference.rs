//! The reference: the same fan-in shape (publishers → one subscriber, 200-byte payloads) against a
//! Mosquitto started for the purpose, measured in the same run as ioda, so the result is a ratio
//! that survives a noisy machine.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ioda_mqtt::QoS;
use ioda_mqtt::client::ServerPacket;
use serde_json::{Value, json};

use super::device::Device;
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

fn start_mosquitto(port: u16) -> anyhow::Result<Helper> {
    start_helper("mosquitto", &["-p", &port.to_string()], port)
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
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        while let Ok(packet) = subscriber.next().await {
            if matches!(packet, ServerPacket::Publish { .. }) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let sent = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..publishers {
        let sent = sent.clone();
        tasks.spawn(async move {
            let mut device =
                Device::connect(n + 1, addr, &format!("bench-pub-{n}"), "x", 1200).await?;
            let topic = format!("bench/{n}");
            let payload = vec![b'x'; 200];
            let mut inflight = 0usize;
            // Paced runs: this publisher's share of the total rate.
            let interval = rate.map(|r| Duration::from_secs_f64(publishers as f64 / r.max(1.0)));
            let mut next_at = Instant::now();
            loop {
                let open = Instant::now() < until;
                if let Some(interval) = interval {
                    if open && inflight < window && Instant::now() >= next_at {
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
                if let ServerPacket::PubAck { .. } = device.next().await? {
                    inflight -= 1;
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
    Ok(json!({
        "qos": qos as u8,
        "sent": total,
        "received": got,
        "lost": total.saturating_sub(got),
        "received_per_second": round(got as f64 / load_seconds),
    }))
}

/// The highest rate at which Mosquitto delivered everything at QoS 1, paced: doubling from
/// 1 000/s until a run loses messages, then three bisection steps. A run counts at the rate it
/// achieved, not the one asked for: on a busy machine the publishers may fall short of their pace
/// without any loss, and that run still shows Mosquitto delivering all it got (and no higher rate
/// can be offered, so the search stops there).
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
    let (mut good, mut bad) = (0.0, None::<f64>);
    let mut best = Value::Null;
    let mut rate = 1000.0;
    while rate <= 512_000.0 {
        let (lossless, achieved, run) = trial(rate).await?;
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
        for _ in 0..3 {
            let mid = (good + high) / 2.0;
            let (lossless, achieved, run) = trial(mid).await?;
            if !lossless {
                high = mid;
            } else if achieved > good {
                (good, best) = (achieved, run);
            }
        }
    }
    Ok(json!({ "lossless_rate": good, "run": best }))
}

/// Mosquitto fan-in at QoS 0 and QoS 1 flat out, and its lossless QoS 1 rate.
pub async fn mosquitto(args: &BenchArgs) -> anyhow::Result<Value> {
    let port = free_port()?;
    let _broker = start_mosquitto(port)?;
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
    let lossless = lossless_qos1(port, publishers, args.window, args.duration.min(3)).await?;
    Ok(json!({ "publishers": publishers, "qos0": qos0, "qos1": qos1, "qos1_lossless": lossless }))
}
