//! Huawei Cloud AK/SK request signatures: `SDK-HMAC-SHA256` and the derived `V11-HMAC-SHA256`.
//!
//! The canonical request is rebuilt from what arrived (decoded path and query, the listed headers,
//! the body hash), exactly as the SDK's signer builds it, so any compliant client verifies.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The parsed `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub algorithm: Algorithm,
    pub access_key: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

/// The signature algorithm and, for the derived one, its credential scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Algorithm {
    Classic,
    Derived {
        date: String,
        region: String,
        service: String,
    },
}

/// Why a signature was not accepted (logged, never shown to the caller in detail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("missing or malformed Authorization header")]
    BadHeader,
    #[error("missing or malformed X-Sdk-Date")]
    BadDate,
    #[error("X-Sdk-Date outside the accepted window")]
    Expired,
    #[error("unknown access key")]
    UnknownKey,
    #[error("signature mismatch")]
    Mismatch,
}

/// Parses `SDK-HMAC-SHA256 Access=..., SignedHeaders=..., Signature=...` or
/// `V11-HMAC-SHA256 Credential=AK/date/region/service, SignedHeaders=..., Signature=...`.
pub fn parse_authorization(header: &str) -> Result<Authorization, SignError> {
    let (algorithm, rest) = header.trim().split_once(' ').ok_or(SignError::BadHeader)?;
    let mut access = None;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let (key, value) = part.trim().split_once('=').ok_or(SignError::BadHeader)?;
        match key {
            "Access" => access = Some(value),
            "Credential" => credential = Some(value),
            "SignedHeaders" => signed = Some(value),
            "Signature" => signature = Some(value),
            _ => {}
        }
    }
    let (access_key, algorithm) = match (algorithm, access, credential) {
        ("SDK-HMAC-SHA256", Some(ak), _) => (ak.to_owned(), Algorithm::Classic),
        ("V11-HMAC-SHA256", _, Some(cred)) => {
            let parts: Vec<&str> = cred.split('/').collect();
            let [ak, date, region, service] = parts[..] else {
                return Err(SignError::BadHeader);
            };
            let scope = Algorithm::Derived {
                date: date.to_owned(),
                region: region.to_owned(),
                service: service.to_owned(),
            };
            (ak.to_owned(), scope)
        }
        _ => return Err(SignError::BadHeader),
    };
    let signed_headers: Vec<String> = signed
        .ok_or(SignError::BadHeader)?
        .split(';')
        .map(str::to_ascii_lowercase)
        .collect();
    let signature = signature.ok_or(SignError::BadHeader)?.to_ascii_lowercase();
    if access_key.is_empty() || signed_headers.iter().any(String::is_empty) {
        return Err(SignError::BadHeader);
    }
    Ok(Authorization {
        algorithm,
        access_key,
        signed_headers,
        signature,
    })
}

fn percent_decode(s: &str) -> Vec<u8> {
    decode_escapes(s, false)
}

/// Decodes `%XX` escapes (and, for form bodies, `+` as a space); malformed escapes stay as they are.
pub(crate) fn decode_escapes(s: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// RFC 3986 encoding with only the unreserved set kept (Python's `quote(s, safe='~')`).
fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The canonical URI: decoded, split on `/`, each segment re-encoded, with a trailing `/`.
pub fn canonical_uri(raw_path: &str) -> String {
    let decoded = percent_decode(raw_path);
    let segments: Vec<String> = decoded.split(|b| *b == b'/').map(encode).collect();
    let mut uri = segments.join("/");
    if !uri.ends_with('/') {
        uri.push('/');
    }
    uri
}

/// The canonical query string: pairs decoded, sorted by key then value, re-encoded.
pub fn canonical_query(raw_query: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (encode(&percent_decode(k)), encode(&percent_decode(v)))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// What the verifier needs of a request.
#[derive(Clone)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    pub raw_path: &'a str,
    pub raw_query: Option<&'a str>,
    /// Looks up a header value by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<String>,
    pub body: &'a [u8],
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The canonical request the SDK signs.
pub fn canonical_request(parts: &RequestParts<'_>, signed_headers: &[String]) -> String {
    let headers: String = signed_headers
        .iter()
        .map(|name| {
            format!(
                "{name}:{}\n",
                (parts.header)(name).unwrap_or_default().trim()
            )
        })
        .collect();
    // The declared content hash stands in for the body only when it is itself signed; otherwise
    // anyone could attach one to a captured request and swap the body.
    let declared = signed_headers
        .iter()
        .any(|h| h == "x-sdk-content-sha256")
        .then(|| (parts.header)("x-sdk-content-sha256"))
        .flatten();
    let payload_hash = declared.unwrap_or_else(|| sha256_hex(parts.body));
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        parts.method.to_ascii_uppercase(),
        canonical_uri(parts.raw_path),
        canonical_query(parts.raw_query),
        headers,
        signed_headers.join(";"),
        payload_hash
    )
}

/// The derived signing key of V11: HKDF-SHA256(IKM = SK, salt = AK, info), one block, as lower-case hex.
pub fn derived_key(access_key: &str, secret_key: &str, info: &str) -> String {
    let prk = hmac(access_key.as_bytes(), secret_key.as_bytes());
    let mut block = info.as_bytes().to_vec();
    block.push(1);
    hex::encode(hmac(&prk, &block))
}

/// Computes the signature of a request for the given algorithm.
pub fn signature(
    auth: &Authorization,
    secret_key: &str,
    sdk_date: &str,
    canonical: &str,
) -> String {
    let hashed = sha256_hex(canonical.as_bytes());
    match &auth.algorithm {
        Algorithm::Classic => {
            let to_sign = format!("SDK-HMAC-SHA256\n{sdk_date}\n{hashed}");
            hex::encode(hmac(secret_key.as_bytes(), to_sign.as_bytes()))
        }
        Algorithm::Derived {
            date,
            region,
            service,
        } => {
            let info = format!("{date}/{region}/{service}");
            let key = derived_key(&auth.access_key, secret_key, &info);
            let to_sign = format!("V11-HMAC-SHA256\n{sdk_date}\n{info}\n{hashed}");
            hex::encode(hmac(key.as_bytes(), to_sign.as_bytes()))
        }
    }
}

/// Parses `YYYYMMDDTHHMMSSZ` into Unix milliseconds.
pub fn parse_sdk_date(s: &str) -> Option<i64> {
    ioda_types::time::parse_event_time(s).filter(|_| s.len() == 16)
}

/// Constant-time string comparison.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Verifies a request; `secret_of` maps an access key to its secret key.
pub fn verify(
    parts: &RequestParts<'_>,
    now_ms: i64,
    window_ms: i64,
    secret_of: impl Fn(&str) -> Option<String>,
) -> Result<String, SignError> {
    let header = (parts.header)("authorization").ok_or(SignError::BadHeader)?;
    let auth = parse_authorization(&header)?;
    let sdk_date = (parts.header)("x-sdk-date").ok_or(SignError::BadDate)?;
    let at = parse_sdk_date(&sdk_date).ok_or(SignError::BadDate)?;
    if (now_ms - at).abs() > window_ms {
        return Err(SignError::Expired);
    }
    if let Algorithm::Derived { date, service, .. } = &auth.algorithm
        && (service != "iotdm" || !sdk_date.starts_with(date.as_str()))
    {
        return Err(SignError::BadHeader);
    }
    let secret = secret_of(&auth.access_key).ok_or(SignError::UnknownKey)?;
    let canonical = canonical_request(parts, &auth.signed_headers);
    if same(
        &signature(&auth, &secret, &sdk_date, &canonical),
        &auth.signature,
    ) {
        Ok(auth.access_key)
    } else {
        Err(SignError::Mismatch)
    }
}

/// A request to sign on the client side; `headers` are the (lower-case) headers to sign, which must
/// include `host` and `x-sdk-date`.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingRequest<'a> {
    pub method: &'a str,
    pub raw_path: &'a str,
    pub raw_query: Option<&'a str>,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Signs a request the way the SDK does and returns the `Authorization` header value.
pub fn authorization_header(
    algorithm: &Algorithm,
    access_key: &str,
    secret_key: &str,
    request: &OutgoingRequest<'_>,
) -> String {
    let OutgoingRequest {
        method,
        raw_path,
        raw_query,
        headers,
        body,
    } = *request;
    let mut names: Vec<String> = headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    names.sort();
    let lookup = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| (*v).to_owned())
    };
    let sdk_date = lookup("x-sdk-date").unwrap_or_default();
    let parts = RequestParts {
        method,
        raw_path,
        raw_query,
        header: &lookup,
        body,
    };
    let canonical = canonical_request(&parts, &names);
    let auth = Authorization {
        algorithm: algorithm.clone(),
        access_key: access_key.to_owned(),
        signed_headers: names.clone(),
        signature: String::new(),
    };
    let signature = signature(&auth, secret_key, &sdk_date, &canonical);
    match algorithm {
        Algorithm::Classic => format!(
            "SDK-HMAC-SHA256 Access={access_key}, SignedHeaders={}, Signature={signature}",
            names.join(";")
        ),
        Algorithm::Derived {
            date,
            region,
            service,
        } => format!(
            "V11-HMAC-SHA256 Credential={access_key}/{date}/{region}/{service}, SignedHeaders={}, Signature={signature}",
            names.join(";")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_match_the_sdk() {
        assert_eq!(
            canonical_uri("/v5/iot/proj123/devices/dev1/commands"),
            "/v5/iot/proj123/devices/dev1/commands/"
        );
        assert_eq!(
            canonical_uri("/v5/iot/p/devices/d%201"),
            "/v5/iot/p/devices/d%201/"
        );
        assert_eq!(canonical_query(None), "");
        assert_eq!(
            canonical_query(Some(
                "product_id=p%201~x%2A&limit=10&device_name=%E5%90%8D&marker=ff"
            )),
            "device_name=%E5%90%8D&limit=10&marker=ff&product_id=p%201~x%2A"
        );
        assert_eq!(canonical_query(Some("b=2&a=1&a=0")), "a=0&a=1&b=2");
    }

    #[test]
    fn authorization_headers() {
        let classic = parse_authorization(
            "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=content-type;host;x-sdk-date, Signature=AbC",
        );
        assert_eq!(
            classic,
            Ok(Authorization {
                algorithm: Algorithm::Classic,
                access_key: "AK1".into(),
                signed_headers: vec!["content-type".into(), "host".into(), "x-sdk-date".into()],
                signature: "abc".into()
            })
        );
        let derived = parse_authorization("V11-HMAC-SHA256 Credential=MYAK/20261126/cn-north-4/iotdm, SignedHeaders=host, Signature=01").map(|a| a.algorithm);
        assert_eq!(
            derived,
            Ok(Algorithm::Derived {
                date: "20261126".into(),
                region: "cn-north-4".into(),
                service: "iotdm".into()
            })
        );
        for bad in [
            "",
            "SDK-HMAC-SHA256",
            "SDK-HMAC-SHA256 Access=AK",
            "HMAC Access=a, SignedHeaders=h, Signature=s",
            "V11-HMAC-SHA256 Credential=AK/d, SignedHeaders=h, Signature=s",
        ] {
            assert_eq!(parse_authorization(bad), Err(SignError::BadHeader), "{bad}");
        }
    }

    fn headers(name: &str) -> Option<String> {
        match name {
            "host" => Some("127.0.0.1:8080".into()),
            "x-sdk-date" => Some("20261126T090921Z".into()),
            "content-type" => Some("application/json".into()),
            _ => None,
        }
    }

    #[test]
    fn verifies_both_algorithms_and_refuses_tampering() {
        let now = parse_sdk_date("20261126T090921Z").unwrap_or_default();
        let signed: Vec<String> = ["content-type", "host", "x-sdk-date"]
            .map(String::from)
            .to_vec();
        let parts = RequestParts {
            method: "GET",
            raw_path: "/v5/iot/p/devices",
            raw_query: Some("limit=1"),
            header: &headers,
            body: b"",
        };
        for algorithm in [
            Algorithm::Classic,
            Algorithm::Derived {
                date: "20261126".into(),
                region: "r".into(),
                service: "iotdm".into(),
            },
        ] {
            let mut auth = Authorization {
                algorithm: algorithm.clone(),
                access_key: "AK".into(),
                signed_headers: signed.clone(),
                signature: String::new(),
            };
            auth.signature = signature(
                &auth,
                "SK",
                "20261126T090921Z",
                &canonical_request(&parts, &signed),
            );
            let header_value = match &algorithm {
                Algorithm::Classic => format!(
                    "SDK-HMAC-SHA256 Access=AK, SignedHeaders={}, Signature={}",
                    signed.join(";"),
                    auth.signature
                ),
                Algorithm::Derived { .. } => format!(
                    "V11-HMAC-SHA256 Credential=AK/20261126/r/iotdm, SignedHeaders={}, Signature={}",
                    signed.join(";"),
                    auth.signature
                ),
            };
            let lookup = |name: &str| {
                if name == "authorization" {
                    Some(header_value.clone())
                } else {
                    headers(name)
                }
            };
            let request = RequestParts {
                header: &lookup,
                ..parts.clone()
            };
            assert_eq!(
                verify(&request, now, 900_000, |_| Some("SK".into())),
                Ok("AK".into())
            );
            assert_eq!(
                verify(&request, now, 900_000, |_| Some("other".into())),
                Err(SignError::Mismatch)
            );
            assert_eq!(
                verify(&request, now, 900_000, |_| None),
                Err(SignError::UnknownKey)
            );
            assert_eq!(
                verify(&request, now + 1_000_000, 900_000, |_| Some("SK".into())),
                Err(SignError::Expired)
            );
            let tampered = RequestParts {
                raw_query: Some("limit=2"),
                ..request.clone()
            };
            assert_eq!(
                verify(&tampered, now, 900_000, |_| Some("SK".into())),
                Err(SignError::Mismatch)
            );
            let tampered_body = RequestParts {
                body: b"{}",
                ..request.clone()
            };
            assert_eq!(
                verify(&tampered_body, now, 900_000, |_| Some("SK".into())),
                Err(SignError::Mismatch)
            );
        }
    }
}
