//! `ioda bench`: load scenarios against a server started for the purpose, with results a person can
//! read and a JSON line a script can check. Loopback only; every scenario stops at its time bound.

mod command;
mod device;
mod metrics;
mod reference;
mod report;
mod server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use openssl::ssl::{SslConnector, SslMethod};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::client::ApiClient;
use device::{Device, Transport};
use server::ServerProcess;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// N devices connect and stay idle: connection rate and server memory per connection.
    Connect,
    /// N devices send property reports through the whole pipeline to the application (an HTTP
    /// receiver, or a NATS subscriber with `--channel nats`).
    Report,
    /// More than the server can take: acknowledgements must still mean committed and delivered,
    /// and the server's memory must stay bounded.
    Overload,
    /// Synchronous command round trips to answering devices under background report load.
    Command,
    /// Mosquitto fan-in (N publishers → 1 subscriber, QoS 0 and 1) and ioda's report pipeline with
    /// the same N, in one run; the result is their ratio.
    Reference,
}

/// How the application receives the devices' reports (report, overload and reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Channel {
    /// HTTP push to a receiver in the bench: one POST per message, as IoTDA pushes.
    Http,
    /// NATS forwarding to a subscriber in the bench, through a `nats-server` the bench starts.
    Nats,
    /// MQTT forwarding (QoS 1) to a subscriber in the bench, through a Mosquitto the bench starts.
    Mqtt,
}

/// Flags of `ioda bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Seconds of load (report) or the bound on the whole run (connect).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Reports per second per device; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Unacknowledged reports each device may have outstanding. Flat out it sets the load; paced,
    /// it is how far a device keeps its pace while acknowledgements are late (an open loop: a slow
    /// server is not offered less).
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Paced devices all publish in the same instant instead of at evenly spread phases
    /// (the worst case for latency: every device's report lands in one burst).
    #[arg(long)]
    pub burst: bool,
    /// Extra flags for the server, e.g. `--durability normal`.
    #[arg(long, allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Environment for the server only, `KEY=VALUE` (repeatable), e.g. an allocator setting
    /// measured without it also applying to the load generator.
    #[arg(long)]
    pub server_env: Vec<String>,
    /// How the application receives the reports.
    #[arg(long, value_enum, default_value_t = Channel::Http)]
    pub channel: Channel,
    /// Write every delivered report's send time and latency (`<sent_at_us> <latency_us>`, Unix
    /// microseconds, one line each, in arrival order) to this file, and say in the result how the
    /// slow ones are spread over time. Report and overload; in reference, the run at half the
    /// maximum (none when the flat-out run lost reports, as then there is no such run).
    #[arg(long)]
    pub latency_series: Option<std::path::PathBuf>,
    /// Reference only: how many runs at half the maximum, each on a fresh server. One run's p99
    /// moves by a factor of three on a busy two-core machine, so the bar is read off the median
    /// run (for an even count, the worse of the middle two), and every run's p99 is shown. The
    /// latency series, if asked for, is the median run's.
    #[arg(long, default_value_t = 3)]
    pub latency_runs: usize,
    /// Print only one JSON line with the results.
    #[arg(long)]
    pub json: bool,
    /// `connect`: the devices connect over MQTTS (TLS, verified with the CA the server made).
    #[arg(long)]
    pub tls: bool,
    /// `connect`: the devices connect over MQTT over WebSocket (`ws://…/mqtt`; with `--tls`,
    /// `wss://…/mqtt`).
    #[arg(long)]
    pub websocket: bool,
}

const SECRET: &str = "bench-secret-1";

/// Runs a scenario and prints its results.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.devices > device::MAX_DEVICES {
        bail!(
            "at most {} devices: they connect from 127.0.0.2–127.0.0.255",
            device::MAX_DEVICES
        );
    }
    if args.latency_runs == 0 {
        bail!("--latency-runs must be at least 1");
    }
    if args.tls && args.scenario != Scenario::Connect {
        bail!("--tls applies to the connect scenario");
    }
    if args.websocket && args.scenario != Scenario::Connect {
        bail!("--websocket applies to the connect scenario");
    }
    // A file that cannot be written is said before the load (minutes, for the reference), not
    // after; what the file holds is left alone until the series replaces it.
    if let Some(path) = &args.latency_series {
        if matches!(args.scenario, Scenario::Connect | Scenario::Command) {
            bail!("--latency-series applies to the report, overload and reference scenarios");
        }
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // One descriptor per device here (the server is another process, which inherits the limit).
    let needed = args.devices as u64 + 1000;
    let raised = raise_fd_limit(needed);
    if raised < needed {
        bail!(
            "the file-descriptor limit ({raised}) is too low for {} devices",
            args.devices
        );
    }
    let extra: Vec<&str> = args.server_args.iter().map(String::as_str).collect();
    // The reference runs first, before ioda's server exists, so the two never share the machine.
    let mosquitto = match args.scenario {
        Scenario::Reference => Some(reference::mosquitto(&args).await?),
        _ => None,
    };
    let env: Vec<(String, String)> = args
        .server_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--server-env {kv:?} is not KEY=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    let server = ServerProcess::start(&extra, &env)?;
    let result = match args.scenario {
        Scenario::Connect => connect_scenario(&server, &args).await?,
        Scenario::Report => report::run(&server, &args, false).await?,
        Scenario::Overload => report::run(&server, &args, true).await?,
        Scenario::Command => command::run(&server, &args).await?,
        Scenario::Reference => {
            let mosquitto = mosquitto.unwrap_or_default();
            let restart = || ServerProcess::start(&extra, &env);
            reference_scenario(server, &args, mosquitto, restart).await?
        }
    };
    if args.json {
        println!("{result}");
    } else {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}

/// ioda against the Mosquitto reference. ioda runs flat out (its lossless maximum: a device
/// refills its window only as reports are acknowledged, and every acknowledged report must reach
/// the application), and the ratios of that to Mosquitto's lossless rates are taken. Then a fresh
/// server is paced at half that maximum for the latency bar, beside Mosquitto's own latency at
/// half its tuned maximum (same machine, same run: what a broker doing none of the platform's work
/// shows here).
async fn reference_scenario(
    server: ServerProcess,
    args: &BenchArgs,
    mosquitto: Value,
    restart: impl Fn() -> anyhow::Result<ServerProcess>,
) -> anyhow::Result<Value> {
    let flat_out = BenchArgs {
        latency_series: None,
        ..args.clone()
    };
    let ioda = report::run(&server, &flat_out, false).await?;
    drop(server);
    // Lossless against lossless: what ioda delivered to the application without loss versus the
    // highest rate at which Mosquitto lost nothing, with its defaults and tuned.
    let delivered = ioda["delivered_per_second"].as_f64().unwrap_or(0.0);
    let lossless_ioda = if ioda["lost"].as_u64() == Some(0) {
        delivered
    } else {
        0.0
    };
    let ratio_to = |reference: &str| {
        let rate = mosquitto[reference]["lossless_rate"]
            .as_f64()
            .unwrap_or(0.0);
        round(lossless_ioda / rate.max(1.0) * 100.0) / 100.0
    };
    let mut result = json!({
        "scenario": "reference",
        "ioda_lossless_to_mosquitto_lossless_qos1": ratio_to("qos1_lossless"),
        "ioda_lossless_to_tuned_mosquitto_lossless_qos1": ratio_to("qos1_lossless_tuned"),
    });
    if lossless_ioda > 0.0 {
        let (at_half, p99_of_each_run) = at_half_maximum(args, lossless_ioda, restart).await?;
        result["p99_ms_at_half_maximum"] = json!({
            "ioda": at_half["latency_ms"]["p99"],
            "ioda_runs": p99_of_each_run,
            "mosquitto_tuned": mosquitto["qos1_tuned_at_half_lossless"]["run"]["latency_ms"]["p99"],
        });
        result["ioda_at_half_maximum"] = at_half;
    }
    result["mosquitto"] = mosquitto;
    result["ioda_report"] = ioda;
    Ok(result)
}

/// ioda paced at half its lossless maximum `args.latency_runs` times, each on a fresh server:
/// the median run (by p99; for an even count the worse of the middle two) and every run's p99, in
/// the order they ran.
async fn at_half_maximum(
    args: &BenchArgs,
    lossless: f64,
    restart: impl Fn() -> anyhow::Result<ServerProcess>,
) -> anyhow::Result<(Value, Vec<Value>)> {
    let rate = lossless / 2.0 / args.devices.max(1) as f64;
    let mut runs = Vec::new();
    for run in 0..args.latency_runs.max(1) {
        let half = BenchArgs {
            rate,
            latency_series: args
                .latency_series
                .as_deref()
                .map(|p| series_of_run(p, run)),
            ..args.clone()
        };
        let server = restart()?;
        runs.push(report::run(&server, &half, false).await?);
    }
    let p99 = |run: &Value| run["latency_ms"]["p99"].as_f64().unwrap_or(f64::INFINITY);
    let mut by_p99: Vec<usize> = (0..runs.len()).collect();
    by_p99.sort_by(|&a, &b| p99(&runs[a]).total_cmp(&p99(&runs[b])));
    let median = by_p99[runs.len() / 2];
    if let Some(path) = &args.latency_series {
        for run in 0..runs.len() {
            let written = series_of_run(path, run);
            let kept = if run == median {
                std::fs::rename(&written, path)
            } else {
                std::fs::remove_file(&written)
            };
            if let Err(error) = kept {
                eprintln!("warning: {}: {error}", written.display());
            }
        }
    }
    let p99_of_each_run = runs
        .iter()
        .map(|r| r["latency_ms"]["p99"].clone())
        .collect();
    Ok((runs.swap_remove(median), p99_of_each_run))
}

/// Where one of several runs at half the maximum writes its latency series until the median
/// run's is kept: `<path>.run-<n>`, counted from 1.
fn series_of_run(path: &std::path::Path, run: usize) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".run-{}", run + 1));
    name.into()
}

/// Raises the open-file limit to at least `needed` if it can: the hard limit too when privileged.
fn raise_fd_limit(needed: u64) -> u64 {
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        && soft < needed
        && rlimit::setrlimit(rlimit::Resource::NOFILE, needed, hard.max(needed)).is_err()
    {
        let _ = rlimit::increase_nofile_limit(needed);
    }
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0)
}

/// Prints a progress line to stderr (stdout carries the result).
fn progress(quiet: bool, line: String) {
    if !quiet {
        eprintln!("{line}");
    }
}

/// Creates the bench product (a 200-byte report fits its model) and `n` devices.
async fn register(api: &ApiClient, n: usize, quiet: bool) -> anyhow::Result<(String, Vec<String>)> {
    let model = json!([{
        "service_id": "Bench", "service_type": "Bench",
        "properties": [
            {"property_name": "seq", "data_type": "long", "method": "R"},
            {"property_name": "sent_at_us", "data_type": "long", "method": "R"},
            {"property_name": "pad", "data_type": "string", "max_length": 256, "method": "R"}
        ],
        "commands": [{"command_name": "PING", "paras": [{"para_name": "n", "data_type": "int"}]}]
    }]);
    let product = api.call("POST", "/products", Some(&json!({"name": "bench", "device_type": "Bench", "protocol_type": "MQTT", "service_capabilities": model}))).await?;
    let product_id = product.body["product_id"]
        .as_str()
        .context("creating the bench product")?
        .to_owned();
    let limit = Arc::new(Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (api, product_id, limit) = (api.clone(), product_id.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire().await;
            let body = json!({"node_id": format!("bench-{i}"), "product_id": product_id, "auth_info": {"secret": SECRET}});
            let r = api.call("POST", "/devices", Some(&body)).await?;
            r.body["device_id"].as_str().map(|id| (i, id.to_owned())).context("registering a device")
        });
    }
    let mut ids = vec![String::new(); n];
    let started = Instant::now();
    while let Some(done) = tasks.join_next().await {
        let (i, id) = done??;
        ids[i] = id;
    }
    progress(
        quiet,
        format!(
            "registered {n} devices in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    Ok((product_id, ids))
}

/// Connects every device, `concurrency` at a time; returns them in order.
async fn connect_all(
    server: &ServerProcess,
    ids: &[String],
    deadline: Instant,
    quiet: bool,
) -> anyhow::Result<Vec<Device>> {
    connect_all_via(server, ids, deadline, quiet, (false, false)).await
}

/// Like `connect_all`, over MQTTS when `tls` (verifying the server with the CA it made), and
/// over MQTT over WebSocket when `websocket`.
async fn connect_all_via(
    server: &ServerProcess,
    ids: &[String],
    deadline: Instant,
    quiet: bool,
    (tls, websocket): (bool, bool),
) -> anyhow::Result<Vec<Device>> {
    let listener = match (tls, websocket) {
        (false, false) => Some(&server.mqtt_addr),
        (true, false) => server.mqtts_addr.as_ref(),
        (false, true) => server.ws_addr.as_ref(),
        (true, true) => server.wss_addr.as_ref(),
    };
    let addr = listener
        .context("the server has that listener off")?
        .parse();
    let mut transport = Transport {
        tls: None,
        websocket,
    };
    if tls {
        let mut builder = SslConnector::builder(SslMethod::tls_client())?;
        builder
            .set_ca_file(&server.tls_ca)
            .with_context(|| format!("reading {}", server.tls_ca.display()))?;
        transport.tls = Some(builder.build());
    }
    let addr: std::net::SocketAddr = addr.context("server address")?;
    let limit = Arc::new(Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for (n, id) in ids.iter().enumerate() {
        let (id, limit, transport) = (id.clone(), limit.clone(), transport.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire().await;
            Device::connect_via(n, addr, &transport, &id, SECRET, 1200)
                .await
                .map(|d| (n, d))
        });
    }
    let mut devices: Vec<Option<Device>> = (0..ids.len()).map(|_| None).collect();
    let mut connected = 0;
    let mut last = Instant::now();
    while let Some(done) = tasks.join_next().await {
        let (n, device) = done??;
        devices[n] = Some(device);
        connected += 1;
        if last.elapsed() >= Duration::from_secs(1) {
            progress(quiet, format!("connected {connected}/{}", ids.len()));
            last = Instant::now();
        }
        if Instant::now() > deadline {
            bail!("the time bound ran out after {connected} connections");
        }
    }
    Ok(devices.into_iter().flatten().collect())
}

async fn connect_scenario(server: &ServerProcess, args: &BenchArgs) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(args.duration.max(1) * 10);
    let (_, ids) = register(&server.api, args.devices, args.json).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.usage();
    let started = Instant::now();
    let transport = (args.tls, args.websocket);
    let mut devices = connect_all_via(server, &ids, deadline, args.json, transport).await?;
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = server.usage();
    for device in &mut devices {
        let filter = format!("$oc/devices/{}/sys/commands/#", device.device_id);
        device.subscribe(&filter, ioda_mqtt::QoS::AtLeastOnce);
        device.send().await?;
        device.next().await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let subscribed = server.usage();
    let n = devices.len().max(1) as f64;
    Ok(json!({
        "scenario": "connect",
        "transport": match (args.tls, args.websocket) {
            (false, false) => "mqtt",
            (true, false) => "mqtts",
            (false, true) => "ws",
            (true, true) => "wss",
        },
        "devices": devices.len(),
        "connect_seconds": round(connect_seconds),
        "connections_per_second": round(n / connect_seconds),
        "server_rss_before": before.rss_bytes,
        "server_rss_connected": connected.rss_bytes,
        "bytes_per_connection": round((connected.rss_bytes as f64 - before.rss_bytes as f64) / n),
        "bytes_per_connection_subscribed": round((subscribed.rss_bytes as f64 - before.rss_bytes as f64) / n),
    }))
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
