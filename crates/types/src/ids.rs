//! Identifier rules and generation.
//!
//! Randomness is passed in so the crate stays pure; the engine supplies it from the OS.

use crate::TypesError;

fn check(field: &'static str, value: &str, max: usize) -> Result<(), TypesError> {
    let reason = if value.is_empty() || value.len() > max {
        format!("must be 1 to {max} characters")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        "may contain only letters, digits, '_' and '-'".to_owned()
    } else {
        return Ok(());
    };
    Err(TypesError::InvalidId { field, reason })
}

/// `device_id`: at most 128 of `[A-Za-z0-9_-]`.
pub fn check_device_id(v: &str) -> Result<(), TypesError> {
    check("device_id", v, 128)
}

/// `node_id`: at most 64 of `[A-Za-z0-9_-]`.
pub fn check_node_id(v: &str) -> Result<(), TypesError> {
    check("node_id", v, 64)
}

/// `product_id`: at most 36 of `[A-Za-z0-9_-]`.
pub fn check_product_id(v: &str) -> Result<(), TypesError> {
    check("product_id", v, 36)
}

/// A device secret: 8 to 32 of `[A-Za-z0-9_-]`.
pub fn check_secret(v: &str) -> Result<(), TypesError> {
    let ok = (8..=32).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TypesError::InvalidId {
            field: "secret",
            reason: "must be 8 to 32 of letters, digits, '_' and '-'".to_owned(),
        })
    }
}

/// The default device id IoTDA derives: `{product_id}_{node_id}`.
pub fn default_device_id(product_id: &str, node_id: &str) -> String {
    format!("{product_id}_{node_id}")
}

/// A 24-hex id like IoTDA's: 4 bytes of seconds then 8 random bytes, so ids sort by creation.
pub fn object_id(unix_ms: i64, random: [u8; 8]) -> String {
    let secs = (unix_ms / 1000) as u32;
    let mut out = String::with_capacity(24);
    push_hex(&mut out, &secs.to_be_bytes());
    push_hex(&mut out, &random);
    out
}

/// Lower-case hex of arbitrary bytes.
pub fn hex_lower(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// The cursor form of a record sequence number: 24 hex digits, so string order is record order.
pub fn marker_of(seq: i64) -> String {
    format!("{seq:024x}")
}

/// Parses a 24-hex pagination marker back into a record sequence number.
pub fn parse_marker(marker: &str) -> Option<i64> {
    if marker.len() != 24 || !marker.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let value = u128::from_str_radix(marker, 16).ok()?;
    Some(i64::try_from(value).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        assert!(check_device_id("abc_DEF-123").is_ok());
        assert!(check_device_id("").is_err());
        assert!(check_device_id("a b").is_err());
        assert!(check_device_id(&"x".repeat(129)).is_err());
        assert!(check_node_id(&"x".repeat(64)).is_ok());
        assert!(check_secret("1234567").is_err());
        assert!(check_secret("12345678").is_ok());
        assert!(check_secret("1234567/").is_err());
    }

    #[test]
    fn markers_sort_and_round_trip() {
        assert_eq!(marker_of(255), "0000000000000000000000ff");
        assert_eq!(parse_marker("0000000000000000000000ff"), Some(255));
        assert_eq!(parse_marker("ffffffffffffffffffffffff"), Some(i64::MAX));
        assert_eq!(parse_marker("zz"), None);
        assert!(marker_of(9) < marker_of(10));
        assert_eq!(
            object_id(1_000, [1, 2, 3, 4, 5, 6, 7, 8]),
            "000000010102030405060708"
        );
        assert_eq!(hex_lower(&[0x00, 0xab, 0xff, 0x10]), "00abff10");
        assert_eq!(object_id(-1_000, [0xfe; 8]), "fffffffffefefefefefefefe");
    }
}
