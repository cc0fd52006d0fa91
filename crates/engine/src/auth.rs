//! IoTDA device authentication: the MQTT client id grammar and the HMAC password.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The parts of an IoTDA MQTT client id `{device_id}_{id_type}_{sign_type}_{YYYYMMDDHH}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId<'a> {
    pub device_id: &'a str,
    pub sign_type: u8,
    pub timestamp: &'a str,
}

/// Parses a client id from the right, since device ids themselves contain `_`.
pub fn parse_client_id(client_id: &str) -> Option<ClientId<'_>> {
    let mut parts = client_id.rsplitn(4, '_');
    let timestamp = parts.next()?;
    let sign = parts.next()?;
    let id_type = parts.next()?;
    let device_id = parts.next()?;
    let sign_type = match sign {
        "0" => 0,
        "1" => 1,
        "2" => 2,
        _ => return None,
    };
    let well_formed = id_type == "0" && !device_id.is_empty() && is_hour_stamp(timestamp);
    well_formed.then_some(ClientId {
        device_id,
        sign_type,
        timestamp,
    })
}

/// Whether `timestamp` has the shape of IoTDA's `YYYYMMDDHH` (ten digits).
pub fn is_hour_stamp(timestamp: &str) -> bool {
    timestamp.len() == 10 && timestamp.bytes().all(|b| b.is_ascii_digit())
}

/// `hex(HMAC-SHA256(key = timestamp, message = secret))`: note the timestamp is the key.
pub fn device_password(secret: &str, timestamp: &str) -> String {
    hex::encode(hmac_sha256(timestamp.as_bytes(), secret.as_bytes()))
}

pub(crate) fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// Constant-time comparison, so a wrong password takes as long as a right one.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `password` matches either secret.
pub fn password_matches(password: &[u8], timestamp: &str, secrets: &[Option<&str>]) -> bool {
    secrets
        .iter()
        .flatten()
        .any(|secret| constant_time_eq(device_password(secret, timestamp).as_bytes(), password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_password_vector() {
        assert_eq!(
            device_password("12345678", "2025041401"),
            "c75150e6cb841417396819e4d2ee4358a416344a03a083e3a8567074ddec820a"
        );
    }

    #[test]
    fn client_id_table() {
        type Parsed<'a> = Option<(&'a str, u8, &'a str)>;
        let cases: &[(&str, Parsed<'_>)] = &[
            (
                "60a87ffebaccd902c2f1abbb_0001_0_0_2025041401",
                Some(("60a87ffebaccd902c2f1abbb_0001", 0, "2025041401")),
            ),
            ("dev_0_1_2025041401", Some(("dev", 1, "2025041401"))),
            ("dev_0_3_2025041401", None),
            ("dev_2_0_2025041401", None),
            ("dev_0_0_20250414", None),
            ("dev_0_0_2025041401x", None),
            ("_0_0_2025041401", None),
            ("0_0_2025041401", None),
            ("plainclient", None),
        ];
        for (input, want) in cases {
            let got = parse_client_id(input).map(|c| (c.device_id, c.sign_type, c.timestamp));
            assert_eq!(got, *want, "{input}");
        }
    }

    #[test]
    fn either_secret_matches() {
        let pw = device_password("secondary1", "2025041401");
        assert!(password_matches(
            pw.as_bytes(),
            "2025041401",
            &[Some("primary11"), Some("secondary1")]
        ));
        assert!(!password_matches(
            pw.as_bytes(),
            "2025041402",
            &[Some("primary11"), Some("secondary1")]
        ));
        assert!(!password_matches(b"", "2025041401", &[None, None]));
    }
}
