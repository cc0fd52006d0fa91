//! The `ioda` command line.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ioda::client::ApiClient;
use ioda::config::ServeArgs;
use serde_json::json;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

// jemalloc instead of glibc's allocator: the report path allocates and frees many small objects
// across threads, where glibc's arenas spent a fifth of the server's CPU; with the decay settings
// in `.cargo/config.toml` it also holds idle connections in fewer bytes (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ioda",
    version,
    about = "IoT device access platform, wire-compatible with Huawei Cloud IoTDA"
)]
struct Cli {
    /// Log filter, e.g. `info` or `info,ioda_engine=debug`.
    #[arg(long, global = true, env = "IODA_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the platform.
    Serve(Box<ServeArgs>),
    /// Call the REST API, signed with the administrator key of a data directory.
    Api {
        /// Data directory of the server (its admin-credentials.json and listeners.json are used).
        #[arg(long, env = "IODA_DATA_DIR", default_value = "ioda-data")]
        data_dir: PathBuf,
        /// HTTP method.
        method: String,
        /// Path, absolute (`/v5/iot/...`) or relative to the project (`/devices`).
        path: String,
        /// JSON request body.
        #[arg(long)]
        data: Option<String>,
    },
    /// Show what happened to a device's traffic, oldest first: refusals, failed forwarding,
    /// downlinks, and, while its message trace runs (`--start`, or `POST .../trace/start`), every
    /// stage of its uplinks.
    Trace {
        #[arg(long, env = "IODA_DATA_DIR", default_value = "ioda-data")]
        data_dir: PathBuf,
        device_id: String,
        /// How many of the newest entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start the device's message trace for this many seconds first (its successful
        /// traffic is traced from now on).
        #[arg(long, value_name = "SECONDS", conflicts_with = "stop")]
        start: Option<i64>,
        /// Stop the device's message trace first.
        #[arg(long)]
        stop: bool,
    },
    /// Measure the platform under load (loopback only, bounded in time).
    Bench(ioda::bench::BenchArgs),
    /// Work with codecs offline.
    #[command(subcommand)]
    Codec(CodecCommand),
    /// Print the MQTT client id, username and password of a device (for mosquitto_pub and friends).
    DeviceCredentials {
        #[arg(long)]
        device_id: String,
        #[arg(long)]
        secret: String,
        /// `YYYYMMDDHH`; the current UTC hour when absent.
        #[arg(long)]
        timestamp: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CodecCommand {
    /// Decode device bytes or encode a command with a codec file, as the platform would.
    Test {
        /// The codec: a JavaScript file (`*.js`, with `decode` and `encode`), or JSON:
        /// `{"type": "declarative", "definition": {...}}` or a bare definition.
        #[arg(long)]
        codec: PathBuf,
        /// The MQTT topic the bytes came on (passed to a script's `decode`).
        #[arg(long, requires = "decode")]
        topic: Option<String>,
        /// Device bytes in hex (spaces allowed).
        #[arg(long, conflicts_with = "encode", required_unless_present = "encode")]
        decode: Option<String>,
        /// A command as JSON: `{"service_id", "command_name", "paras", "mid"}`.
        #[arg(long)]
        encode: Option<String>,
    },
}

fn codec_test(
    codec: &std::path::Path,
    topic: Option<String>,
    decode: Option<String>,
    encode: Option<String>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(codec).with_context(|| format!("reading {}", codec.display()))?;
    let json: serde_json::Value = if codec.extension().is_some_and(|e| e == "js") {
        serde_json::json!({ "type": "javascript", "script": text })
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", codec.display()))?
    };
    let codec = ioda_codec::Codec::from_json(&json)?;
    let request = match (decode, encode) {
        (Some(hex), _) => serde_json::json!({ "decode": hex, "topic": topic }),
        (None, Some(command)) => serde_json::json!({
            "encode": serde_json::from_str::<serde_json::Value>(&command).context("--encode is not JSON")?
        }),
        (None, None) => anyhow::bail!("give --decode HEX or --encode JSON"),
    };
    println!("{}", serde_json::to_string_pretty(&codec.test(&request)?)?);
    Ok(())
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    let targets = Targets::from_str(filter).context("parsing the log filter")?;
    // Logs go to stderr (stdout carries command output), in colour only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(true);
    tracing_subscriber::registry()
        .with(layer)
        .with(targets)
        .init();
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let running = ioda::serve::start(config.clone()).await?;
    if let Some(admin) = &running.admin {
        println!(
            "First start: created project and administrator key (shown once, also in {}):",
            config
                .data_dir
                .join(ioda::serve::CREDENTIALS_FILE)
                .display()
        );
        println!(
            "  project_id: {}\n  access_key: {}\n  secret_key: {}",
            admin.project_id, admin.access_key, admin.secret_key
        );
    }
    let or_off = |addr: Option<std::net::SocketAddr>| {
        addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
    };
    println!(
        "ioda ready: http={} mqtt={} mqtts={} wss={} ws={} https={}",
        running.http_addr,
        running.mqtt_addr,
        or_off(running.mqtts_addr),
        or_off(running.wss_addr),
        or_off(running.ws_addr),
        or_off(running.https_addr),
    );
    if let Some(ca) = &running.tls_ca_file {
        println!(
            "  MQTTS, wss and HTTPS devices verify the server with {}",
            ca.display()
        );
    }
    wait_for_signal().await?;
    tracing::info!("shutting down");
    running.stop().await
}

async fn api(
    data_dir: PathBuf,
    method: String,
    path: String,
    data: Option<String>,
) -> anyhow::Result<()> {
    let client = ApiClient::from_data_dir(&data_dir)?;
    let body = data
        .map(|d| serde_json::from_str(&d))
        .transpose()
        .context("--data is not JSON")?;
    let response = client
        .call(&method.to_uppercase(), &path, body.as_ref())
        .await?;
    println!("{}", serde_json::to_string_pretty(&response.body)?);
    if response.status >= 400 {
        anyhow::bail!("HTTP {}", response.status);
    }
    Ok(())
}

/// What `ioda trace` does to the device's message trace before printing.
enum TraceChange {
    Start(i64),
    Stop,
}

/// Prints a device's trace, oldest first, after starting or stopping its message trace.
async fn trace(
    data_dir: PathBuf,
    device_id: String,
    limit: u32,
    change: Option<TraceChange>,
) -> anyhow::Result<()> {
    let client = ApiClient::from_data_dir(&data_dir)?;
    if let Some(change) = change {
        let (verb, body) = match change {
            TraceChange::Start(seconds) => ("start", json!({ "duration": seconds })),
            TraceChange::Stop => ("stop", json!({})),
        };
        let path = format!("/devices/{device_id}/trace/{verb}");
        let answer = client.call("POST", &path, Some(&body)).await?;
        if answer.status >= 400 {
            anyhow::bail!("HTTP {}: {}", answer.status, answer.body);
        }
    }
    let response = client
        .call(
            "GET",
            &format!("/devices/{device_id}/trace?limit={limit}"),
            None,
        )
        .await?;
    if response.status >= 400 {
        anyhow::bail!("HTTP {}: {}", response.status, response.body);
    }
    let entries = response.body["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let tracing = &response.body["tracing"];
    match tracing["until"].as_str() {
        _ if tracing["all_devices"] == true => {
            println!("message trace: every device (--trace-all)")
        }
        Some(until) => println!("message trace: running until {until}"),
        None => println!(
            "message trace: not running (what went wrong only; --start SECONDS to follow everything)"
        ),
    }
    for entry in entries.iter().rev() {
        println!(
            "{}  {:<20} {}",
            entry["time"].as_str().unwrap_or(""),
            entry["kind"].as_str().unwrap_or(""),
            entry["detail"]
        );
    }
    Ok(())
}

fn device_credentials(device_id: &str, secret: &str, timestamp: Option<String>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let timestamp = timestamp.unwrap_or_else(|| ioda_types::time::format_hour_stamp(now));
    println!("client_id={device_id}_0_0_{timestamp}");
    println!("username={device_id}");
    println!(
        "password={}",
        ioda_engine::auth::device_password(secret, &timestamp)
    );
}

/// How many tasks a worker polls from its own queue before it looks at the shared one.
///
/// Tasks woken from outside the async threads land in the shared queue: the connections whose
/// publishes the store's writer thread has just committed (their PUBACKs), and the forwarding
/// workers it hands committed reports to. tokio tunes this interval itself by default; flat out,
/// with a hundred connections always ready on the workers' own queues, the tuned interval left
/// forwarding so far behind that reports waited seconds (its memory full, read back from the
/// history) while the devices' acknowledgements kept pace. A fixed interval (61, tokio's own
/// before it tuned it) kept forwarding level with the devices in every run (BENCHMARKS.md).
const GLOBAL_QUEUE_INTERVAL: u32 = 61;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .global_queue_interval(GLOBAL_QUEUE_INTERVAL)
        .build()?
        .block_on(async_main())
}

async fn async_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log)?;
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Api {
            data_dir,
            method,
            path,
            data,
        } => api(data_dir, method, path, data).await,
        Command::Codec(CodecCommand::Test {
            codec,
            topic,
            decode,
            encode,
        }) => codec_test(&codec, topic, decode, encode),
        Command::Trace {
            data_dir,
            device_id,
            limit,
            start,
            stop,
        } => {
            let change = match (start, stop) {
                (Some(seconds), _) => Some(TraceChange::Start(seconds)),
                (None, true) => Some(TraceChange::Stop),
                (None, false) => None,
            };
            trace(data_dir, device_id, limit, change).await
        }
        Command::Bench(args) => ioda::bench::run(args).await,
        Command::DeviceCredentials {
            device_id,
            secret,
            timestamp,
        } => {
            device_credentials(&device_id, &secret, timestamp);
            Ok(())
        }
    }
}
