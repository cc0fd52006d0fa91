//! MQTTS: the server's certificate (given, or made on first start) and the TLS handshake.
//!
//! Huawei's device SDKs speak TLS when the port is 8883 and check the server's chain against a CA
//! file they are given (the Python SDK skips the host name), so a device moves to ioda by swapping
//! that file for ioda's `tls/ca.pem`. Without `--tls-cert`/`--tls-key`, ioda makes that CA on first
//! start and issues the server certificate from it; the CA stays, so devices keep trusting a
//! server certificate re-issued for other names.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use anyhow::{Context, bail};
use ioda_mqtt::server::Upgrade;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslMode, SslOptions, SslVersion};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509Builder, X509Name};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::serve::write_atomically;

/// The directory under the data directory that holds the made certificates.
pub const TLS_DIR: &str = "tls";
/// The CA devices verify ioda with, when ioda made its own certificate.
pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server.key";

/// TLS 1.2 suites IoTDA lists for MQTTS (ECDHE with AES-GCM or AES-CBC), and ChaCha20; TLS 1.3
/// keeps OpenSSL's own.
const CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:\
ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA";

/// Where the MQTTS certificate comes from.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// PEM certificate chain (server first) and its PEM private key; both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Host names and IP addresses the made certificate is for, besides localhost, 127.0.0.1,
    /// ::1 and this machine's host name.
    pub names: Vec<String>,
}

/// The MQTTS handshake, for the MQTT listener.
pub struct TlsUpgrade {
    acceptor: SslAcceptor,
    /// The CA file devices are given, when ioda made its certificate.
    pub ca_file: Option<PathBuf>,
}

impl TlsUpgrade {
    /// Loads the given certificate, or makes (once) and loads ioda's own under `data_dir/tls`.
    pub fn new(settings: &TlsSettings, data_dir: &Path) -> anyhow::Result<TlsUpgrade> {
        let (cert, key, ca_file) = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => {
                if !settings.names.is_empty() {
                    tracing::warn!(
                        "tls_names apply to the certificate ioda makes, not a given one"
                    );
                }
                (cert.clone(), key.clone(), None)
            }
            (None, None) => {
                let dir = data_dir.join(TLS_DIR);
                ensure_own_certificate(&dir, &settings.names)?;
                (
                    dir.join(CERT_FILE),
                    dir.join(KEY_FILE),
                    Some(dir.join(CA_FILE)),
                )
            }
            _ => bail!("tls_cert and tls_key go together: give both or neither"),
        };
        let acceptor = acceptor(&cert, &key)?;
        Ok(TlsUpgrade { acceptor, ca_file })
    }
}

impl Upgrade for TlsUpgrade {
    type Stream = SslStream<TcpStream>;

    async fn upgrade(&self, tcp: TcpStream, peer: SocketAddr) -> Option<SslStream<TcpStream>> {
        let mut stream = Ssl::new(self.acceptor.context())
            .and_then(|ssl| SslStream::new(ssl, tcp))
            .ok()?;
        match Pin::new(&mut stream).accept().await {
            Ok(()) => Some(stream),
            Err(error) => {
                tracing::debug!(%peer, %error, "mqtts handshake failed");
                None
            }
        }
    }
}

fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<SslAcceptor> {
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    builder.set_cipher_list(CIPHERS)?;
    // An idle connection gives its 16 KB read and write buffers back.
    builder.set_mode(SslMode::RELEASE_BUFFERS);
    // A client must not make the server run handshake after handshake on one connection.
    builder.set_options(SslOptions::NO_RENEGOTIATION);
    let chain = std::fs::read(cert)
        .map_err(anyhow::Error::from)
        .and_then(|pem| Ok(X509::stack_from_pem(&pem)?))
        .with_context(|| format!("reading the TLS certificate chain {}", cert.display()))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        bail!(
            "the TLS certificate chain {} holds no certificate",
            cert.display()
        );
    };
    let private_key = std::fs::read(key)
        .map_err(anyhow::Error::from)
        .and_then(|pem| Ok(PKey::private_key_from_pem(&pem)?))
        .with_context(|| format!("reading the TLS private key {}", key.display()))?;
    if !is_key_of(leaf, &private_key) {
        bail!(
            "the TLS private key {} does not belong to the certificate {}",
            key.display(),
            cert.display()
        );
    }
    builder.set_certificate(leaf)?;
    for certificate in intermediates {
        builder.add_extra_chain_cert(certificate.clone())?;
    }
    builder.set_private_key(&private_key)?;
    Ok(builder.build())
}

/// Whether `key` is the private key of `cert`.
fn is_key_of(cert: &X509, key: &PKey<Private>) -> bool {
    cert.public_key().is_ok_and(|public| public.public_eq(key))
}

/// Makes the CA (once) and a server certificate covering `names`, unless the one there serves:
/// its key, issued by this CA, for these names, valid for a month more at least.
fn ensure_own_certificate(dir: &Path, extra_names: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names = certificate_names(extra_names);
    let (ca, ca_key) = own_ca(dir)?;
    if still_serves(dir, &ca, &names) {
        return Ok(());
    }
    let key = new_key()?;
    let cert = server_certificate(&ca, &ca_key, &key, &names)?;
    let mut chain = cert.to_pem()?;
    chain.extend(ca.to_pem()?);
    write_atomically(
        &dir.join(KEY_FILE),
        &pem_text(key.private_key_to_pem_pkcs8()?)?,
        true,
    )?;
    write_atomically(&dir.join(CERT_FILE), &pem_text(chain)?, false)?;
    tracing::info!(dir = %dir.display(), ?names, "made the MQTTS server certificate");
    Ok(())
}

/// Whether the server certificate and key under `dir` can be served as they are.
fn still_serves(dir: &Path, ca: &X509, names: &[String]) -> bool {
    let (Ok(cert), Ok(key)) = (
        std::fs::read(dir.join(CERT_FILE)),
        std::fs::read(dir.join(KEY_FILE)),
    ) else {
        return false;
    };
    let (Ok(cert), Ok(key)) = (X509::from_pem(&cert), PKey::private_key_from_pem(&key)) else {
        return false;
    };
    let belongs = is_key_of(&cert, &key);
    let issued_by_ca = ca
        .public_key()
        .and_then(|ca_key| cert.verify(&ca_key))
        .unwrap_or(false);
    let month_ahead = Asn1Time::days_from_now(30);
    let now = Asn1Time::days_from_now(0);
    let in_date = matches!((now, month_ahead), (Ok(now), Ok(ahead))
        if cert.not_before() <= now && cert.not_after() >= ahead);
    belongs && issued_by_ca && in_date && covers(&cert, names)
}

/// The CA under `dir`, made if neither its certificate nor its key is there. Devices trust it,
/// so one that is there is never replaced: half of it, or a key that is not its own, is an error.
fn own_ca(dir: &Path) -> anyhow::Result<(X509, PKey<Private>)> {
    let (cert_path, key_path) = (dir.join(CA_FILE), dir.join(CA_KEY_FILE));
    match (cert_path.exists(), key_path.exists()) {
        (false, false) => make_ca(&cert_path, &key_path),
        (true, true) => {
            let cert = X509::from_pem(&std::fs::read(&cert_path)?)
                .with_context(|| format!("reading {}", cert_path.display()))?;
            let key = PKey::private_key_from_pem(&std::fs::read(&key_path)?)
                .with_context(|| format!("reading {}", key_path.display()))?;
            if !is_key_of(&cert, &key) {
                bail!(
                    "{} is not the key of {}: put the CA's own key back (devices trust that CA)",
                    key_path.display(),
                    cert_path.display()
                );
            }
            Ok((cert, key))
        }
        (true, false) => bail!(
            "{} is there without its key {}: put the key back, or remove both to make a new CA \
             (devices trusting the old one must then be given the new ca.pem)",
            cert_path.display(),
            key_path.display()
        ),
        (false, true) => bail!(
            "{} is there without its certificate {}: put it back, or remove both",
            key_path.display(),
            cert_path.display()
        ),
    }
}

fn make_ca(cert_path: &Path, key_path: &Path) -> anyhow::Result<(X509, PKey<Private>)> {
    let key = new_key()?;
    let name = distinguished_name("ioda device access CA")?;
    let mut builder = certificate_builder(&name, &name, &key, 20 * 365)?;
    builder.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    builder.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let key_id = SubjectKeyIdentifier::new().build(&builder.x509v3_context(None, None))?;
    builder.append_extension(key_id)?;
    builder.sign(&key, MessageDigest::sha256())?;
    let cert = builder.build();
    write_atomically(key_path, &pem_text(key.private_key_to_pem_pkcs8()?)?, true)?;
    write_atomically(cert_path, &pem_text(cert.to_pem()?)?, false)?;
    Ok((cert, key))
}

fn server_certificate(
    ca: &X509,
    ca_key: &PKey<Private>,
    key: &PKey<Private>,
    names: &[String],
) -> anyhow::Result<X509> {
    let subject = distinguished_name("ioda")?;
    let mut builder = certificate_builder(&subject, ca.subject_name(), key, 10 * 365)?;
    builder.append_extension(BasicConstraints::new().build()?)?;
    builder.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
    builder.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    let mut alt = SubjectAlternativeName::new();
    for name in names {
        match name.parse::<IpAddr>() {
            Ok(_) => alt.ip(name),
            Err(_) => alt.dns(name),
        };
    }
    let context = builder.x509v3_context(Some(ca), None);
    let alt = alt.build(&context)?;
    let authority = AuthorityKeyIdentifier::new().keyid(false).build(&context)?;
    builder.append_extension(alt)?;
    builder.append_extension(authority)?;
    builder.sign(ca_key, MessageDigest::sha256())?;
    Ok(builder.build())
}

/// A version 3 certificate's common part: names, key, random serial, validity from an hour ago.
fn certificate_builder(
    subject: &openssl::x509::X509NameRef,
    issuer: &openssl::x509::X509NameRef,
    key: &PKey<Private>,
    days: u32,
) -> anyhow::Result<X509Builder> {
    let mut builder = X509Builder::new()?;
    builder.set_version(2)?;
    let serial = random_serial()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(subject)?;
    builder.set_issuer_name(issuer)?;
    builder.set_pubkey(key)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (not_before, not_after) = (
        Asn1Time::from_unix(now - 3600)?,
        Asn1Time::days_from_now(days)?,
    );
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    Ok(builder)
}

fn random_serial() -> anyhow::Result<Asn1Integer> {
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    Ok(serial.to_asn1_integer()?)
}

fn distinguished_name(common_name: &str) -> anyhow::Result<X509Name> {
    let mut name = X509Name::builder()?;
    name.append_entry_by_nid(Nid::ORGANIZATIONNAME, "ioda")?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(name.build())
}

/// A P-256 key: what every TLS 1.2 client of this field takes, and made at once.
fn new_key() -> anyhow::Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn pem_text(pem: Vec<u8>) -> anyhow::Result<String> {
    Ok(String::from_utf8(pem)?)
}

/// localhost, the loopback addresses, this machine's host name, then the configured names.
fn certificate_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(host.trim().to_owned());
    }
    names.extend(extra.iter().map(|n| n.trim().to_owned()));
    names.retain(|n| !n.is_empty());
    names.dedup();
    names
}

/// Whether every one of `names` is among the certificate's subject alternative names.
fn covers(cert: &X509, names: &[String]) -> bool {
    let Some(alt) = cert.subject_alt_names() else {
        return false;
    };
    names.iter().all(|name| {
        alt.iter().any(|entry| match name.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => entry.ipaddress() == Some(&ip.octets()[..]),
            Ok(IpAddr::V6(ip)) => entry.ipaddress() == Some(&ip.octets()[..]),
            Err(_) => entry
                .dnsname()
                .is_some_and(|d| d.eq_ignore_ascii_case(name)),
        })
    })
}
