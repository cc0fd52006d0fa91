//! Configuration of `ioda serve`: command-line flags, each also settable by an `IODA_*` environment
//! variable and by an optional `ioda.toml`; flags and environment win over the file, the file over
//! the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use ioda_engine::EngineConfig;
use ioda_rules::ForwardConfig;
use ioda_store::Durability;
use serde::Deserialize;

use crate::tls::TlsSettings;

/// Flags of `ioda serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); `./ioda.toml` is read when present and this is not given.
    #[arg(long, env = "IODA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the embedded database and the state files live.
    #[arg(long, env = "IODA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// REST API listen address (port 0 picks a free port).
    #[arg(long, env = "IODA_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// MQTT listen address (port 0 picks a free port).
    #[arg(long, env = "IODA_MQTT_ADDR")]
    pub mqtt_addr: Option<SocketAddr>,
    /// MQTTS (MQTT over TLS 1.2/1.3) listen address (port 0 picks a free port), or `off`.
    /// Huawei's device SDKs use TLS when the port is 8883.
    #[arg(long, env = "IODA_MQTTS_ADDR")]
    pub mqtts_addr: Option<ListenAddr>,
    /// MQTT over secure WebSocket listen address (`wss://{host}:{port}/mqtt`, TLS as MQTTS), or
    /// `off`. IoTDA serves it on 443; the default port needs no privileges.
    #[arg(long, env = "IODA_WSS_ADDR")]
    pub wss_addr: Option<ListenAddr>,
    /// HTTPS device access listen address (IoTDA's uplink-only device API: `POST /v5/device-auth`,
    /// then `/v5/devices/{id}/sys/...`; TLS as MQTTS), or `off`. IoTDA serves it on 443.
    #[arg(long, env = "IODA_HTTPS_ADDR")]
    pub https_addr: Option<ListenAddr>,
    /// MQTT over plain WebSocket listen address (`ws://{host}:{port}/mqtt`), for a TLS-terminating
    /// proxy in front; `off` (the default) for none.
    #[arg(long, env = "IODA_WS_ADDR")]
    pub ws_addr: Option<ListenAddr>,
    /// TLS certificate chain for MQTTS and wss (PEM, server certificate first); with `--tls-key`.
    /// Without both, ioda makes a CA and a server certificate under `<data-dir>/tls` on first
    /// start, and devices verify the server with `<data-dir>/tls/ca.pem`.
    #[arg(long, env = "IODA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "IODA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Extra host names or IP addresses, comma-separated, for the certificate ioda makes (it
    /// always covers localhost, 127.0.0.1, ::1 and this machine's host name).
    #[arg(long, env = "IODA_TLS_NAMES", value_delimiter = ',')]
    pub tls_names: Option<Vec<String>>,
    /// CoAP/LwM2M (UDP) listen address for NB-IoT devices (port 0 picks a free port).
    #[arg(long, env = "IODA_COAP_ADDR")]
    pub coap_addr: Option<SocketAddr>,
    /// CoAPS (DTLS 1.2 PSK, UDP) listen address for NB-IoT devices (port 0 picks a free port).
    #[arg(long, env = "IODA_COAPS_ADDR")]
    pub coaps_addr: Option<SocketAddr>,
    /// CoAPS cipher suites offered, comma-separated OpenSSL names (default: both of IoTDA's,
    /// PSK-AES128-CCM8 and PSK-AES128-CBC-SHA256).
    #[arg(long, env = "IODA_COAPS_CIPHERS", value_delimiter = ',')]
    pub coaps_ciphers: Option<Vec<String>>,
    /// Largest uplink payload in bytes.
    #[arg(long, env = "IODA_MAX_PAYLOAD")]
    pub max_payload: Option<usize>,
    /// Uplink messages per second per device (0 = unlimited).
    #[arg(long, env = "IODA_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// Smallest accepted MQTT keepalive, seconds.
    #[arg(long, env = "IODA_KEEPALIVE_MIN")]
    pub keepalive_min: Option<u16>,
    /// Largest accepted MQTT keepalive, seconds.
    #[arg(long, env = "IODA_KEEPALIVE_MAX")]
    pub keepalive_max: Option<u16>,
    /// `full` (fsync every commit, survives power loss) or `normal` (survives a process crash).
    #[arg(long, env = "IODA_DURABILITY")]
    pub durability: Option<String>,
    /// Seconds a graceful shutdown may take.
    #[arg(long, env = "IODA_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// Seconds an API request's X-Sdk-Date may differ from the server clock.
    #[arg(long, env = "IODA_SIGNATURE_WINDOW")]
    pub signature_window: Option<u64>,
    /// Seconds a forwarding target (HTTP push) has to answer.
    #[arg(long, env = "IODA_FORWARD_TIMEOUT")]
    pub forward_timeout: Option<u64>,
    /// Days stored reports and messages are kept (0 = forever).
    #[arg(long, env = "IODA_HISTORY_RETENTION_DAYS")]
    pub history_retention_days: Option<u64>,
    /// Hours without data after which an NB-IoT (LwM2M) device is ABNORMAL.
    #[arg(long, env = "IODA_ABNORMAL_AFTER_HOURS")]
    pub abnormal_after_hours: Option<u64>,
    /// Hours without data after which an NB-IoT (LwM2M) device is OFFLINE.
    #[arg(long, env = "IODA_OFFLINE_AFTER_HOURS")]
    pub offline_after_hours: Option<u64>,
    /// Trace every device's successful traffic (stored, forwarded), not only that of devices
    /// whose message trace has been started through the API; costs CPU on every report.
    #[arg(
        long,
        env = "IODA_TRACE_ALL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub trace_all: Option<bool>,
}

/// The same settings as read from `ioda.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    http_addr: Option<SocketAddr>,
    mqtt_addr: Option<SocketAddr>,
    mqtts_addr: Option<ListenAddr>,
    wss_addr: Option<ListenAddr>,
    ws_addr: Option<ListenAddr>,
    https_addr: Option<ListenAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_names: Option<Vec<String>>,
    coap_addr: Option<SocketAddr>,
    coaps_addr: Option<SocketAddr>,
    coaps_ciphers: Option<Vec<String>>,
    max_payload: Option<usize>,
    rate_limit: Option<u32>,
    keepalive_min: Option<u16>,
    keepalive_max: Option<u16>,
    durability: Option<String>,
    shutdown_timeout: Option<u64>,
    signature_window: Option<u64>,
    forward_timeout: Option<u64>,
    history_retention_days: Option<u64>,
    abnormal_after_hours: Option<u64>,
    offline_after_hours: Option<u64>,
    trace_all: Option<bool>,
}

/// Fully resolved settings of a server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    /// None: no MQTTS listener.
    pub mqtts_addr: Option<SocketAddr>,
    /// None: no MQTT over secure WebSocket.
    pub wss_addr: Option<SocketAddr>,
    /// None: no MQTT over plain WebSocket.
    pub ws_addr: Option<SocketAddr>,
    /// None: no HTTPS device access.
    pub https_addr: Option<SocketAddr>,
    /// The certificate of MQTTS and wss.
    pub tls: TlsSettings,
    pub coap_addr: SocketAddr,
    pub coaps_addr: SocketAddr,
    /// CoAPS cipher suites (OpenSSL names).
    pub coaps_ciphers: Vec<String>,
    pub engine: EngineConfig,
    pub durability: Durability,
    pub shutdown_timeout: Duration,
    pub signature_window_ms: i64,
    pub forward: ForwardConfig,
    /// How long one write to an MQTT client may take before its connection is given up.
    pub mqtt_write_timeout: Duration,
}

impl ServeConfig {
    /// Defaults for a server with everything on ephemeral loopback ports (tests, benchmarks).
    pub fn ephemeral(data_dir: &Path) -> ServeConfig {
        ServeConfig {
            data_dir: data_dir.to_owned(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            mqtts_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            wss_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ws_addr: None,
            https_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            tls: TlsSettings::default(),
            coap_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            coaps_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            coaps_ciphers: default_ciphers(),
            engine: EngineConfig::default(),
            durability: Durability::Full,
            shutdown_timeout: Duration::from_secs(10),
            forward: ForwardConfig::default(),
            mqtt_write_timeout: Duration::from_secs(10),
            signature_window_ms: 15 * 60 * 1000,
        }
    }
}

/// A listen address, or `off` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<ListenAddr, String> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(ListenAddr(None));
        }
        text.parse()
            .map(|addr| ListenAddr(Some(addr)))
            .map_err(|_| format!("{text:?} is neither an address such as 0.0.0.0:8883 nor off"))
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ListenAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// IoTDA's two CoAPS suites.
fn default_ciphers() -> Vec<String> {
    ioda_coap::SUITES.iter().map(|s| (*s).to_owned()).collect()
}

fn read_file(args: &ServeArgs) -> anyhow::Result<FileConfig> {
    let path = match &args.config {
        Some(path) => path.clone(),
        None if Path::new("ioda.toml").exists() => PathBuf::from("ioda.toml"),
        None => return Ok(FileConfig::default()),
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse_durability(text: &str) -> anyhow::Result<Durability> {
    match text {
        "full" => Ok(Durability::Full),
        "normal" => Ok(Durability::Normal),
        other => bail!("durability must be full or normal, not {other:?}"),
    }
}

impl ServeArgs {
    /// Merges flags, environment, file and defaults, and checks the result.
    pub fn resolve(self) -> anyhow::Result<ServeConfig> {
        let file = read_file(&self)?;
        let defaults = EngineConfig::default();
        let engine = EngineConfig {
            max_payload: self
                .max_payload
                .or(file.max_payload)
                .unwrap_or(defaults.max_payload),
            rate_limit: self
                .rate_limit
                .or(file.rate_limit)
                .unwrap_or(defaults.rate_limit),
            keepalive_min: self
                .keepalive_min
                .or(file.keepalive_min)
                .unwrap_or(defaults.keepalive_min),
            keepalive_max: self
                .keepalive_max
                .or(file.keepalive_max)
                .unwrap_or(defaults.keepalive_max),
            history_retention_ms: self
                .history_retention_days
                .or(file.history_retention_days)
                .map_or(defaults.history_retention_ms, |days| {
                    days as i64 * 86_400_000
                }),
            abnormal_after_ms: self
                .abnormal_after_hours
                .or(file.abnormal_after_hours)
                .map_or(defaults.abnormal_after_ms, |h| h.max(1) as i64 * 3_600_000),
            offline_after_ms: self
                .offline_after_hours
                .or(file.offline_after_hours)
                .map_or(defaults.offline_after_ms, |h| h.max(1) as i64 * 3_600_000),
            trace_all: self
                .trace_all
                .or(file.trace_all)
                .unwrap_or(defaults.trace_all),
            ..defaults
        };
        if engine.abnormal_after_ms >= engine.offline_after_ms {
            bail!("abnormal_after_hours must be below offline_after_hours");
        }
        if engine.keepalive_min > engine.keepalive_max {
            bail!(
                "keepalive_min ({}) is above keepalive_max ({})",
                engine.keepalive_min,
                engine.keepalive_max
            );
        }
        if engine.max_payload == 0 || engine.max_payload > 256 * 1024 * 1024 {
            bail!("max_payload must be between 1 byte and 256 MiB");
        }
        let durability = self
            .durability
            .or(file.durability)
            .map_or(Ok(Durability::Full), |d| parse_durability(&d))?;
        Ok(ServeConfig {
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("ioda-data")),
            http_addr: self
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            mqtt_addr: self
                .mqtt_addr
                .or(file.mqtt_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 1883))),
            mqtts_addr: self
                .mqtts_addr
                .or(file.mqtts_addr)
                .map_or(Some(SocketAddr::from(([0, 0, 0, 0], 8883))), |a| a.0),
            wss_addr: self
                .wss_addr
                .or(file.wss_addr)
                .map_or(Some(SocketAddr::from(([0, 0, 0, 0], 8443))), |a| a.0),
            ws_addr: self.ws_addr.or(file.ws_addr).and_then(|a| a.0),
            https_addr: self
                .https_addr
                .or(file.https_addr)
                .map_or(Some(SocketAddr::from(([0, 0, 0, 0], 9443))), |a| a.0),
            tls: TlsSettings {
                cert: self.tls_cert.clone().or(file.tls_cert),
                key: self.tls_key.clone().or(file.tls_key),
                names: self
                    .tls_names
                    .clone()
                    .or(file.tls_names)
                    .unwrap_or_default(),
            },
            coap_addr: self
                .coap_addr
                .or(file.coap_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 5683))),
            coaps_addr: self
                .coaps_addr
                .or(file.coaps_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 5684))),
            coaps_ciphers: self
                .coaps_ciphers
                .clone()
                .or(file.coaps_ciphers)
                .unwrap_or_else(default_ciphers),
            engine,
            durability,
            shutdown_timeout: Duration::from_secs(
                self.shutdown_timeout
                    .or(file.shutdown_timeout)
                    .unwrap_or(10),
            ),
            signature_window_ms: self
                .signature_window
                .or(file.signature_window)
                .unwrap_or(900) as i64
                * 1000,
            mqtt_write_timeout: Duration::from_secs(10),
            forward: ForwardConfig {
                timeout: Duration::from_secs(
                    self.forward_timeout
                        .or(file.forward_timeout)
                        .unwrap_or(15)
                        .max(1),
                ),
                ..ForwardConfig::default()
            },
        })
    }
}
