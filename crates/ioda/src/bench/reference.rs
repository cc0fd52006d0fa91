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

struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_mosquitto(port: u16) -> anyhow::Result<Mosquitto> {
    let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("mosquitto");
    let child = Command::new(binary)
        .args(["-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (apt-get install mosquitto)")?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("mosquitto did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Mosquitto(child))
}

/// One fan-in run: `publishers` clients publish flat out for `seconds`; one subscriber counts.
async fn fan_in(
    port: u16,
    publishers: usize,
    qos: QoS,
    window: usize,
    seconds: u64,
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
            loop {
                let open = Instant::now() < until;
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

/// Mosquitto fan-in at QoS 0 and QoS 1.
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
    )
    .await?;
    let qos1 = fan_in(
        port,
        publishers,
        QoS::AtLeastOnce,
        args.window,
        args.duration,
    )
    .await?;
    Ok(json!({ "publishers": publishers, "qos0": qos0, "qos1": qos1 }))
}
